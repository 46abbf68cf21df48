"""Site-level differential privacy: DP-FedAvg with fixed or adaptive clipping.

Each site's change to the global model (its *delta*, float entries only) is clipped to L2
norm ``C`` and Gaussian noise is added, so that the presence of a whole site (all of a
hospital's patients) is protected (McMahan et al., "Learning differentially private
recurrent language models", ICLR 2018).

* :class:`CentralDP` (a :class:`~medfed.algorithms.base.Combiner`): the server clips,
  takes the uniform mean and adds noise of std ``z * C / m``; optionally the bound adapts
  to a quantile of the update norms (Andrew et al., "Differentially private learning
  with adaptive clipping", NeurIPS 2021).
* :class:`ClipFilter` (a site filter): sites clip and the server adds the noise to a mean
  it cannot take apart (secure aggregation, privacy/secagg/integration.py).
* :class:`LocalDP` (a site filter): each site clips and adds noise of std ``z * C``
  itself, trusting nobody.

Epsilon is computed in accounting.py with the same ``z``. Noise (privacy/noise.py) comes
from a ChaCha20 keystream under fresh keys from the OS in a deployment
(:class:`~medfed.privacy.noise.SecureNoise`), and from ``torch.Generator`` seeded from the
job seed in a simulation, so that runs repeat. Floating-point Gaussian sampling has known
side channels (Mironov, CCS 2012); state that when reporting guarantees.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from medfed.algorithms.base import Combiner
from medfed.algorithms.mean import weighted_average
from medfed.core.params import apply_delta, clip_to_norm, delta, l2_norm
from medfed.core.types import Encoding, Metric, Params, RoundPlan, Update
from medfed.privacy.accounting import adaptive_noise_multiplier
from medfed.privacy.base import UpdateFilter
from medfed.privacy.noise import SecureNoise, SeededNoise, noise_source
from medfed.privacy.noise import seeded_generator as seeded_generator  # its home before noise.py


def central_noise_std(noise_multiplier: float, clip: float, num_updates: int) -> float:
    """``z * C / m``: the std of the Gaussian noise added to each coordinate of the
    uniform mean of ``m`` deltas clipped to L2 norm ``C`` (one site moves that mean by at
    most ``C / m``)."""
    if num_updates < 1:
        raise ValueError(f"num_updates: must be >= 1, got {num_updates}")
    return noise_multiplier * clip / num_updates


def _positive(name: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name}: must be a finite number > 0, got {value}")


def _add_noise(d: Params, std: float, noise: SeededNoise | SecureNoise) -> Params:
    """``d`` plus i.i.d. N(0, std^2) in every coordinate, in each entry's dtype."""
    return {k: t + noise.normal(t.shape, t.dtype) * std for k, t in d.items()}


def _split(update: Update, global_params: Params) -> tuple[Params, Params]:
    """(delta of the float entries, the other entries as they are) of a full update."""
    d = delta(update.params, global_params)
    full = {k: v for k, v in update.params.items() if k not in d}
    return d, full


# --------------------------------------------------------------------------- server side


@dataclass(frozen=True)
class AdaptiveClipper:
    """Adaptive clipping (Andrew et al., NeurIPS 2021): after each round the bound moves
    towards the ``target_quantile`` (in (0, 1)) of the sites' update norms by the
    geometric step ``C *= exp(-lr * (b - target_quantile))``, with ``b`` the share of
    unclipped updates, noised with std ``count_noise_multiplier`` (sigma_b, in updates;
    must exceed ``noise_multiplier / 2``)."""

    target_quantile: float
    lr: float
    count_noise_multiplier: float

    def __post_init__(self) -> None:
        if not 0 < self.target_quantile < 1:
            raise ValueError(f"target_quantile: must be in (0, 1), got {self.target_quantile}")
        _positive("lr", self.lr)
        _positive("count_noise_multiplier", self.count_noise_multiplier)


