"""A thousand sites on one machine: start-up, memory and per-round overhead against N.

Usage: python benchmarks/scale.py [--sites 100,300,1000] [--rounds 5] [--repeats 1]
       python benchmarks/scale.py --results FILE...   (the table of earlier --json lines)
       python benchmarks/scale.py --callback [--sites 100,1000,10000]

Each N runs in a fresh process of its own (so that its peak memory is its own), one after
another: the in-process simulation (``run_job`` on a parsed job) of N synthetic sites of
50 training images (10 val, 10 test; 1x28x28), the small CNN of width 8, 1 local epoch,
batch 32, 2 threads, FedAvg, 5% of the sites drawn per round, ``rounds`` rounds and
evaluation only after the last round (``eval_every = rounds``): medfed evaluates the
global model at every site in an evaluation round, which is measured apart.

Measured in the child, with the library untouched (``SiteApp.fit`` and
``SiteApp.evaluate`` are wrapped in timers, ``build_sites`` and ``build_site_apps`` in
timers that also read the resident memory after them; the round boundaries are the
"round N started" and "round N done" records of the medfed log):

* start-up: from reading the job file (``load_job``, as ``medfed run`` does) to "round 1
  started", split into the job file, the data, the site apps and the rest (run folder,
  job.yaml, model, federation);
* peak resident memory (``VmHWM`` of /proc/self/status), and the resident memory after
  the data were built and after the apps were built, so that data and per-site apps are
  told apart from what the server holds;
* per round: wall time, the time inside ``SiteApp.fit`` and ``SiteApp.evaluate``, and
  the overhead per selected site = (round - fit - evaluate) / selected sites, over the
  rounds without evaluation; the evaluation cost per site from the last round.

``--callback`` times only the run's checkpoint callback per round (server/runner.py), as
it is and hashing the job every round as it did before 2026-12-04.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def job_body(n: int, rounds: int, eval_every: int, out: Path) -> dict:
    return {
        "name": f"scale-{n}", "seed": 0, "output": str(out), "rounds": rounds, "eval_every": eval_every,
        "device": "cpu", "threads": 2, "transport": "inprocess",
        "data": {
            "source": "synthetic", "image_size": 28,
            "sites": [{"name": f"site{i:04d}", "n_train": 50, "n_val": 10, "n_test": 10,
                       "prevalence": 0.3 + 0.4 * (i % 3) / 2} for i in range(n)],
        },
        "sampling": {"fraction": 0.05},
        "model": {"name": "small_cnn", "width": 8},
        "task": {"labels": "binary", "monitor": "accuracy"},
        "train": {"local_epochs": 1, "batch_size": 32, "lr": 0.01, "optimizer": "sgd", "momentum": 0.9},
        "compare": [],
    }


def rss_mib(field: str = "VmRSS") -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1)) / 1024


def tensor_mib(sites) -> float:
    """Bytes of the tensors the sites' splits hold (images and labels), in MiB."""
    import torch

    total = 0
    for site in sites:
        for split in (site.train, site.val, site.test):
            total += sum(v.element_size() * v.nelement() for v in vars(split).values() if isinstance(v, torch.Tensor))
    return total / 2**20


