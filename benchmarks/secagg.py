"""Cost of secure aggregation against a plain sum, per round, on this machine.

    python benchmarks/secagg.py [--sites 3,5,10,20] [--params 1000000,10000000] [--repeats 3]

For each number of sites n and model size P (float32 parameters) it times, side by side
in one process:

* plain: the float64 sum of the n changes (what the server does without protection);
* secure: one whole round of the protocol through medfed's code (privacy/secagg):
  key advertisement, encrypted Shamir shares (threshold n//2+1), fixed-point encoding and
  masking at every site, the server's masked sum, the unmasking answers and the mask
  removal, with one site dropping after it sent its shares (so a dropped site's pairwise
  masks are rebuilt, the costly case);
* and the bytes: a float32 change is 4 bytes per parameter, a masked ring vector is sent
  as int64 (8 bytes per parameter).

All sites run in this one process, one after another, so "secure" is the sum of every
site's work and the server's; a real site does only its own share of it. Times are
medians over ``--repeats``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from medfed.privacy.secagg.masking import FixedPoint
from medfed.privacy.secagg.protocol import default_threshold, run_round


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", default="3,5,10,20")
    ap.add_argument("--params", default="1000000,10000000")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    for p in (int(x) for x in args.params.split(",")):
        for n in (int(x) for x in args.sites.split(",")):
            g = torch.Generator().manual_seed(0)
            changes = [torch.randn(p, generator=g) * 0.01 for _ in range(n)]
            codec = FixedPoint(1.0, n)
            names = [f"site{i:02d}" for i in range(n)]

            def plain() -> torch.Tensor:
                acc = torch.zeros(p, dtype=torch.float64)
                for c in changes:
                    acc += c.double()
                return acc

            def secure() -> torch.Tensor:
                ring = {s: codec.encode(c, torch.Generator().manual_seed(i)) for i, (s, c) in enumerate(zip(names, changes))}
                total = run_round(ring, default_threshold(n), drop_after_masking=(), drop_before_masking=(names[-1],))
                return codec.decode_sum(total)

            # the result is right before it is timed: the secure sum equals the plain one up to rounding
            expected = plain() - changes[-1].double()
            err = float((secure() - expected).abs().max())
            assert err < n * codec.step, err
            t_plain, t_secure = _time(plain, args.repeats), _time(secure, args.repeats)
            rows.append((p, n, t_plain, t_secure, err))
            print(f"P={p:>10,} n={n:>3}: plain {t_plain:.3f} s, secure {t_secure:.3f} s "
                  f"({t_secure / t_plain:.0f}x), max error {err:.1e}", flush=True)
    print()
    print("| parameters | sites | plain sum (s) | secure round (s) | ratio | secure per site (s) | max error |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for p, n, tp, ts, err in rows:
        print(f"| {p:,} | {n} | {tp:.3f} | {ts:.3f} | {ts / tp:.0f} | {ts / n:.3f} | {err:.1e} |")


if __name__ == "__main__":
    main()
