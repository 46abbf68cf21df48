"""The server's memory against the number of sites drawn in a round, with the round's
updates past the memory budget spooled to disk (src/medfed/transport/spool.py) and without.

A ResNet-18 (11.2 M parameters, 45 MB of float32) trained in-process by SITES sites of a
few synthetic images each, every site drawn in every round: each arm is `medfed run` of
the same job in a fresh process, with ``MEDFED_UPDATES_BUDGET`` set to "all in memory"
(a budget no round reaches: the run as before spooling existed), to medfed's default
budget, and to 0 (every update on disk). Reported: the peak resident memory of the run's
process, the wall time, and whether the final models are the same bit for bit.

    python benchmarks/spool.py [--sites 10,40] [--runs 1]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from overhead import job_body, measured  # noqa: E402

from medfed.transport.spool import ENVIRONMENT, UPDATES_BUDGET  # noqa: E402

ARMS = {"all in memory": str(1 << 50), f"default ({UPDATES_BUDGET >> 20} MiB)": str(UPDATES_BUDGET), "all on disk": "0"}


def job(sites: int, out: Path) -> dict:
    body = job_body(sites, 8, out)
    body.update(name=f"spool-{sites}", rounds=2, eval_every=2, threads=2)
    body["model"] = {"name": "resnet18"}
    body["data"]["image_size"] = 32
    for s in body["data"]["sites"]:
        s.update(n_val=4, n_test=4)
    body["train"]["batch_size"] = 8
    return body


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", default="10,40", help="comma-separated numbers of sites (all drawn every round)")
    ap.add_argument("--runs", type=int, default=1, help="runs of each arm, alternating; medians reported")
    args = ap.parse_args()
    print("| sites drawn | arm | peak RSS MiB | wall s | final model |")
    print("| ---: | --- | ---: | ---: | --- |")
    for n in [int(x) for x in args.sites.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            rows: dict[str, list[tuple[float, float]]] = {a: [] for a in ARMS}
            digests: dict[str, str] = {}
            for i in range(args.runs):
                for arm in (list(ARMS) if i % 2 == 0 else list(ARMS)[::-1]):
                    out = Path(tmp) / f"{arm}-{i}".replace(" ", "_")
                    path = Path(tmp) / "job.yaml"
                    path.write_text(yaml.safe_dump(job(n, out)))
                    os.environ[ENVIRONMENT] = ARMS[arm]
                    wall, rss, _, _ = measured(["medfed", "run", str(path), "--quiet"])
                    rows[arm].append((rss, wall))
                    digest = hashlib.sha256((out / "model_final.safetensors").read_bytes()).hexdigest()
                    digests.setdefault(arm, digest)
                    print(f"  {n} sites, {arm}, run {i}: peak RSS {rss:.0f} MiB, {wall:.1f} s", file=sys.stderr)
            reference = digests[next(iter(ARMS))]
            for arm, values in rows.items():
                rss = statistics.median(v[0] for v in values)
                wall = statistics.median(v[1] for v in values)
                same = "same" if digests[arm] == reference else "DIFFERS"
                print(f"| {n} | {arm} | {rss:.0f} | {wall:.1f} | {same} |")


if __name__ == "__main__":
    main()