def child(n: int, rounds: int, eval_every: int) -> dict:
    """One run of ``n`` sites in this process; the figures as a dict."""
    import yaml

    import medfed.data.sites as data_sites
    import medfed.site.app as site_app
    from medfed.config import load_job
    from medfed.server.runner import run_job
    from medfed.site.device import set_threads

    set_threads(2)
    marks: dict[str, float] = {}
    calls: dict[str, list[float]] = {"fit": [], "evaluate": []}  # seconds of each call, in order
    per_round: list[dict] = []

    def timed(name: str, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                calls[name].append(time.perf_counter() - t)
        return wrapper

    def staged(name: str, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            marks[name + "_s"] = time.perf_counter() - t
            marks[name + "_rss"] = rss_mib()
            if name == "data":
                marks["data_tensor_mib"] = tensor_mib(out)
            return out
        return wrapper

    site_app.SiteApp.fit = timed("fit", site_app.SiteApp.fit)
    site_app.SiteApp.evaluate = timed("evaluate", site_app.SiteApp.evaluate)
    data_sites.build_sites = staged("data", data_sites.build_sites)
    site_app.build_site_apps = staged("apps", site_app.build_site_apps)

    class Rounds(logging.Handler):
        started = re.compile(r"federated round (\d+)/\d+ started")
        done = re.compile(r"federated round (\d+)/\d+ done")

        def emit(self, record: logging.LogRecord) -> None:
            msg = record.getMessage()
            if self.started.match(msg):
                if "round1" not in marks:
                    marks["round1"] = time.perf_counter()
                    marks["round1_rss"] = rss_mib()
                self.t, self.fits, self.evals = time.perf_counter(), len(calls["fit"]), len(calls["evaluate"])
            elif self.done.match(msg):
                fits, evals = calls["fit"][self.fits:], calls["evaluate"][self.evals:]
                per_round.append({"wall": time.perf_counter() - self.t, "fit": sum(fits), "fits": len(fits),
                                  "evaluate": sum(evals), "evals": len(evals), "rss": rss_mib()})

    logging.getLogger("medfed").addHandler(Rounds(logging.INFO))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "job.yaml"  # read as `medfed run` reads it
        path.write_text(yaml.safe_dump(job_body(n, rounds, eval_every, Path(tmp) / "run"), sort_keys=False))
        rss0 = rss_mib()
        t0 = time.perf_counter()
        job = load_job(path)
        read_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        run_job(job)
        total = time.perf_counter() - t0
    rss_end = rss_mib()
    plain = [r for r in per_round if r["evals"] == 0]
    ev = [r for r in per_round if r["evals"]][-1]
    return {
        "sites": n, "selected": plain[0]["fits"], "rounds": rounds,
        "read_s": read_s, "startup_s": marks["round1"] - t0, "run_job_to_round1_s": marks["round1"] - t1,
        "data_s": marks["data_s"], "apps_s": marks["apps_s"],
        "rss_start": rss0, "rss_data": marks["data_rss"], "data_tensor_mib": marks["data_tensor_mib"],
        "rss_apps": marks["apps_rss"], "rss_round1": marks["round1_rss"],
        "rss_rounds_max": max(r["rss"] for r in plain), "rss_end": rss_end, "peak": rss_mib("VmHWM"),
        "round_s": statistics.median(r["wall"] for r in plain),
        "fit_s": statistics.median(r["fit"] for r in plain),
        "rest_ms": statistics.median(r["wall"] - r["fit"] - r["evaluate"] for r in plain) * 1000,
        "overhead_ms_per_site": statistics.median(
            (r["wall"] - r["fit"] - r["evaluate"]) / r["fits"] for r in plain) * 1000,
        "eval_round_s": ev["wall"],
        "eval_first_call_s": calls["evaluate"][0],
        "eval_ms_per_site": statistics.median(calls["evaluate"]) * 1000,
        "eval_mean_ms_per_site": ev["evaluate"] / ev["evals"] * 1000,
        "eval_round_rest_s": ev["wall"] - ev["fit"] - ev["evaluate"],
        "fit_ms_median": statistics.median(calls["fit"]) * 1000,
        "rss_rounds": [round(r["rss"]) for r in per_round],
        "total_s": total,
    }


def callback_side_by_side(sizes: list[int]) -> None:
    """The run's checkpoint callback per round at each N, alternating: as it is, and
    hashing the job every round as it did before 2026-12-04 (3 x 10 rounds each)."""
    import torch

    from medfed.config import parse_job
    from medfed.core.types import Arm
    from medfed.models import build_model, get_params
    from medfed.server.loop import RoundSummary
    from medfed.server.runner import _BestTracker

    torch.set_num_threads(2)

    class Before(_BestTracker):
        def __call__(self, s, params):
            self.job_hash = self.job.job_hash()
            super().__call__(s, params)

    for n in sizes:
        job = parse_job(job_body(n, 5, 5, Path(tempfile.gettempdir()) / "unused"))
        params = get_params(build_model(job.model, job.task, 1))
        times: dict[str, list[float]] = {"before": [], "after": []}
        for rep in range(3):
            order = [("before", Before), ("after", _BestTracker)]
            for name, cls in order if rep % 2 == 0 else order[::-1]:
                with tempfile.TemporaryDirectory() as tmp:
                    tracker = cls(Path(tmp), job)
                    for rnd in range(1, 11):
                        t = time.perf_counter()
                        tracker(RoundSummary(Arm.FEDERATED, rnd, 0.5, {"val": {"accuracy": rnd / 100}}), params)
                        times[name].append(time.perf_counter() - t)
        print(f"{n} sites: checkpoint callback per round, median of 30: hashing every round "
              f"{statistics.median(times['before']) * 1000:.1f} ms, once {statistics.median(times['after']) * 1000:.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", default="100,300,1000")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=1, help="runs per N (medians reported)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true", help="print each result as a JSON line too")
    ap.add_argument("--results", nargs="+", type=Path,
                    help="only print the table of the JSON lines in these files (earlier --json output)")
    ap.add_argument("--callback", action="store_true",
                    help="only time the checkpoint callback per round, hashing the job every round and once")
    args = ap.parse_args()
    if args.callback:
        callback_side_by_side([int(x) for x in args.sites.split(",")])
        return
    if args.child is not None:
        print(json.dumps(child(args.child, args.rounds, args.rounds)))
        return
    if args.results:
        lines = [x for f in args.results for x in f.read_text().splitlines() if x.startswith("{")]
        found = [json.loads(x) for x in lines]
        table([medians([r for r in found if r["sites"] == n]) for n in sorted({r["sites"] for r in found})])
        return
    rows = []
    for n in (int(s) for s in args.sites.split(",")):
        runs = []
        for _ in range(args.repeats):
            p = subprocess.run([sys.executable, __file__, "--child", str(n), "--rounds", str(args.rounds)],
                               check=False, capture_output=True, text=True)
            if p.returncode != 0:
                sys.exit(f"{n} sites failed:\n{p.stderr[-3000:]}")
            runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
            if args.json:
                print(json.dumps(runs[-1]), flush=True)
        rows.append(medians(runs))
    table(rows)


def medians(runs: list[dict]) -> dict:
    """Each figure's median over the runs of one N (lists and counts from the first)."""
    return {k: statistics.median(r[k] for r in runs) if isinstance(runs[0][k], float) else runs[0][k]
            for k in runs[0]} | {"runs": len(runs)}


def table(rows: list[dict]) -> None:
    print("\n| sites (drawn per round), runs | start-up s: job file / data / apps / rest | data MiB: RSS / tensors "
          "| server RSS MiB: round 1 / max of rounds 1-4 / end (peak) | round s (inside fit) | rest of the round ms "
          "| overhead ms per drawn site | evaluation ms per site: median, mean (first call s) | round with evaluation s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        rest = r["startup_s"] - r["read_s"] - r["data_s"] - r["apps_s"]
        print(f"| {r['sites']} ({r['selected']}), {r['runs']} | {r['startup_s']:.2f}: {r['read_s']:.2f} / {r['data_s']:.2f} / "
              f"{r['apps_s']:.2f} / {rest:.2f} | {r['rss_data'] - r['rss_start']:.0f} / {r['data_tensor_mib']:.0f} | "
              f"{r['rss_round1']:.0f} / {r['rss_rounds_max']:.0f} / {r['rss_end']:.0f} ({r['peak']:.0f}) | "
              f"{r['round_s']:.3f} ({r['fit_s']:.3f}) | {r['rest_ms']:.0f} | {r['overhead_ms_per_site']:.2f} | "
              f"{r['eval_ms_per_site']:.1f}, {r.get('eval_mean_ms_per_site', float('nan')):.1f} "
              f"({r['eval_first_call_s']:.1f}) | {r['eval_round_s']:.1f} |")
    if len(rows) > 1:  # rest of the round = fixed + slope x drawn sites, least squares
        ks = [r["selected"] for r in rows]
        ys = [r["rest_ms"] for r in rows]
        mk, my = statistics.mean(ks), statistics.mean(ys)
        slope = sum((k - mk) * (y - my) for k, y in zip(ks, ys)) / sum((k - mk) ** 2 for k in ks)
        print(f"\nrest of the round = {my - slope * mk:.1f} ms + {slope:.2f} ms x drawn sites (least squares)")


if __name__ == "__main__":
    main()