class CentralDP(Combiner):
    """Central DP-FedAvg: clip each site's delta to ``C``, take the uniform mean over the
    ``m`` updates and add N(0, (z_delta * C / m)^2) to every coordinate.

    ``clip``: the initial L2 bound ``C`` (> 0; in parameter units). ``noise_multiplier``:
    ``z`` (> 0), the multiplier the accountant uses. ``adaptive``: move ``C`` each round
    (then the updates get ``z_delta = adaptive_noise_multiplier(z, sigma_b) > z`` so the
    total stays ``z``); None keeps ``C`` fixed. ``seed``: None draws each round's noise
    from a cryptographic generator (ChaCha20 under fresh OS keys; deployments); an int
    makes round ``r``'s noise a function of ``(seed, r)`` (reproducible simulations).

    The mean is uniform, not example-weighted, so that one site moves it by at most
    ``C / m``; ``m`` is assumed public (fixed-size site sampling). Non-float entries
    (integer buffers) get FedAvg's example-weighted mean and no noise.
    """

    name = "dp_central"

    def __init__(
        self,
        clip: float,
        noise_multiplier: float,
        adaptive: AdaptiveClipper | None = None,
        seed: int | None = None,
    ):
        _positive("clip", clip)
        _positive("noise_multiplier", noise_multiplier)
        self.clip = float(clip)  # the bound of the next round
        self.noise_multiplier = float(noise_multiplier)
        self.adaptive = adaptive
        # fail at construction, not in round 1, when the count's noise leaves no budget
        self.update_noise_multiplier = (
            adaptive_noise_multiplier(noise_multiplier, adaptive.count_noise_multiplier)
            if adaptive is not None
            else self.noise_multiplier
        )
        self.seed = seed
        self._metrics: dict[str, float] = {}

    def combine(self, global_params: Params, updates: Sequence[Update], rnd: int) -> Params:
        if not updates:
            raise ValueError("dp_central: no updates to combine")
        m, bound = len(updates), self.clip
        g = noise_source(self.seed, rnd)  # seed None (a deployment): a cryptographic generator

        # ---- clip each site's delta, note whether it was within the bound
        deltas, fulls, unclipped = [], [], 0
        for u in updates:
            if u.encoding is not Encoding.FULL:
                raise ValueError(f"dp_central: site '{u.site}' sent a {u.encoding.value} update; decode it first")
            d, full = _split(u, global_params)
            d, norm = clip_to_norm(d, bound)
            if not math.isfinite(norm):
                raise ValueError(f"dp_central: site '{u.site}' sent an update whose delta norm is {norm}")
            unclipped += norm <= bound
            deltas.append(d)
            fulls.append(full)

        # ---- uniform mean plus Gaussian noise calibrated to one site's share C / m
        mean = {
            k: (sum(d[k].to(torch.float64) for d in deltas) / m).to(t.dtype) for k, t in deltas[0].items()
        }
        noisy = _add_noise(mean, central_noise_std(self.update_noise_multiplier, bound, m), g)
        full = weighted_average(fulls, [u.num_examples for u in updates]) if fulls[0] else {}

        # ---- adaptive clipping: the noisy share of unclipped updates moves the next bound
        self._metrics = {Metric.CLIP: bound}
        if self.adaptive is not None:
            a = self.adaptive
            noise_b = float(g.normal((), torch.float64)) * a.count_noise_multiplier
            b_bar = (unclipped + noise_b) / m
            self.clip = bound * math.exp(-a.lr * (b_bar - a.target_quantile))
            # only the noisy share is released: the exact count would leak
            self._metrics[Metric.UNCLIPPED_FRACTION] = b_bar
        return apply_delta(global_params, noisy, full=full)

    def state(self) -> Params:
        return {"clip": torch.tensor(self.clip, dtype=torch.float64)}

    def load_state(self, state: Params) -> None:
        """Restore the bound of :meth:`state`; ``{}`` keeps the current one."""
        extra = sorted(set(state) - {"clip"})
        if extra:
            raise ValueError(f"combiner '{self.name}': unexpected state entries {extra[:3]}")
        if "clip" in state:
            value = float(state["clip"])
            _positive("combiner state 'clip'", value)
            self.clip = value

    def round_metrics(self) -> dict[str, float]:
        """``clip``: the bound of the last round; ``unclipped_fraction`` (adaptive only):
        the noisy share of its updates within the bound."""
        return dict(self._metrics)


