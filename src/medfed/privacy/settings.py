"""The job file's ``privacy`` and ``compression`` sections (validated with the job).

Every field is checked at load time and an error names its path, e.g.
``privacy.dp.noise_multiplier: must be > 0, got 0``. Combinations that would silently
weaken a guarantee (DP with an algorithm whose cost is not accounted for, secure
aggregation with a robust rule...) are refused in config.py's job checks.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

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
    simulation signs nothing (privacy/secagg/signing.py).

    ``graph: sparse`` is SecAgg+ (Bell et al., CCS 2020; privacy/secagg/graph.py): each
    site exchanges masks and key shares only with ``neighbours`` k sites, a Harary graph
    over a permutation seeded by the job and the round; ``threshold`` then counts within
    a site's k + 1 (its neighbours and itself), default a majority of them. ``neighbours``
    None: the smallest even k whose failure bounds, for ``dropout`` (default 0.1) of the
    round's sites dropped, are 2^-40 (a disconnected graph) and 2^-20 (a neighbourhood
    short of t), else the complete graph. Only with ``graph: sparse``: ``neighbours``,
    ``dropout`` (one or the other)."""

    threshold: Count | None = Field(None, ge=2)
    clip_range: Real = Field(1.0, gt=0)
    graph: Literal["complete", "sparse"] = "complete"
    neighbours: Count | None = Field(None, ge=2)
    dropout: Real | None = Field(None, ge=0, lt=0.5)

    @model_validator(mode="after")
    def _graph_fields(self) -> "SecureAggregation":
        for field in ("neighbours", "dropout"):
            if self.graph == "complete" and getattr(self, field) is not None:
                raise ValueError(f"{field}: only with graph: sparse (the complete graph joins every pair of sites)")
        if self.neighbours is not None and self.dropout is not None:
            raise ValueError("dropout: chooses neighbours when they are left out; give neighbours or dropout, not both")
        return self


class HomomorphicEncryption(Frozen):
    """Additively homomorphic aggregation with CKKS (TenSEAL, the ``he`` extra): each site
    encrypts ``n_i * (params - global)`` under the consortium's key, the server adds the
    ciphertexts without decrypting and ``decryptors`` of the round's sites decrypt the sum
    (privacy/he/). ``poly_modulus_degree``: the ring dimension (8192, 16384 or 32768;
    half of it is the values per ciphertext); ``scale_bits``: CKKS's scale 2^bits, the
    precision (higher: finer, but less room for large sums: 2^(57 - scale_bits) bounds
    the sum of the weighted changes)."""

    poly_modulus_degree: Count = 8192
    scale_bits: Count = Field(32, ge=20, le=45)
    decryptors: Count = Field(1, ge=1)

    @field_validator("poly_modulus_degree")
    @classmethod
    def _degree(cls, v: int) -> int:
        if v not in (8192, 16384, 32768):
            raise ValueError(f"must be one of 8192, 16384, 32768, got {v}")
        return v


class PrivacyConfig(Frozen):
    """What protects the patients behind an update. Give ``dp`` (site-level) or ``dp_sgd``
    (sample-level), not both; ``secure_aggregation`` can go with either or alone; ``he``
    (homomorphic encryption) with local DP or DP-SGD, not with secure aggregation or central
    DP (config/job.py refuses what it does not fit)."""

    dp: SiteLevelDP | None = None
    dp_sgd: SampleLevelDP | None = None
    secure_aggregation: SecureAggregation | None = None
    he: HomomorphicEncryption | None = None

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
