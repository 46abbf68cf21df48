"""Frequency-space operations on 2D images: FedDG's continuous frequency-space
interpolation (Liu et al., CVPR 2021; the job's ``generalization: {method: feddg}``):
amplitude spectra in a central low-frequency band, shared between sites, and the
augmentation that mixes an image's amplitude in that band with a shared one while keeping
the image's phase; and HarmoFL's amplitude normalization (Jiang, Wang and Dou, AAAI 2022;
``algorithm: {name: harmofl}``): each image's amplitude, in a band, replaced by its own
site's average amplitude, its phase kept. That average never leaves the site.

A spectrum here is ``fftshift(fft2(image))`` per channel; its band is the central
(2b+1) x (2b+1) square, ``b = floor(ratio * min(H, W) / 2)``. What a site shares is the
absolute value (amplitude) of that band for a few of its training images: no phase, so no
image can be rebuilt from it.
"""

from __future__ import annotations

import math
import dataclasses
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from medfed.core.errors import DataError
from medfed.data.base import Augment, Batch, Examples, Planned

# FedDG's two messages before round 1: a site's amplitudes out, the consortium's bank in
AMPLITUDES_TOPIC, BANK_TOPIC = "feddg/amplitudes", "feddg/bank"
FEDDG_TOPICS = frozenset({AMPLITUDES_TOPIC, BANK_TOPIC})


def band_half(shape: Sequence[int], ratio: float) -> int:
    """``b``: the half-width of the central band of a (H, W) spectrum, at least 1."""
    return max(1, int(math.floor(ratio * min(shape) / 2)))


def _band(h: int, w: int, b: int) -> tuple[slice, slice]:
    ch, cw = h // 2, w // 2
    return slice(ch - b, ch + b + 1), slice(cw - b, cw + b + 1)


def low_amplitudes(images: torch.Tensor, ratio: float) -> torch.Tensor:
    """The band amplitudes of ``images`` (N, C, H, W): (N, C, 2b+1, 2b+1), float32."""
    spectrum = torch.fft.fftshift(torch.fft.fft2(images.to(torch.float32)), dim=(-2, -1))
    b = band_half(images.shape[-2:], ratio)
    rows, cols = _band(images.shape[-2], images.shape[-1], b)
    return spectrum[..., rows, cols].abs().to(torch.float32)


def site_bank(split: Examples, count: int, ratio: float, seed: int) -> torch.Tensor:
    """The band amplitudes of ``count`` training images of a site (fewer when it has fewer),
    drawn with ``seed``: what the site shares."""
    if split.spatial_dims != 2:
        raise DataError("generalization: feddg mixes 2D spectra; this site's images are "
                        f"{split.spatial_dims}D (use it with 2D images or slices)")
    n = len(split)
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(count, n)]
    images = torch.cat([b.images for b in split.batches([Planned(pick.sort().values)])])
    if len(images) == 0:
        raise DataError("generalization: none of the site's drawn training images could be read")
    return low_amplitudes(images, ratio)


def check_bank(bank: object, channels: int, b: int, limit: int) -> torch.Tensor:
    """A bank as received (a nested list of floats, (N, C, 2b+1, 2b+1)), checked: shape,
    at most ``limit`` spectra, finite and non-negative values. DataError naming the problem."""
    try:
        t = torch.as_tensor(np.asarray(bank, dtype=np.float32))
    except (TypeError, ValueError) as e:
        raise DataError(f"amplitude bank: not an array of numbers ({e})") from None
    side = 2 * b + 1
    if t.ndim != 4 or tuple(t.shape[1:]) != (channels, side, side) or not 0 < t.shape[0] <= limit:
        raise DataError(f"amplitude bank: expected (N <= {limit}, {channels}, {side}, {side}) amplitudes, "
                        f"got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise DataError("amplitude bank: amplitudes must be finite and >= 0")
    return t


class AmplitudeMix:
    """The augmentation: each image, with chance ``probability``, gets the amplitude of its
    band replaced by ``(1 - lam) A + lam A_bank`` for a spectrum drawn from ``bank`` and
    ``lam`` uniform in [0, ``strength``]; its phase is kept. Seeded per batch; labels (and
    masks) unchanged. Chained after the job's own augmentation when it has one."""

    def __init__(self, bank: torch.Tensor, ratio: float, probability: float, strength: float,
                 then: Augment | None = None):
        self.bank, self.ratio, self.probability, self.strength, self.then = bank, ratio, probability, strength, then

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.then is not None:
            images, labels = self.then(images, labels, seed)
        g = torch.Generator().manual_seed(seed)
        n = images.shape[0]
        mixed = torch.rand(n, generator=g) < self.probability
        lam = torch.rand(n, generator=g) * self.strength
        pick = torch.randint(len(self.bank), (n,), generator=g)
        if not bool(mixed.any()):
            return images, labels
        spectrum = torch.fft.fftshift(torch.fft.fft2(images.to(torch.float32)), dim=(-2, -1))
        b = band_half(images.shape[-2:], self.ratio)
        rows, cols = _band(images.shape[-2], images.shape[-1], b)
        band = spectrum[..., rows, cols]
        amp, phase = band.abs(), torch.angle(band)
        target = self.bank[pick]
        w = (lam * mixed).view(n, 1, 1, 1)
        new = (1 - w) * amp + w * target
        spectrum[..., rows, cols] = torch.polar(new, phase)
        out = torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1))).real.to(images.dtype)
        return out, labels