# --------------------------------------------------------------------------- site side


def _clip_and_noise(update: Update, global_params: Params, bound: float, std: float,
                    g: SeededNoise | SecureNoise | None) -> Update:
    """The update with its float delta clipped to L2 norm ``bound`` and, if ``std`` > 0,
    N(0, std^2) added to every coordinate; non-float entries pass whole."""
    if update.encoding is not Encoding.FULL:
        raise ValueError(
            f"site '{update.site}': DP clipping needs the full update, got {update.encoding.value}; "
            "put the DP filter before compression or secure aggregation"
        )
    d, full = _split(update, global_params)
    d, norm = clip_to_norm(d, bound)
    if not math.isfinite(norm):
        raise ValueError(f"site '{update.site}': the update's delta norm is {norm}")
    if std > 0:
        assert g is not None
        return dataclasses.replace(update, params=apply_delta(global_params, _add_noise(d, std, g), full=full))
    return dataclasses.replace(update, params=_within_bound(global_params, d, full, bound))


def _within_bound(global_params: Params, d: Params, full: Params, bound: float) -> Params:
    """``global + d``, shrunk until the delta the receiver recomputes (after rounding to the
    model's dtypes) is within ``bound``: without noise that delta is what is protected."""
    params = apply_delta(global_params, d, full=full)
    norm = l2_norm(delta(params, global_params))
    if norm <= bound:
        return params
    # rounding adds up to one ulp of the global value per coordinate: shrink once by the
    # excess, then halve; d = 0 always fits, so this ends
    scale = bound / norm * (1 - 1e-6)
    while True:
        params = apply_delta(global_params, {k: t * scale for k, t in d.items()}, full=full)
        if l2_norm(delta(params, global_params)) <= bound:
            return params
        scale /= 2


class ClipFilter(UpdateFilter):
    """Site-side clipping without noise: the site's delta is clipped to ``clip`` (> 0) and
    the server adds the noise to the secure mean. The receiver's recomputed delta is within the
    bound even after rounding to the model's dtypes."""

    def __init__(self, clip: float):
        _positive("clip", clip)
        self.clip = float(clip)

    def apply(self, update: Update, global_params: Params, plan: RoundPlan) -> Update:
        return _clip_and_noise(update, global_params, self.clip, 0.0, None)


class LocalDP(UpdateFilter):
    """Local DP at the site: clip the delta to ``clip`` (> 0) and add N(0, (z * clip)^2)
    to every coordinate before it leaves.

    ``secure``: True draws the noise from a cryptographic generator (ChaCha20 under fresh
    OS keys, :class:`~medfed.privacy.noise.SecureNoise`; deployments); False from a torch
    generator seeded from ``plan.train.seed`` (reproducible simulations).

    Accounting (server/update_path.py): the server sees each site's noisy update and who
    sent it, so neighbouring data sets of a site swap one clipped delta for another:
    sensitivity ``2 * clip``, accounted as multiplier ``z / 2``.
    """

    def __init__(self, clip: float, noise_multiplier: float, secure: bool):
        _positive("clip", clip)
        _positive("noise_multiplier", noise_multiplier)
        self.clip = float(clip)
        self.noise_multiplier = float(noise_multiplier)
        self.secure = secure

    def apply(self, update: Update, global_params: Params, plan: RoundPlan) -> Update:
        bound = self.clip
        # a word of its own keeps this stream apart from training's use of the same seed
        g = SecureNoise() if self.secure else noise_source(plan.train.seed, 0x4C445031)
        return _clip_and_noise(update, global_params, bound, self.noise_multiplier * bound, g)
