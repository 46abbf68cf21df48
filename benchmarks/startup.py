"""Start-up time of the command line: ``python -c "import medfed.cli"`` for this checkout
against another commit, in alternating runs (the machine's load drifts; a ratio measured
side by side does not).

    python benchmarks/startup.py --against 0c14d0d --runs 15
    python benchmarks/startup.py --against 8d16ee8 --report RUN_DIR

``--report RUN_DIR`` times instead a fresh process that imports the report's module and
writes the report of a run folder (what ``medfed run`` does once training is over).

The other commit is checked out in a temporary git worktree and imported from its
``src/`` (the same virtual environment, the same packages).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def once(src: Path, code: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(src)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", default="0c14d0d", help="the commit to compare with (default 0c14d0d)")
    ap.add_argument("--runs", type=int, default=15, help="runs of each, alternating (default 15)")
    ap.add_argument("--report", type=Path, help="time writing this run folder's report instead")
    args = ap.parse_args()
    code, what = "import medfed.cli", "import medfed.cli"
    if args.report is not None:
        code = ("from pathlib import Path; from medfed.tracking.report import write_report; "
                f"write_report(Path({str(args.report.resolve())!r}))")
        what = f"import medfed.tracking.report and write the report of {args.report}"
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        other = Path(tmp) / "other"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(other), args.against], cwd=ROOT, check=True)
        try:
            times: dict[str, list[float]] = {"this": [], args.against: []}
            for _ in range(args.runs):
                times["this"].append(once(ROOT / "src", code))
                times[args.against].append(once(other / "src", code))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(other)], cwd=ROOT, check=True)
    this, then = statistics.median(times["this"]), statistics.median(times[args.against])
    print(f"# {what}, {args.runs} alternating runs each, {date.today()}, Python "
          f"{sys.version.split()[0]}; this checkout at {head.strip()} (with its uncommitted changes)")
    print("| source | median ms | min ms |\n|---|---:|---:|")
    for name, t in times.items():
        print(f"| {name} | {1000 * statistics.median(t):.1f} | {1000 * min(t):.1f} |")
    print(f"\nratio this / {args.against}: {this / then:.3f}")


if __name__ == "__main__":
    main()
