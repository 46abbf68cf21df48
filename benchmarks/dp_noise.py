"""What the cryptographically secure DP noise of a deployment costs (privacy/noise.py).

Usage: python benchmarks/dp_noise.py [--n 10000000] [--repeats 3] [--threads 1]

Times ``n`` Gaussians (float32, as a model's change) from :class:`SecureNoise` (ChaCha20
keystream under fresh OS keys, Box-Muller in float64, then cast), from its keystream alone,
and from the seeded torch generator a simulation uses; best of ``--repeats``, after one
untimed warm-up. One thread by default: what a site gives the noise between training
rounds is small, and other work may share the machine.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from medfed.privacy import noise
from medfed.privacy.noise import SecureNoise, SeededNoise, seeded_generator


def best(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = args.n
    secure, seeded = SecureNoise(), SeededNoise(seeded_generator(0, 1))

    def keystream() -> None:
        for at in range(0, n, noise.CHUNK):
            noise._keystream_words(min(noise.CHUNK, n - at))

    rows = [
        ("secure: ChaCha20 + Box-Muller (deployment)", best(lambda: secure.normal((n,), torch.float32), args.repeats)),
        ("  of which the ChaCha20 keystream", best(keystream, args.repeats)),
        ("seeded torch.randn (simulation)", best(lambda: seeded.normal((n,), torch.float32), args.repeats)),
    ]
    print(f"{n:,} Gaussians, float32, {args.threads} thread(s), best of {args.repeats}; "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}")
    for name, s in rows:
        print(f"  {name:45s} {s:7.3f} s   {n / s / 1e6:7.1f} M/s")


if __name__ == "__main__":
    main()
