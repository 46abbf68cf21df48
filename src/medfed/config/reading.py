"""How a file source is read (``data.cache``, ``data.loader``): settings that change how
a site reads its files, never what it reads, so they stay out of the job's hash and a
deployed site may choose its own."""

# No `from __future__ import annotations`: pydantic would parse every field type from a string
# at import, which lengthens start-up (see the package docstring).

from typing import Any, Literal

from pydantic import Field

from medfed.core.schema import Count, Frozen, Real

CacheMode = Literal["auto", "memory", "disk", "none"]
READING_FIELDS = ("cache", "cache_dir", "loader")  # how a site reads, not what: outside the job's hash


class LoaderConfig(Frozen):
    """How a streamed site reads its files (``cache: disk`` or ``none``): ``workers``
    processes (0: in the training process) each preparing ``prefetch`` batches ahead;
    ``timeout`` seconds bound the wait for one batch."""

    workers: Count = Field(2, ge=0, le=64)
    prefetch: Count = Field(2, ge=1, le=64)
    timeout: Real = Field(600.0, gt=0, le=86_400)


def without_reading(dumped: Any) -> Any:
    """A dumped ``data`` section without how it is read (:data:`READING_FIELDS`, also per
    site): what must agree between a job and a site's data file, and what the job's hash
    covers."""
    if not isinstance(dumped, dict):
        return dumped
    out = {k: v for k, v in dumped.items() if k not in READING_FIELDS}
    if isinstance(out.get("sites"), list):
        out["sites"] = [
            {k: v for k, v in s.items() if k not in READING_FIELDS} if isinstance(s, dict) else s for s in out["sites"]
        ]
    return out
