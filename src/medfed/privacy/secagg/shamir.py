"""Shamir secret sharing of a short byte string over the prime field GF(2**521 - 1).

The secret (at most 65 bytes; secure aggregation shares 32-byte keys and seeds) is read as
one big-endian integer ``s < 2**520 < p`` and becomes the constant term of a random
polynomial ``f`` of degree ``t - 1`` over GF(p), p = 2**521 - 1 (a Mersenne prime). Share
``i`` is the point ``(i, f(i))`` for i = 1..n. Any ``t`` shares determine ``f`` and so
``s = f(0)`` (Lagrange interpolation at 0); any ``t - 1`` shares are consistent with every
secret, so they reveal nothing about it (information-theoretic, not computational).

One field element per secret (rather than 16-byte chunks over 2**127 - 1, which would not
even fit: 16 bytes are 128 bits) keeps a share a single integer. A share's ``y`` travels as
:data:`FIELD_BYTES` big-endian bytes.

What is secret: the secret and every share ``y``; ``x`` (the holder's index) is public.
Shares made with an injected ``rng`` are only as unpredictable as that source: inject one
in tests only.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Protocol

PRIME = 2**521 - 1
FIELD_BYTES = 66  # ceil(521 / 8): the width of a share's y on the wire
MAX_SECRET_BYTES = 65  # 520 bits, below the prime


class _RandomSource(Protocol):
    def randrange(self, stop: int) -> int: ...


def share(secret: bytes, n: int, t: int, rng: _RandomSource | None = None) -> list[tuple[int, int]]:
    """``n`` shares ``(x, y)`` of ``secret``, x = 1..n, any ``t`` of which reconstruct it.

    ``1 <= t <= n``; ``y`` is an integer in [0, p). The polynomial's coefficients come from
    :mod:`secrets` unless ``rng`` (a ``random.Random``-like object, for tests only) is
    given. Raises ``TypeError``/``ValueError`` on a bad argument.
    """
    if not isinstance(secret, (bytes, bytearray)):
        raise TypeError(f"secret: expected bytes, got {type(secret).__name__}")
    if len(secret) > MAX_SECRET_BYTES:
        raise ValueError(f"secret: at most {MAX_SECRET_BYTES} bytes fit in one field element, got {len(secret)}")
    _check_int(n, "n")
    _check_int(t, "t")
    if not 1 <= t <= n:
        raise ValueError(f"t: must satisfy 1 <= t <= n = {n}, got {t}")
    draw = secrets.randbelow if rng is None else rng.randrange
    coeffs = [int.from_bytes(secret, "big")] + [draw(PRIME) for _ in range(t - 1)]
    out = []
    for x in range(1, n + 1):
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        out.append((x, y))
    return out


def reconstruct(shares: Sequence[tuple[int, int]], t: int, size: int = 32) -> bytes:
    """The ``size``-byte secret behind ``shares`` (at least ``t`` of them, distinct x).

    Interpolates at 0 through all the given shares. Raises ``ValueError`` (``TypeError``
    for a non-integer) when fewer than
    ``t`` shares are given, an x repeats, a value is outside the field, or the result does
    not fit in ``size`` bytes (a sign of inconsistent shares, or of fewer shares than the
    ``t`` they were made with: a random field element fits 32 bytes with probability 2**-265).
    """
    _check_int(t, "t")
    _check_int(size, "size")
    if not 0 <= size <= MAX_SECRET_BYTES:
        raise ValueError(f"size: must be in [0, {MAX_SECRET_BYTES}], got {size}")
    if t < 1:
        raise ValueError(f"t: must be >= 1, got {t}")
    if len(shares) < t:
        raise ValueError(f"{len(shares)} shares cannot reconstruct a secret shared with threshold {t}")
    seen: set[int] = set()
    for i, item in enumerate(shares):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError(f"shares[{i}]: expected a pair (x, y)")
        x, y = item
        _check_int(x, f"shares[{i}].x")
        _check_int(y, f"shares[{i}].y")
        if not 0 < x < PRIME:
            raise ValueError(f"shares[{i}].x: must be in [1, p), got {x}")
        if not 0 <= y < PRIME:
            raise ValueError(f"shares[{i}].y: must be in [0, p)")
        if x in seen:
            raise ValueError(f"shares[{i}].x: x = {x} appears twice; each share must come from a different holder")
        seen.add(x)
    s = _at_zero([(x, y) for x, y in shares])
    if s >= 1 << (8 * size):
        raise ValueError(
            f"the shares do not reconstruct a {size}-byte secret: they are inconsistent, or fewer than "
            "the threshold they were made with"
        )
    return s.to_bytes(size, "big")


def y_to_bytes(y: int) -> bytes:
    """A share's ``y`` as :data:`FIELD_BYTES` big-endian bytes (its wire form)."""
    return y.to_bytes(FIELD_BYTES, "big")


def y_from_bytes(data: bytes) -> int:
    """The inverse of :func:`y_to_bytes`; ``ValueError`` on a wrong length or a value >= p."""
    if len(data) != FIELD_BYTES:
        raise ValueError(f"a share is {FIELD_BYTES} bytes, got {len(data)}")
    y = int.from_bytes(data, "big")
    if y >= PRIME:
        raise ValueError("a share's value is outside the field")
    return y


def _at_zero(points: list[tuple[int, int]]) -> int:
    # f(0) = sum_i y_i * prod_{j != i} x_j / (x_j - x_i)
    total = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
    return total


def _check_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__}")
