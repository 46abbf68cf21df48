"""Where ``transport: ray`` runs its sites: a local Ray instance or an existing cluster, and
what each site's actor asks of it.

The section says where a simulation runs, not what it computes; only ``cpus_per_site``
reaches the numbers (it is the actor's thread count, and a CPU's sums depend on the
thread count as the in-process run's ``threads`` do). Ray itself is an optional extra,
imported only by the run that uses it (``medfed.transport.ray``)."""

# No `from __future__ import annotations`: pydantic would parse every field type from a string
# at import, which lengthens start-up (see the package docstring).

import re
from typing import Annotated

from pydantic import Field, field_validator

from medfed.config.limits import MAX_SITES
from medfed.core.schema import Count, Frozen, Real

RAY_EXTRA = 'pip install -e ".[ray]"'  # what installs Ray, named by every refusal that needs it
_CLIENT = re.compile(r"^ray://[A-Za-z0-9.\-]+:(\d{1,5})$")


class RayConfig(Frozen):
    """``address``: ``null`` (default) starts a local Ray instance of ``threads`` CPUs (and
    the GPUs Ray finds) for the run and stops it at the end; ``auto`` joins the cluster
    this machine is part of (``ray start``), ``ray://host:port`` a remote one through Ray
    Client; a cluster joined is left running. Each actor serves a fixed set of sites and
    asks for ``cpus_per_site`` CPUs (its torch thread count: the whole part, at least 1)
    and, when the job runs on GPUs, ``gpus_per_site`` of a GPU, so that 1 / gpus_per_site
    actors share one. ``max_concurrent``: at most this many site tasks (and actors) at
    once; default: as many as the cluster's CPUs (and GPUs) hold."""

    address: Annotated[str, Field(min_length=1, max_length=512)] | None = None
    cpus_per_site: Real = Field(1.0, gt=0, le=512)
    gpus_per_site: Real = Field(0.25, ge=0, le=8)
    max_concurrent: Count | None = Field(None, ge=1, le=MAX_SITES)

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is None or v == "auto":
            return v
        m = _CLIENT.match(v)
        if m is None or not 0 < int(m.group(1)) < 65536:
            raise ValueError(f"must be null (a local Ray instance), 'auto' or 'ray://host:port', got {v!r}")
        return v

    @field_validator("gpus_per_site")
    @classmethod
    def _gpu_share(cls, v: float) -> float:
        if v > 1 and v != int(v):  # Ray's rule: a share of one GPU, or whole GPUs
            raise ValueError(f"must be a share of one GPU (at most 1) or a whole number of GPUs, got {v:g}")
        return v

    @property
    def threads(self) -> int:
        """The torch threads of each site actor: the whole CPUs it asks for, at least 1."""
        return max(1, int(self.cpus_per_site))
