"""Which examples of a site have a label: scarce labels, for semi-supervised training.

A site's training split may hold examples without a label, marked by its ``labeled`` mask
(bool (N,); the unlabeled ones hold a placeholder label of zeros): rows of a CSV whose
label cells are empty (data/readers/folder.py), the labels a study hides with
``labeled_fraction`` (a seeded share of the training labels is kept), or a whole site
with ``unlabeled: true``. Validation and test hold labeled examples only: a site without
any is evaluated on nothing there, and says so in the log. Without the job's
``semi_supervised`` section the unlabeled training examples are left out (supervised
training cannot use them).

A study's choice of labels depends only on the job seed, the site's place in the job and
its training split (never on val or test), so every run and every worker of a job hides
the same labels.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import torch

from medfed.config import Job
from medfed.core.errors import DataError
from medfed.data.base import Examples, SiteData, labeled_mask

log = logging.getLogger("medfed")

EMPTY = torch.zeros(0, dtype=torch.int64)


def site_label_rules(job: Job, site: str) -> tuple[float | None, bool]:
    """``(labeled_fraction, unlabeled)`` of ``site``: its own entry in ``data.sites``, the
    data section's ``labeled_fraction`` where it gives none."""
    data = job.data
    default = getattr(data, "labeled_fraction", None)
    for s in getattr(data, "sites", None) or []:
        if getattr(s, "name", None) == site:
            own = getattr(s, "labeled_fraction", None)
            return (own if own is not None else default), bool(getattr(s, "unlabeled", False))
    return default, False


def with_labeled(split: Examples, labeled: torch.Tensor) -> Examples:
    """``split`` with its labeled mask replaced (None when every example is labeled)."""
    mask = None if bool(labeled.all()) else labeled.to(torch.bool)
    return replace(split, labeled=mask)  # type: ignore[type-var]


def hide_labels(split: Examples, fraction: float, seed: int, position: int) -> Examples:
    """``split`` with all but a seeded ``fraction`` of its labeled examples unlabeled (at
    least one kept). ``position``: the site's place in the job, which seeds the choice."""
    mask = labeled_mask(split)
    have = torch.nonzero(mask).flatten()
    keep = max(1, int(round(fraction * len(have)))) if len(have) else 0
    if keep >= len(have):
        return split
    rng = np.random.default_rng([seed, position, 3])
    kept = have[torch.from_numpy(rng.permutation(len(have))[:keep]).long()]
    new = torch.zeros(len(split), dtype=torch.bool)
    new[kept] = True
    return with_labeled(split, new)


def only_labeled(split: Examples) -> Examples:
    """The labeled examples of ``split``, in order."""
    if split.labeled is None:
        return split
    kept = split.subset(torch.nonzero(split.labeled).flatten())
    return with_labeled(kept, torch.ones(len(kept), dtype=torch.bool))


def count_unlabeled(split: Examples) -> int:
    labeled = getattr(split, "labeled", None)  # a wrapper of a split (HarmoFL's) may not say: all labeled
    return 0 if labeled is None else int((~labeled).sum())


def apply_label_rules(sites: list[SiteData], job: Job, position: dict[str, int]) -> list[SiteData]:
    """Each site's labels as the job says (see the module docstring): hidden by
    ``labeled_fraction``, all gone with ``unlabeled``; val and test labeled only; the
    unlabeled training examples kept only for ``semi_supervised``. Logs what it leaves out
    or hides. A semi-supervised job whose training sites hold no label at all is a
    DataError (the schema refuses what it can see at load time)."""
    out = []
    for site in sites:
        fraction, unlabeled = site_label_rules(job, site.name)
        train = site.train
        if unlabeled:
            train = with_labeled(train, torch.zeros(len(train), dtype=torch.bool))
        elif fraction is not None and fraction < 1:
            train = hide_labels(train, fraction, job.seed, position.get(site.name, 0))
        evaluated = {}
        for name in ("val", "test"):
            split = site.split(name)
            evaluated[name] = split.subset(EMPTY) if unlabeled else only_labeled(split)
            dropped = len(split) - len(evaluated[name])
            if dropped and not unlabeled:
                log.info("site '%s': %d %s example(s) without a label left out (val and test are labeled only)",
                         site.name, dropped, name)
            if not len(evaluated[name]):
                log.warning("site '%s' has no labeled %s examples: it is evaluated on nothing there, and its %s "
                            "metrics are left out", site.name, name, name)
        hidden = count_unlabeled(train)
        if hidden and job.semi_supervised is None:
            log.warning("site '%s': %d of its %d training examples have no label and are left out (no "
                        "semi_supervised section to train on them)", site.name, hidden, len(train))
            train = only_labeled(train)
        elif hidden:
            log.info("site '%s': %d of its %d training examples have a label", site.name, len(train) - hidden,
                     len(train))
        if not len(train):
            raise DataError(f"site '{site.name}' has no labeled training examples; it can train only with a "
                            "semi_supervised section, or leave it out of the job")
        out.append(SiteData(site.name, train, evaluated["val"], evaluated["test"], site.skipped))
    if job.semi_supervised is not None:
        held_out = set(job.held_out)
        if not any(count_unlabeled(s.train) < len(s.train) for s in out if s.name not in held_out) and any(
                s.name not in held_out for s in out):
            raise DataError("semi_supervised: no training site has a single labeled training example; give at "
                            "least one site labels")
    return out


def needs_label_rules(job: Job) -> bool:
    """True when some site may have unlabeled examples or hidden labels: a rule in the
    job, or a file source (whose CSV rows may lack a label)."""
    if job.task.kind == "reconstruction":
        return False
    data = job.data
    if getattr(data, "labeled_fraction", None) is not None or job.semi_supervised is not None:
        return True
    if any(getattr(s, "labeled_fraction", None) is not None or getattr(s, "unlabeled", False)
           for s in getattr(data, "sites", None) or []):
        return True
    return data.source == "folder"
