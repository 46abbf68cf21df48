"""Where a run's results are also logged (``tracking``): TensorBoard event files in the run
folder and an MLflow run. Settings of the place results go, never of what is computed, so
the section is kept out of the job: out of its hash, out of the ``job.yaml`` a run saves,
and out of what a deployed server sends its sites (an MLflow URI may name a private server).

The tools are optional extras, imported only by the run that uses them
(``medfed.tracking.external``)."""

# No `from __future__ import annotations`: pydantic would parse every field type from a string
# at import, which lengthens start-up (see the package docstring).

from typing import Annotated

from pydantic import Field, field_validator

from medfed.core.schema import Frozen

EXTRAS = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # setting -> the extra (and module) it needs


class MlflowConfig(Frozen):
    """An MLflow run per medfed run, in ``experiment`` (default: the job's name) of the
    tracking store at ``uri``: a tracking server (``http://host:5000``), a database
    (``sqlite:///path/mlflow.db``, ``postgresql://...``) or a folder (``file:///path``).
    Without ``uri``: a SQLite store ``mlflow.db`` next to the run folder, with the
    artifacts in ``mlartifacts/`` beside it, shared by every run written to that folder (a
    new experiment in any local SQLite store keeps its artifacts beside the database too).
    A relative path in ``uri`` is taken from the current folder, as ``output`` is."""

    uri: Annotated[str, Field(min_length=1, max_length=2048)] | None = None
    experiment: Annotated[str, Field(min_length=1, max_length=256)] | None = None

    @field_validator("uri")
    @classmethod
    def _uri_plain(cls, v: str | None) -> str | None:
        if v is not None and (v != v.strip() or any(c.isspace() for c in v)):
            raise ValueError(f"must be a URI without spaces, got {v!r}")
        return v


class TrackingConfig(Frozen):
    """``tensorboard: true`` writes TensorBoard event files to ``RUN/tensorboard``;
    ``mlflow`` logs the run to MLflow (see :class:`MlflowConfig`)."""

    tensorboard: Annotated[bool, Field(strict=True)] = False
    mlflow: MlflowConfig | None = None

    @property
    def extras(self) -> list[str]:
        """The optional extras these settings need, in :data:`EXTRAS` order."""
        return [e for s, e in EXTRAS.items() if (self.tensorboard if s == "tensorboard" else self.mlflow is not None)]
