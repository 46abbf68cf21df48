"""The cost of split learning's per-batch exchange over mutual TLS on 127.0.0.1.

Usage: python benchmarks/split_deployment.py [--repeats 3] [--rounds 2] [--n-train 160]
                                             [--image-size 32] [--width 16] [--batch-size 32]
                                             [--cut features.0] [--parallel] [--out FILE.json]

The same split job (synthetic data, three sites, small_cnn) runs in simulation (the
in-process channel, ``medfed.run``) and deployed (``medfed server`` and three ``medfed
site`` processes with kits from ``medfed.transport.pki.provision``), alternating, ``--repeats``
times each; each figure is the median over the repeats:

* wall time per round: from the server's "split round r ... started" log line to its
  "split round r ... done" (the turns and the evaluation of the round's model), averaged
  over the rounds of a run;
* the sites' turns per round: the same, training only (the server's "the sites' turns took"
  line; the rest of a round is the evaluation of its model at every site);
* per-batch round trip: simulation, the time of one ``InProcessChannel`` call (the middle's
  forward, or its backward and step, and the copies); deployment, as each site measures it
  (``GrpcSplitChannel.round_trips``: from sending the tensor to having the reply decoded),
  the median of the sites' per-round medians from their logs;
* bytes per round per site: the tensors that cross the cut and the site parts passed on
  (``bytes_sent`` + ``bytes_received`` in metrics.jsonl, the same in both), and in the
  deployment what travelled on the wire: the Split call's frames and the fit and
  evaluation tasks' payloads (the audit trail).

Timings on a shared or busy machine are not figures to quote; run it on an idle one.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

SITES = ("hospital_a", "hospital_b", "hospital_c")
STAMP = "%Y-%m-%dT%H:%M:%S.%f"


def job_dict(args: argparse.Namespace, output: Path) -> dict:
    return {
        "name": "split-bench", "seed": 0, "output": str(output), "rounds": args.rounds, "threads": 1, "device": "cpu",
        "round_timeout": 300,
        "data": {"source": "synthetic", "image_size": args.image_size, "sites": [
            {"name": s, "n_train": args.n_train, "n_val": 20, "n_test": 20, "prevalence": 0.4} for s in SITES]},
        "model": {"name": "small_cnn", "width": args.width}, "task": {"labels": "binary"},
        "train": {"batch_size": args.batch_size, "lr": 0.02}, "compare": [],
        "topology": {"kind": "split", "cut": args.cut, "parallel": args.parallel},
    }


def turn_seconds(run_log: Path) -> float:
    """Mean seconds per round of the sites' turns (training only) from the server's log."""
    return statistics.mean(float(s) for s in re.findall(r"the sites' turns took ([\d.]+) s", run_log.read_text()))


def round_seconds(run_log: Path) -> float:
    """Mean seconds per round from the server's log lines."""
    started, done = {}, {}
    for line in run_log.read_text().splitlines():
        m = re.match(r"(\S+) INFO split round (\d+)/\d+ .*?(started|done)", line)
        if m:
            (started if m.group(3) == "started" else done)[int(m.group(2))] = datetime.strptime(m.group(1), STAMP)
    spans = [(done[r] - started[r]).total_seconds() for r in done if r in started]
    return statistics.mean(spans)


def cut_bytes(run: Path) -> float:
    """Mean tensor bytes per round per site at the cut, site parts included (metrics.jsonl)."""
    per: dict[tuple, float] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["metric"] in ("bytes_sent", "bytes_received") and r["site"] in SITES:
            per[(r["round"], r["site"])] = per.get((r["round"], r["site"]), 0.0) + r["value"]
    return statistics.mean(per.values())


def simulate(args: argparse.Namespace, tmp: Path) -> dict:
    import medfed
    from medfed.server import split as server_split
    from medfed.site.split import InProcessChannel

    trips: list[float] = []

    class Timed(InProcessChannel):
        def forward(self, activations):
            t0 = time.perf_counter()
            out = super().forward(activations)
            trips.append(time.perf_counter() - t0)
            return out

        def backward(self, gradient):
            t0 = time.perf_counter()
            out = super().backward(gradient)
            trips.append(time.perf_counter() - t0)
            return out

    real = server_split.InProcessChannel
    server_split.InProcessChannel = Timed
    try:
        run = medfed.run(job_dict(args, tmp / "sim"), progress=False).run_dir
    finally:
        server_split.InProcessChannel = real
    return {"round_s": round_seconds(run / "run.log"), "turns_s": turn_seconds(run / "run.log"),
            "round_trip_ms": 1000 * statistics.median(trips),
            "cut_bytes_per_round_site": cut_bytes(run)}


def deploy(args: argparse.Namespace, tmp: Path) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from deploy_kits import make_kits, start, stop

    kits, port = make_kits(tmp)
    job = tmp / "job.yaml"
    job.write_text(yaml.safe_dump(job_dict(args, tmp / "deployed")))
    server = start(["server", "--kit", str(kits / "server"), "--job", str(job), "--listen", f"127.0.0.1:{port}"],
                   tmp / "server.log")
    sites = {s: start(["site", "--kit", str(kits / s), "--give-up-after", "120"], tmp / f"{s}.log") for s in SITES}
    try:
        if server.wait(timeout=1800) != 0:
            raise SystemExit((tmp / "server.log").read_text()[-3000:])
        for p in sites.values():
            p.wait(timeout=60)
    finally:
        stop(server, *sites.values())
    run = tmp / "deployed"
    trips = [float(m) for s in SITES for m in re.findall(r"median round trip ([\d.]+) ms", (tmp / f"{s}.log").read_text())]
    with sqlite3.connect(run / "state.sqlite") as db:
        rows = db.execute("SELECT round, site, kind, bytes_sent + bytes_received FROM audit "
                          "WHERE kind IN ('split', 'fit', 'evaluate') AND arm = 'federated'").fetchall()
    wire: dict[tuple, float] = {}
    split_only: dict[tuple, float] = {}
    for rnd, site, kind, n in rows:
        wire[(rnd, site)] = wire.get((rnd, site), 0.0) + n
        if kind == "split":
            split_only[(rnd, site)] = split_only.get((rnd, site), 0.0) + n
    return {"round_s": round_seconds(run / "run.log"), "turns_s": turn_seconds(run / "run.log"),
            "round_trip_ms": statistics.median(trips),
            "cut_bytes_per_round_site": cut_bytes(run),
            "split_call_bytes_per_round_site": statistics.mean(split_only.values()),
            "wire_bytes_per_round_site": statistics.mean(wire.values())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--n-train", type=int, default=160)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cut", default="features.0")
    p.add_argument("--parallel", action="store_true", help="SplitFed v1 (default: sequential split learning)")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = p.parse_args()
    runs: dict[str, list[dict]] = {"simulation": [], "deployment": []}
    for i in range(args.repeats):  # alternating, so that a change in the machine's load hits both
        with tempfile.TemporaryDirectory() as d:
            runs["simulation"].append(simulate(args, Path(d)))
        with tempfile.TemporaryDirectory() as d:
            runs["deployment"].append(deploy(args, Path(d)))
        print(f"repeat {i + 1}/{args.repeats}: simulation {runs['simulation'][-1]}, deployment "
              f"{runs['deployment'][-1]}", flush=True)
    medians = {mode: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for mode, rs in runs.items()}
    result = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(copy.copy(args)).items()},
              "median": medians, "runs": runs}
    print(json.dumps(medians, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
