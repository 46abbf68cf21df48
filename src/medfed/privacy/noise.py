"""Where differential privacy's Gaussian noise comes from.

* :class:`SeededNoise`: PyTorch's generator (Mersenne Twister) seeded from the job seed
  and the round: a simulation repeats bit for bit.
* :class:`SecureNoise`: a cryptographically secure stream, for deployments. Each draw of
  up to :data:`CHUNK` values takes a fresh 256-bit key from the operating system
  (``os.urandom``) and runs ChaCha20 (OpenSSL, through ``cryptography``) from block 0 over
  zero bytes; the keystream's 64-bit words give uniforms with 53 random bits, which the
  Box-Muller transform turns into Gaussians, in float64, cast to the dtype asked for at
  the end. Nothing about the stream can be predicted from earlier noise or from the job.

Box-Muller from 53-bit uniforms: ``u1`` in (0, 1], ``u2`` in [0, 1), ``r = sqrt(-2 ln u1)``,
``z = (r cos 2 pi u2, r sin 2 pi u2)``. The largest ``|z|`` it can give is
``sqrt(106 ln 2)`` (about 8.57), a tail of probability below 1e-17 per draw. Like any
floating-point sampler it does not remove the side channels of floating-point noise
(Mironov, CCS 2012): it makes the noise unpredictable, not exactly Gaussian.

Speed (benchmarks/dp_noise.py, benchmarks/RESULTS.md): 0.17 s for 10 million values on
one core, about 3x the seeded torch generator; small next to a round of training.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Sequence

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

CHUNK = 1 << 20  # Gaussians per key: 8 MiB of keystream
_TWO_PI = 2.0 * math.pi
_STEP = 2.0**-53


def seeded_generator(seed: int | None, *words: int) -> torch.Generator:
    """A torch generator seeded reproducibly from ``(seed, *words)``, or from the OS when
    ``seed`` is None (not a cryptographic generator: DP noise in a deployment uses
    :class:`SecureNoise`)."""
    g = torch.Generator()
    if seed is None:
        g.manual_seed(secrets.randbits(63))
    else:
        state = np.random.SeedSequence([seed, *words]).generate_state(2, dtype=np.uint32)
        g.manual_seed((int(state[0]) << 31) ^ int(state[1]))
    return g


class SeededNoise:
    """Gaussian noise from a torch generator (simulations: repeatable)."""

    secure = False

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def normal(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """i.i.d. N(0, 1) of ``shape`` in ``dtype``: ``torch.randn`` on the generator."""
        return torch.randn(tuple(shape), generator=self.generator, dtype=dtype)


def _keystream_words(count: int) -> np.ndarray:
    """``count`` uint64 words of a ChaCha20 keystream under a fresh OS key."""
    key, nonce = os.urandom(32), bytes(4) + os.urandom(12)  # counter 0 | 96-bit nonce
    enc = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
    return np.frombuffer(enc.update(bytes(8 * count)), dtype="<u8")


def _gaussian_chunk(n: int) -> torch.Tensor:
    """``n`` (even) N(0, 1) values in float64: Box-Muller on ``n`` keystream words."""
    words = _keystream_words(n).reshape(2, n // 2) >> np.uint64(11)
    u1 = torch.from_numpy((words[0] + np.uint64(1)).astype(np.float64)).mul_(_STEP)  # (0, 1]: log never sees 0
    angle = torch.from_numpy(words[1].astype(np.float64)).mul_(_STEP * _TWO_PI)
    r = u1.log_().mul_(-2.0).sqrt_()
    return torch.cat((r * torch.cos(angle), r.mul_(torch.sin(angle))))


class SecureNoise:
    """Gaussian noise from a cryptographically secure generator (deployments): see the
    module docstring. Every call draws fresh keys; nothing is kept between calls."""

    secure = True

    def normal(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """i.i.d. N(0, 1) of ``shape``, computed in float64 and cast to ``dtype``."""
        shape = tuple(shape)
        n = math.prod(shape)
        out = torch.empty(n, dtype=torch.float64)
        for at in range(0, n, CHUNK):
            m = min(CHUNK, n - at)
            out[at : at + m] = _gaussian_chunk(m + (m & 1))[:m]
        return out.reshape(shape).to(dtype)


def noise_source(seed: int | None, *words: int) -> SeededNoise | SecureNoise:
    """The noise of one use: repeatable from ``(seed, *words)`` when ``seed`` is an int (a
    simulation); :class:`SecureNoise` when it is None (a deployment)."""
    return SecureNoise() if seed is None else SeededNoise(seeded_generator(seed, *words))
