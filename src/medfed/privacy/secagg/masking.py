"""The arithmetic of secure aggregation: a fixed-point ring encoding, a PRG, and masks.

Updates are summed in the ring Z_{2^32}. A *ring vector* is a flat (1-D) ``torch.int64``
tensor with every value in [0, 2^32); int64 leaves room to add many ring vectors before
reducing mod 2^32 (fewer than 2^31 of them).

- :class:`FixedPoint` maps float updates into the ring so that the ring sum of up to
  ``max_sites`` of them decodes to their float sum, without wrapping.
- :func:`prg` stretches a 32-byte seed into a uniform ring vector (ChaCha20 keystream).
- :func:`add_masks` / :func:`remove_masks` add or subtract ``±prg(seed)`` terms mod 2^32.

Nothing here is secret by itself; the seeds passed in are (see protocol.py).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

RING_BITS = 32
RING = 2**RING_BITS
HALF = 2 ** (RING_BITS - 1)
_LOW_BITS = RING - 1  # x & _LOW_BITS == x mod 2^32 for any int64 x (two's complement)
SEED_BYTES = 32
# ChaCha20's 16-byte nonce in the cryptography library: a 4-byte block counter then a
# 12-byte nonce, both zero. A fixed nonce is safe because every seed keys one stream only.
_NONCE = bytes(16)


class FixedPoint:
    """Fixed-point encoding of float values in Z_{2^32}, for summing up to ``max_sites``.

    Each value is clipped to [-clip_range, clip_range], scaled by 2^f, stochastically
    rounded to an integer (unbiased: E[round(v)] = v) and taken mod 2^32. ``f`` is the
    largest integer with ``max_sites * ceil(clip_range * 2^f) < 2^31`` -- the largest with
    ``max_sites * clip_range * 2^f < 2^31`` except in rare cases where rounding up could
    reach 2^31 -- so the sum of up to ``max_sites`` encodings stays in (-2^31, 2^31) and
    :meth:`decode_sum` recovers it without wrapping. Each encoded value is off by less than
    :attr:`step` = 2^-f, so a decoded sum of m inputs is off by less than ``m * step`` from
    the sum of the clipped inputs.
    """

    def __init__(self, clip_range: float, max_sites: int):
        if isinstance(clip_range, bool) or not isinstance(clip_range, (int, float)):
            raise TypeError(f"clip_range: expected a number, got {type(clip_range).__name__}")
        if not (math.isfinite(clip_range) and clip_range > 0):
            raise ValueError(f"clip_range: must be finite and > 0, got {clip_range}")
        if isinstance(max_sites, bool) or not isinstance(max_sites, int) or max_sites < 1:
            raise ValueError(f"max_sites: must be an integer >= 1, got {max_sites!r}")
        self.clip_range = float(clip_range)
        self.max_sites = max_sites
        f = math.floor(RING_BITS - 1 - math.log2(max_sites) - math.log2(self.clip_range))
        if not -1000 <= f <= 1000:
            raise ValueError(f"clip_range: {clip_range} needs a scale of 2^{f}, outside float64's range")
        # ldexp is exact and ceil of a float is an exact int: settle the float log's error
        while max_sites * math.ceil(math.ldexp(self.clip_range, f)) >= HALF:
            f -= 1
        while max_sites * math.ceil(math.ldexp(self.clip_range, f + 1)) < HALF:
            f += 1
        if not -1000 <= f <= 1000:
            raise ValueError(f"clip_range: {clip_range} needs a scale of 2^{f}, outside float64's range")
        self.frac_bits = f
        self._scale = math.ldexp(1.0, f)

    @property
    def step(self) -> float:
        """The quantization step 2^-f, in the values' units."""
        return math.ldexp(1.0, -self.frac_bits)

    def encode(self, values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``values`` (any shape, floating point, no NaN) as an int64 tensor of the same
        shape with values in [0, 2^32). ``generator`` (a seeded CPU ``torch.Generator``)
        drives the stochastic rounding; a fresh randomly seeded one is used when None."""
        if not isinstance(values, torch.Tensor) or not values.is_floating_point():
            raise ValueError("values: expected a floating-point tensor")
        v = values.detach().to("cpu", torch.float64)
        if torch.isnan(v).any():
            raise ValueError("values: hold NaN")
        if generator is None:
            generator = torch.Generator().manual_seed(secrets.randbits(63))
        s = v.clamp(-self.clip_range, self.clip_range) * self._scale
        low = torch.floor(s)
        up = torch.rand(s.shape, generator=generator, dtype=torch.float64) < (s - low)
        return (low + up).to(torch.int64).bitwise_and_(_LOW_BITS)

    def decode_sum(self, ring_sum: torch.Tensor) -> torch.Tensor:
        """The float64 values behind a ring sum (any shape, int64 in [0, 2^32)): values in
        [2^31, 2^32) stand for negatives; the result is divided by 2^f."""
        check_ring(ring_sum, "ring_sum", flat=False)
        signed = torch.where(ring_sum >= HALF, ring_sum - RING, ring_sum)
        return signed.to(torch.float64) / self._scale


def check_ring(x: object, name: str = "vector", length: int | None = None, flat: bool = True) -> None:
    """Raise ``ValueError`` (``TypeError`` for a non-tensor), naming ``name``, unless ``x`` is
    an int64 tensor with values in [0, 2^32), 1-D when ``flat``, of ``length`` values when
    given."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.int64:
        raise ValueError(f"{name}: expected dtype torch.int64, got {x.dtype}")
    if flat and x.dim() != 1:
        raise ValueError(f"{name}: expected a flat (1-D) vector, got shape {tuple(x.shape)}")
    if length is not None and tuple(x.shape) != (length,):
        raise ValueError(f"{name}: expected shape ({length},), got {tuple(x.shape)}")
    if x.numel():
        lo, hi = torch.aminmax(x)
        if int(lo) < 0 or int(hi) >= RING:
            raise ValueError(f"{name}: values must lie in [0, 2^32)")


def prg(seed: bytes, length: int) -> torch.Tensor:
    """``length`` pseudo-random ring values: the ChaCha20 keystream under key ``seed`` (32
    bytes) and a zero nonce, read as little-endian uint32. int64 tensor of shape (length,)."""
    if not isinstance(seed, (bytes, bytearray)) or len(seed) != SEED_BYTES:
        raise ValueError(f"seed: expected {SEED_BYTES} bytes")
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"length: expected an integer >= 0, got {length!r}")
    enc = Cipher(algorithms.ChaCha20(bytes(seed), _NONCE), mode=None).encryptor()
    stream = enc.update(bytes(4 * length))
    return torch.from_numpy(np.frombuffer(stream, dtype="<u4").astype(np.int64))


def add_masks(x: torch.Tensor, masks: Iterable[tuple[bytes, int]]) -> torch.Tensor:
    """``(x + sum(sign * prg(seed, len(x)))) mod 2^32`` over ``masks`` = (seed, sign) pairs,
    sign +1 or -1. ``x`` is a ring vector (any int64 values are reduced); a new CPU tensor."""
    out = x.detach().cpu().clone()
    for k, (seed, sign) in enumerate(masks):
        if sign not in (1, -1):
            raise ValueError(f"masks[{k}]: sign must be +1 or -1, got {sign!r}")
        m = prg(seed, out.numel())
        out.add_(m) if sign == 1 else out.sub_(m)
        if k % (1 << 20) == (1 << 20) - 1:  # keep |out| far from int64's limit
            out.bitwise_and_(_LOW_BITS)
    return out.bitwise_and_(_LOW_BITS)


def remove_masks(y: torch.Tensor, masks: Iterable[tuple[bytes, int]]) -> torch.Tensor:
    """The inverse of :func:`add_masks` with the same ``masks``."""
    return add_masks(y, [(seed, -sign) for seed, sign in masks])
