"""How one data set is split into sites (:class:`PartitionConfig`) and a site's files into
train/val/test (:class:`SplitConfig`)."""

# No `from __future__ import annotations`: pydantic would parse every field type from a string
# at import, which lengthens start-up (see the package docstring).

from typing import Literal

from pydantic import Field, field_validator, model_validator

from medfed.config.limits import MAX_SITES, SiteName, unique_names
from medfed.core.schema import Frozen, Real


class PartitionConfig(Frozen):
    """How one data set is split into sites.

    ``iid``: uniformly at random, equal sizes. ``dirichlet``: label skew, each class is
    shared among sites in proportions drawn from Dirichlet(alpha); small alpha means strong
    skew. ``quantity``: site sizes drawn from Dirichlet(alpha), labels IID.
    The same per-site proportions are applied to the train, val and test splits, so a
    site's test set has the same population as its training set.
    """

    method: Literal["iid", "dirichlet", "quantity"]
    sites: list[SiteName] = Field(min_length=1, max_length=MAX_SITES)
    alpha: Real = Field(0.5, gt=0)

    @field_validator("sites")
    @classmethod
    def _names_unique(cls, v: list[str]) -> list[str]:
        return unique_names(v, "site names")


class SplitConfig(Frozen):
    """Fractions of a site's examples held out for ``val`` and ``test`` when its files do
    not say which split they belong to. Drawn with the job seed; the rest trains."""

    val: Real = Field(0.15, gt=0, lt=1)
    test: Real = Field(0.15, gt=0, lt=1)

    @model_validator(mode="after")
    def _leaves_training(self) -> "SplitConfig":
        if self.val + self.test >= 1:
            raise ValueError(f"val + test must leave examples to train on, got {self.val:g} + {self.test:g}")
        return self