def site_amplitude(split: Examples, count: int, seed: int) -> torch.Tensor:
    """HarmoFL: the mean amplitude spectrum ``mean |fftshift(fft2(x))|`` of ``count``
    images of ``split`` (all of them when it has fewer), drawn with ``seed``: (C, H, W),
    float32. It stays at the site. DataError for volumes, an empty split, or images of
    different sizes."""
    if split.spatial_dims != 2:
        raise DataError("algorithm: harmofl normalizes 2D amplitude spectra; this site's images are "
                        f"{split.spatial_dims}D (use it with 2D images or slices)")
    n = len(split)
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(count, n)].sort().values
    total, seen = None, 0
    for batch in split.batches([Planned(idx) for idx in pick.split(64)]):
        if len(batch) == 0:
            continue
        spectra = torch.fft.fftshift(torch.fft.fft2(batch.images.to(torch.float64)), dim=(-2, -1)).abs().sum(0)
        if total is not None and spectra.shape != total.shape:
            raise DataError(f"algorithm: harmofl averages the amplitude of images of one size, but this site has "
                            f"{tuple(total.shape[1:])} and {tuple(spectra.shape[1:])} images; resize them "
                            "(transforms.preprocess)")
        total, seen = (spectra if total is None else total + spectra), seen + len(batch)
    if total is None:
        raise DataError("algorithm: harmofl needs the site's images to average their amplitude, but none could be read")
    return (total / seen).to(torch.float32)


def normalize_amplitude(images: torch.Tensor, reference: torch.Tensor, ratio: float) -> torch.Tensor:
    """``images`` (N, C, H, W) with the amplitude of the central band of ``ratio`` (see
    :func:`band_half`; ``ratio: 1`` is the whole spectrum) replaced by ``reference``'s
    ((C, H, W), centred), each image's phase kept. Same shape and dtype as ``images``;
    DataError when the sizes differ."""
    if tuple(images.shape[1:]) != tuple(reference.shape):
        raise DataError(f"algorithm: harmofl: an image of shape {tuple(images.shape[1:])} does not match the "
                        f"site's average amplitude {tuple(reference.shape)}; give the site's images one size")
    spectrum = torch.fft.fftshift(torch.fft.fft2(images.to(torch.float64)), dim=(-2, -1))
    rows, cols = _band(images.shape[-2], images.shape[-1], band_half(images.shape[-2:], ratio))
    band = spectrum[..., rows, cols]
    target = reference.to(torch.float64)[..., rows, cols].expand_as(band)
    spectrum[..., rows, cols] = torch.polar(target, torch.angle(band))
    return torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1))).real.to(images.dtype)


class AmplitudeNormalized:
    """A split whose batches come with their images' amplitude normalized toward
    ``reference`` (:func:`normalize_amplitude`), after the job's augmentation, as the
    paper's network normalizes its input. Everything else is the wrapped split's."""

    def __init__(self, split: Examples, reference: torch.Tensor, ratio: float):
        self.split, self.reference, self.ratio = split, reference, ratio

    def __getattr__(self, name: str):  # names, spacing, labels and whatever else a split holds
        if name == "split":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.split, name)

    def __len__(self) -> int:
        return len(self.split)

    @property
    def names(self) -> tuple[str, ...] | None:
        return self.split.names

    @property
    def spacing(self) -> tuple[float, ...] | None:
        return self.split.spacing

    @property
    def labels(self) -> torch.Tensor | None:
        return self.split.labels

    @property
    def shape(self) -> tuple[int, ...]:
        return self.split.shape

    @property
    def spatial_dims(self) -> int:
        return self.split.spatial_dims

    def subset(self, index: torch.Tensor) -> "AmplitudeNormalized":
        return AmplitudeNormalized(self.split.subset(index), self.reference, self.ratio)

    def batches(self, plan: Iterable[Planned], augment: Augment | None = None, pin: bool = False) -> Iterator[Batch]:
        for batch in self.split.batches(plan, augment, pin):
            if len(batch) == 0:
                yield batch
                continue
            images = normalize_amplitude(batch.images, self.reference, self.ratio)
            yield dataclasses.replace(batch, images=images.pin_memory() if batch.images.is_pinned() else images)
