"""The job file's ``robust`` and ``attack`` sections (validated with the job)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from medfed.core.schema import Count, Frozen, Real


class RobustConfig(Frozen):
    """A robust aggregation rule in place of the weighted mean, for the FedAvg family:
    ``median`` (coordinate-wise), ``trimmed_mean`` (drop the ``trim`` share of largest and
    smallest values per coordinate), ``krum`` / ``multi_krum`` (Blanchard et al., 2017: the
    update(s) closest to their neighbours, tolerating ``f`` bad sites; multi-Krum averages
    ``select`` of them) and ``norm_bound`` (each site's change clipped to ``max_norm``)."""

    rule: Literal["median", "trimmed_mean", "krum", "multi_krum", "norm_bound"]
    trim: Real | None = Field(None, ge=0, lt=0.5)
    f: Count | None = Field(None, ge=0)
    select: Count | None = Field(None, ge=1)
    max_norm: Real | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _fields_fit(self) -> "RobustConfig":
        wanted = {"trimmed_mean": {"trim"}, "krum": {"f"}, "multi_krum": {"f", "select"}, "norm_bound": {"max_norm"}}
        need = wanted.get(self.rule, set())
        for name in ("trim", "f", "select", "max_norm"):
            given = getattr(self, name) is not None
            if name in need and not given:
                raise ValueError(f"{name}: {self.rule} needs it")
            if name not in need and given:
                raise ValueError(f"{name}: {self.rule} does not use it")
        return self


class AttackConfig(Frozen):
    """Simulated attackers, for robustness studies (refused in a deployment): a
    ``fraction`` of the training sites (drawn with the job seed) ``label_flip`` their
    training labels, ``sign_flip`` (send ``-scale`` times) or ``scale`` (model replacement:
    ``scale`` times) their change, or send Gaussian ``noise`` of std ``scale``."""

    kind: Literal["label_flip", "sign_flip", "scale", "noise"]
    fraction: Real = Field(ge=0, lt=1)
    scale: Real = Field(1.0, gt=0)
