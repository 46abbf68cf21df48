"""A site's label fields, shared by every data source that has labels: ``labeled_fraction``
(the share of a site's training labels kept) and ``unlabeled`` (a site without labels)."""

# No `from __future__ import annotations`: pydantic would parse every field type from a string
# at import, which lengthens start-up (see the package docstring).

from typing import Any

from pydantic import Field

def fraction_field():
    """``labeled_fraction``: the share of a site's training labels kept, in (0, 1]; left out
    of the job's dumps when not given (older jobs keep their hash)."""
    return Field(None, gt=0, le=1, exclude_if=lambda v: v is None)


def unlabeled_field():
    return Field(False, exclude_if=lambda v: not v)


def one_label_rule(site: Any) -> None:
    """A site's label fields (data/labels.py): ``labeled_fraction`` keeps a seeded share of
    its training labels (the section's ``labeled_fraction`` when not given; val and test
    keep theirs); ``unlabeled: true`` makes it a site without labels: every training
    example unlabeled, and no val or test examples (it is evaluated on nothing).
    Unlabeled training examples train only with ``semi_supervised``."""
    if site.unlabeled and site.labeled_fraction is not None:
        raise ValueError("labeled_fraction: a site with unlabeled: true keeps no labels; give one or the other")
