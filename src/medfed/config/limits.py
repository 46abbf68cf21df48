"""The upper bounds of a job's counts, and the site name type every section shares.

Every count of a job, a site data file or a consortium file has an upper bound, so a typo
cannot make a run that never ends or never fits in memory (see :mod:`medfed.config`).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

SiteName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


# Upper bounds of the job's counts.
MAX_SITES = 10_000  # sites of a data section
MAX_EXAMPLES = 1_000_000  # examples in one split of a synthetic site
MAX_EPOCHS = 1_000  # local_epochs, head_epochs, finetune_epochs
MAX_BATCH = 16_384  # batch_size
MAX_ROUNDS = 100_000  # rounds, eval_every
MAX_SIDE = 4_096  # one side of a crop, resize or patch size
MAX_VOXELS = 2**27  # pixels (voxels) of one image after crop/resize, or of a patch: 512**3
MAX_ROUND_TIMEOUT = 7 * 24 * 3600.0  # seconds: one week
SYNTHETIC_MAX_BYTES = 4 * 2**30  # generated images (float32) and masks (int64) of all sites
MAX_YAML_NODES = 1_000_000  # values of a YAML file once its aliases are expanded


RESERVED_SITE_NAMES = {"all", "median"}  # the mean and the median over sites in metrics and reports


def unique_names(names: list[str], what: str) -> list[str]:
    """``names`` unchanged when none appears twice; else ValueError naming ``what`` (e.g.
    "site names") and the repeated name. Site names must also avoid
    :data:`RESERVED_SITE_NAMES`."""
    seen: set[str] = set()
    for n in names:
        if what == "site names" and n in RESERVED_SITE_NAMES:
            raise ValueError(f"'{n}' is reserved and cannot name a site")
        if n in seen:
            raise ValueError(f"{what} must be unique, '{n}' appears twice")
        seen.add(n)
    return names
