"""What is known of a site's data without its images: one model for a simulation's
``sites.json``, what a deployed site tells the server, and what the report shows."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from medfed.core.schema import Frozen

Count = Annotated[int, Field(ge=0)]


class SkippedFile(Frozen):
    """A file a site could not read and left out (``on_bad_file: skip``)."""

    file: str
    reason: str


class SiteSummary(Frozen):
    """A site's data: the sizes of its splits, examples per class in each split (see
    data/sites.py ``class_counts_of``), the image shape (C, *spatial), whether it is held
    out, and how many files it ``skipped``. ``skipped_files`` names them (and why), in a
    simulation only: a deployed site sends the count, never file names, and the server
    refuses a summary that names files. ``unlabeled``: how many of the ``train`` examples
    have no label (semi-supervised training, data/labels.py); the others are labeled, and
    only they count in ``class_counts``."""

    name: str
    train: Count
    val: Count
    test: Count
    class_counts: dict[Literal["train", "val", "test"], list[Count]] = Field(default_factory=dict)
    shape: list[int] = Field(min_length=2, max_length=4)
    held_out: bool = False
    unlabeled: Count = Field(0, exclude_if=lambda v: v == 0)  # left out at 0: older sites.json and summaries alike
    skipped: Count = 0
    skipped_files: tuple[SkippedFile, ...] = ()

    @property
    def labeled(self) -> int:
        """Training examples with a label."""
        return self.train - self.unlabeled

    @model_validator(mode="after")
    def _unlabeled_of_train(self) -> "SiteSummary":
        if self.unlabeled > self.train:
            raise ValueError(f"unlabeled: {self.unlabeled} unlabeled of {self.train} training examples")
        return self

    @model_validator(mode="before")
    @classmethod
    def _older_sites_json(cls, data: Any) -> Any:
        """``sites.json`` written before 2026-12-04 listed the skipped files under
        ``skipped``: read it as the count and the files."""
        if isinstance(data, dict) and isinstance(data.get("skipped"), list):
            data = {**data, "skipped": len(data["skipped"]), "skipped_files": data["skipped"]}
        return data

    def for_the_server(self) -> dict[str, Any]:
        """What a deployed site sends: everything but the names of the files it skipped."""
        return self.model_dump(mode="json", exclude={"skipped_files"})


def sites_json(summaries: Sequence[SiteSummary]) -> str:
    """The text of a run's ``sites.json``: ``{"sites": [...]}``, one summary per site."""
    return json.dumps({"sites": [s.model_dump(mode="json") for s in summaries]}, indent=2) + "\n"
