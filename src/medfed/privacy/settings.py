"""The job file's ``privacy`` and ``compression`` sections (validated with the job).

Every field is checked at load time and an error names its path, e.g.
``privacy.dp.noise_multiplier: must be > 0, got 0``. Combinations that would silently
weaken a guarantee (DP with an algorithm whose cost is not accounted for, secure
aggregation with a robust rule...) are refused in config.py's job checks.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from medfed.core.schema import Count, Frozen, Real


class AdaptiveClipping(Frozen):
    """Adaptive clipping (Andrew et al., NeurIPS 2021): after each round the bound moves
    towards the ``target_quantile`` of the sites' update norms, ``C *= exp(-lr * (b - q))``
    with ``b`` the noisy share of unclipped updates. The count is noised with std
    ``count_noise_multiplier`` (in updates); that costs privacy, so the updates get a
    slightly larger noise multiplier and the total stays ``noise_multiplier``.
    ``count_noise_multiplier`` must exceed ``noise_multiplier / 2``."""

    target_quantile: Real = Field(0.5, gt=0, lt=1)
    lr: Real = Field(0.2, gt=0)
    count_noise_multiplier: Real = Field(gt=0)


class SiteLevelDP(Frozen):
    """Site-level (user-level) DP-FedAvg (McMahan et al., ICLR 2018): each site's change to
    the global model is clipped to L2 norm ``clip`` and Gaussian noise of std
    ``noise_multiplier * clip`` is added, ``central``ly by the server to the sum of the
    clipped changes (sites trust the server, or secure aggregation hides the single
    updates) or ``local``ly by each site before it sends (sites trust nobody; more noise in
    the mean). Sites are weighted equally. Epsilon for ``delta`` is computed after every
    round with Opacus' ``accountant``; training stops before ``max_epsilon`` is passed."""

    noise: Literal["central", "local"] = "central"
    noise_multiplier: Real = Field(gt=0)
    clip: Real = Field(gt=0)
    adaptive: AdaptiveClipping | None = None
    delta: Real = Field(gt=0, lt=1)
    max_epsilon: Real | None = Field(None, gt=0)
    accountant: Literal["rdp", "prv"] = "rdp"

    @model_validator(mode="after")
    def _adaptive_fits(self) -> "SiteLevelDP":
        if self.adaptive is None:
            return self
        if self.noise != "central":
            raise ValueError("adaptive: adaptive clipping needs noise: central (the server sees the norms' noisy count)")
        if 2 * self.adaptive.count_noise_multiplier <= self.noise_multiplier:
            raise ValueError(
                f"adaptive.count_noise_multiplier: must be > noise_multiplier / 2 = {self.noise_multiplier / 2:g}, "
                f"got {self.adaptive.count_noise_multiplier:g}; raise it"
            )
        return self


class SampleLevelDP(Frozen):
    """Sample-level DP-SGD at every site with Opacus (Abadi et al., CCS 2016): each
    example's gradient is clipped to ``max_grad_norm``, Gaussian noise of std
    ``noise_multiplier * max_grad_norm`` is added to each batch's sum, and batches are
    Poisson samples. Protects each patient (example) of a site; epsilon for ``delta`` is
    the worst over the sites (the smallest site has the highest sampling rate)."""

    noise_multiplier: Real = Field(gt=0)
    max_grad_norm: Real = Field(gt=0)
    delta: Real = Field(gt=0, lt=1)
    max_epsilon: Real | None = Field(None, gt=0)
    accountant: Literal["rdp", "prv"] = "rdp"


class SecureAggregation(Frozen):
    """Secure aggregation (Bonawitz et al., CCS 2017): the server learns only the sum of
    the sites' updates. Each site's weighted change is clipped coordinate-wise to
    ``[-clip_range, clip_range]``, quantized to a ring and masked; the masks cancel in the
    sum. Up to n - ``threshold`` sites may drop after sending their keys; with fewer
    survivors the round is aborted. Default threshold: a majority of the round's sites.
    In a deployment only, each site signs its keys with its kit key and refuses a round
    with a key it cannot verify against the consortium CA (a server substituting keys); a
    simulation signs nothing (privacy/secagg/signing.py)."""

    threshold: Count | None = Field(None, ge=2)
    clip_range: Real = Field(1.0, gt=0)


class PrivacyConfig(Frozen):
    """What protects the patients behind an update. Give ``dp`` (site-level) or ``dp_sgd``
    (sample-level), not both; ``secure_aggregation`` can go with either or alone."""

    dp: SiteLevelDP | None = None
    dp_sgd: SampleLevelDP | None = None
    secure_aggregation: SecureAggregation | None = None

    @model_validator(mode="after")
    def _one_unit(self) -> "PrivacyConfig":
        if self.dp is not None and self.dp_sgd is not None:
            raise ValueError("dp_sgd: give dp (site-level) or dp_sgd (sample-level), not both: they protect different units")
        return self


class CompressionConfig(Frozen):
    """Compression of what sites send: the change to the global model as ``fp16``, as
    ``int8`` (one scale per tensor), or its ``topk`` largest entries (a ``fraction`` of each
    tensor). With ``error_feedback`` a site adds what compression dropped to its next
    update, so nothing is lost for good."""

    method: Literal["fp16", "int8", "topk"]
    fraction: Real | None = Field(None, gt=0, le=1)
    error_feedback: bool = True

    @model_validator(mode="after")
    def _fraction_fits(self) -> "CompressionConfig":
        if self.method == "topk" and self.fraction is None:
            raise ValueError("fraction: topk needs the fraction of entries to keep, e.g. 0.01")
        if self.method != "topk" and self.fraction is not None:
            raise ValueError(f"fraction: only topk keeps a fraction; {self.method} sends every entry")
        return self
