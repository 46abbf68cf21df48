"""FedAvg with a server against cyclical weight transfer, the three swarm merges, split
learning and SplitFed, under feature shift, label skew and (when ../shared/data is
present) BreastMNIST.

Usage: python benchmarks/topologies.py [--seeds 0,1,2] [--rounds 20] [--settings ...]

The settings, model and training budget are those of benchmarks/algorithms.py (small CNN,
``rounds`` rounds of 1 local epoch, SGD lr 0.02, momentum 0.9; FedAvg as the algorithm of
every topology). For each setting, topology and seed it records, at the last round, the
federated model's per-site test AUC (site mean and worst site), for gossip and
BrainTorrent also each site's own model on its own test split, the tensor bytes the sites
sent over the run (per site; for split learning the activations and gradients at the cut
plus the site layers passed on, and also the bytes received), and the wall time of the
run; it prints a Markdown table of the means (± standard deviation over seeds). Split
learning cuts the small CNN after its second block (``features.1``): each site keeps the
first two blocks and the linear head, the server the third block and the pooling; the "no
U" arms (``u_shaped: false``) leave the head and the loss to the server too, the sites
sending each batch's labels with its activations.

``--topologies`` picks arms by label (comma-separated), e.g. ``--topologies "split
(sequential),SplitFed v1"``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from algorithms import BREAST, data_for, read, summarize  # noqa: E402  (the same settings and summary)

from medfed.config import parse_job  # noqa: E402
from medfed.server.runner import run_job  # noqa: E402
from medfed.site.device import set_threads  # noqa: E402

TOPOLOGIES = {
    "server (FedAvg)": {"kind": "server"},
    "cyclic, fixed order": {"kind": "cyclic"},
    "cyclic, shuffled": {"kind": "cyclic", "order": "shuffled"},
    "swarm leader": {"kind": "swarm", "merge": "leader"},
    "swarm gossip (2 peers)": {"kind": "swarm", "merge": "gossip", "peers": 2},
    "swarm braintorrent": {"kind": "swarm", "merge": "braintorrent"},
    "split (sequential)": {"kind": "split", "cut": "features.1"},
    "SplitFed v1": {"kind": "split", "cut": "features.1", "parallel": True},
    "split (no U)": {"kind": "split", "cut": "features.1", "u_shaped": False},
    "SplitFed (no U)": {"kind": "split", "cut": "features.1", "parallel": True, "u_shaped": False},
}


def job_for(setting: str, seed: int, topology: dict, rounds: int, out: Path):
    return parse_job({
        "name": f"{setting}-{topology['kind']}-{seed}", "seed": seed, "output": str(out), "rounds": rounds,
        "threads": 2, "device": "cpu", "data": data_for(setting, seed),
        "model": {"name": "small_cnn", "width": 16}, "task": {"labels": "binary", "monitor": "auc"},
        "topology": topology, "train": {"local_epochs": 1, "batch_size": 32, "lr": 0.02, "momentum": 0.9},
    })


def bytes_per_site(recs: list[dict], metric: str = "bytes_sent") -> float | None:
    """The ``metric`` bytes summed over the run, per site that recorded any (None: none did)."""
    sent = [r["value"] for r in recs if r["arm"] == "federated" and r["metric"] == metric
            and r["site"] not in ("all", "median") and r["value"] is not None]
    sites = {r["site"] for r in recs if r["arm"] == "federated" and r["metric"] == metric
             and r["site"] not in ("all", "median")}
    return sum(sent) / len(sites) if sites else None


def arm_labels(text: str) -> list[str]:
    """The labels of ``--topologies``, comma-separated (a label may hold a comma itself:
    "cyclic, fixed order")."""
    out, part = [], ""
    for piece in text.split(","):
        part = f"{part},{piece}" if part else piece.strip()
        if part in TOPOLOGIES:
            out.append(part)
            part = ""
    if part:
        raise SystemExit(f"--topologies: unknown arm '{part}'; the arms are: {'; '.join(TOPOLOGIES)}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--settings", default="feature-shift,label-skew,breastmnist")
    ap.add_argument("--topologies", default=",".join(TOPOLOGIES))
    args = ap.parse_args()
    arms = {label: TOPOLOGIES[label] for label in arm_labels(args.topologies)}
    seeds = [int(s) for s in args.seeds.split(",")]
    set_threads(2)
    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:  # one untimed run first: imports and caches warm
        run_job(job_for("label-skew", 0, TOPOLOGIES["server (FedAvg)"], 1, Path(tmp) / "warm-up"))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for setting in args.settings.split(","):
            if setting == "breastmnist" and not BREAST.is_file():
                print(f"skipping breastmnist: {BREAST} not found")
                continue
            for seed in seeds:
                for i, (label, topology) in enumerate(arms.items()):
                    out = Path(tmp) / f"{setting}-{seed}-{i}"
                    start = time.perf_counter()
                    run_job(job_for(setting, seed, topology, args.rounds, out))
                    wall = time.perf_counter() - start
                    recs = read(out)
                    row = summarize(recs, "federated", args.rounds)
                    row.update(bytes=bytes_per_site(recs) or 0.0, received=bytes_per_site(recs, "bytes_received"), wall=wall)
                    if any(r["arm"] == "personalized" for r in recs):
                        own = summarize(recs, "personalized", args.rounds)
                        row.update(own_auc=own["auc"], own_worst=own["worst_auc"])
                    results.setdefault((setting, label), []).append(row)
                    print(f"  {setting} seed {seed} {label}: {row} ({time.perf_counter() - t0:.0f} s)", flush=True)

    def ms(vals: list, digits: int = 3) -> str:
        vals = [v for v in vals if v is not None]
        if not vals:
            return "–"
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{statistics.mean(vals):.{digits}f} ± {sd:.{digits}f}"

    print("\n| setting | topology | test AUC, site mean | worst site AUC | own models: site mean / worst | "
          "MB sent per site | MB received per site | wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for (setting, label), rows in results.items():
        own = "–"
        if any("own_auc" in r for r in rows):
            own = f"{ms([r.get('own_auc') for r in rows])} / {ms([r.get('own_worst') for r in rows])}"
        mb = statistics.mean(r["bytes"] for r in rows) / 1e6
        got = [r["received"] for r in rows if r["received"] is not None]
        received = f"{statistics.mean(got) / 1e6:.2f}" if got else "–"
        print(f"| {setting} | {label} | {ms([r['auc'] for r in rows])} | {ms([r['worst_auc'] for r in rows])} | "
              f"{own} | {mb:.2f} | {received} | {ms([r['wall'] for r in rows], 1)} |")
    print(f"\n{len(seeds)} seeds, {args.rounds} rounds; mean ± standard deviation over seeds; "
          f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
