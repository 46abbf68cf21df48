"""What glibc's allocator costs a training loop: the plain PyTorch FedAvg loop
(plain_loop.py) on overhead.py's workload, with glibc's own malloc thresholds and with the
thresholds medfed sets in every process that trains (src/medfed/core/allocator.py), in
alternating runs: wall time, CPU time in user and kernel mode, and minor page faults.

    python benchmarks/allocator.py [--sites 100] [--images 100] [--runs 4]

Linux with glibc only (the thresholds are glibc's environment variables here).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from overhead import job_body  # noqa: E402

from medfed.core.allocator import as_environment  # noqa: E402

SETTINGS = {"glibc's own": {}, "medfed's": as_environment()}


def once(job: Path, extra: dict[str, str]) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in as_environment()}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(HERE / "plain_loop.py"), str(job)], env={**env, **extra}, check=True,
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall": wall, "user": after.ru_utime - before.ru_utime, "sys": after.ru_stime - before.ru_stime,
            "faults": after.ru_minflt - before.ru_minflt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=100)
    ap.add_argument("--images", type=int, default=100, help="training images per site")
    ap.add_argument("--runs", type=int, default=4, help="runs of each setting, alternating")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.yaml"
        job.write_text(yaml.safe_dump(job_body(args.sites, args.images, Path(tmp) / "unused")))
        rows: dict[str, list[dict[str, float]]] = {name: [] for name in SETTINGS}
        for i in range(args.runs):
            for name in (list(SETTINGS) if i % 2 == 0 else list(SETTINGS)[::-1]):
                r = once(job, SETTINGS[name])
                rows[name].append(r)
                print(f"  {name:12s} run {i}: wall {r['wall']:.2f} s, user {r['user']:.2f} s, kernel {r['sys']:.2f} s, "
                      f"{r['faults'] / 1e6:.2f} M page faults", flush=True)
    print(f"\n{args.sites} sites x {args.images} images, plain_loop.py, {args.runs} runs each (median; range)\n")
    print("| malloc thresholds | wall s | user CPU s | kernel CPU s | minor page faults (M) |")
    print("| --- | --- | --- | --- | --- |")
    for name, rs in rows.items():
        def cell(key: str, scale: float = 1.0, fmt: str = ".2f") -> str:
            xs = [r[key] / scale for r in rs]
            return f"{statistics.median(xs):{fmt}} ({min(xs):{fmt}}-{max(xs):{fmt}})"
        print(f"| {name} | {cell('wall')} | {cell('user')} | {cell('sys')} | {cell('faults', 1e6)} |")


if __name__ == "__main__":
    main()
