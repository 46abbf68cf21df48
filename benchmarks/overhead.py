"""Overhead of medfed over a plain PyTorch FedAvg loop doing the same work.

Usage: python benchmarks/overhead.py [--sites 10 --per-site 2000] [--repeats 2]

For each scale it writes a job file (synthetic 1x28x28 images, small CNN, batch 32,
1 local epoch, 5 rounds, 2 threads, evaluation only after the last round) and runs, as
separate processes, alternately: ``medfed run JOB`` and ``benchmarks/plain_loop.py
JOB``. It reports whole-process wall time and their ratio, start-up time (launch to
round 1), time per round, peak resident memory (ru_maxrss of the child) and whether the
final test accuracy of every site is identical.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def job_body(sites: int, per_site: int, out: Path) -> dict:
    return {
        "name": f"overhead-{sites}x{per_site}",
        "seed": 0,
        "output": str(out),
        "rounds": 5,
        "eval_every": 5,
        "device": "cpu",
        "threads": 2,
        "transport": "inprocess",
        "data": {
            "source": "synthetic",
            "image_size": 28,
            "sites": [
                {"name": f"site{i:03d}", "n_train": per_site, "n_val": 20, "n_test": 50, "prevalence": 0.3 + 0.4 * (i % 3) / 2}
                for i in range(sites)
            ],
        },
        "model": {"name": "small_cnn", "width": 16},
        "task": {"labels": "binary", "monitor": "accuracy"},
        "train": {"local_epochs": 1, "batch_size": 32, "lr": 0.01, "optimizer": "sgd", "momentum": 0.9},
        "compare": [],
    }


def measured(cmd: list[str]) -> tuple[float, float, str, float]:
    """Run ``cmd`` under a fresh Python wrapper so ru_maxrss belongs to it alone."""
    wrapper = (
        "import resource,subprocess,sys,time,json;t=time.time();"
        "p=subprocess.run(sys.argv[1:],capture_output=True,text=True);"
        "w=time.time()-t;"
        "print(json.dumps({'rc':p.returncode,'wall':w,'t0':t,"
        "'rss':resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024,"
        "'out':p.stdout,'err':p.stderr[-3000:]}))"
    )
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
    res = json.loads(proc.stdout)
    if res["rc"] != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{res['err']}")
    return res["wall"], res["rss"], res["out"], res["t0"]


def medfed_timings(run_dir: Path, t0: float) -> tuple[float, list[float], dict]:
    lines = (run_dir / "run.log").read_text().splitlines()

    def stamp(line: str) -> float:
        return datetime.strptime(line.split(" ")[0], "%Y-%m-%dT%H:%M:%S.%f").timestamp()

    starts = [stamp(x) for x in lines if "round" in x and "started" in x]
    dones = [stamp(x) for x in lines if "round" in x and "done" in x]
    acc = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["metric"] == "accuracy" and r["site"] != "all" and r["split"] in ("val", "test"):
            acc[f"{r['site']}/{r['split']}"] = r["value"]
    return starts[0] - t0, [d - s for s, d in zip(starts, dones)], acc


def bench(sites: int, per_site: int, repeats: int) -> dict:
    medfed = str(Path(sys.executable).with_name("medfed"))
    rows = {"medfed": [], "plain": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(repeats):
            for who in ("plain", "medfed") if rep % 2 else ("medfed", "plain"):
                out = Path(tmp) / f"run-{who}-{rep}"
                job = Path(tmp) / f"job-{rep}.yaml"
                job.write_text(yaml.safe_dump(job_body(sites, per_site, out)))
                if who == "medfed":
                    wall, rss, _, t0 = measured([medfed, "run", str(job), "--quiet"])
                    startup, rounds, acc = medfed_timings(out, t0)
                else:
                    wall, rss, stdout, t0 = measured([sys.executable, str(HERE / "plain_loop.py"), str(job)])
                    res = json.loads(stdout.strip().splitlines()[-1])
                    startup, rounds, acc = res["round1_at"] - t0, res["round_s"], res["accuracy"]
                rows[who].append({"wall": wall, "rss": rss, "startup": startup, "round": sum(rounds) / len(rounds), "acc": acc})
                print(f"  {sites}x{per_site} {who:6s} rep {rep}: wall {wall:.2f} s, startup {startup:.2f} s, "
                      f"round {rows[who][-1]['round']:.2f} s, peak {rss:.0f} MiB", flush=True)

    def med(who: str, key: str) -> float:
        vals = sorted(r[key] for r in rows[who])
        return vals[len(vals) // 2]

    ref = rows["plain"][0]["acc"]
    # accuracies are ratios of counts: equal counts agree far below 1e-6 (medfed stores float32 means)
    same = all(r["acc"].keys() == ref.keys() and all(abs(r["acc"][k] - ref[k]) < 1e-6 for k in ref)
               for r in rows["medfed"] + rows["plain"])
    return {
        "scale": f"{sites} sites x {per_site} images",
        "medfed_wall": med("medfed", "wall"), "plain_wall": med("plain", "wall"),
        "ratio": med("medfed", "wall") / med("plain", "wall"),
        "medfed_startup": med("medfed", "startup"), "plain_startup": med("plain", "startup"),
        "medfed_round": med("medfed", "round"), "plain_round": med("plain", "round"),
        "medfed_rss": med("medfed", "rss"), "plain_rss": med("plain", "rss"),
        "mem_ratio": med("medfed", "rss") / med("plain", "rss"),
        "identical_accuracy": same,
        "mean_test_accuracy": sum(v for k, v in rows["medfed"][0]["acc"].items() if k.endswith("/test")) / sites,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scales", default="10x2000,100x200", help="comma-separated SITESxIMAGES")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    results = []
    for scale in args.scales.split(","):
        s, n = (int(v) for v in scale.split("x"))
        results.append(bench(s, n, args.repeats))
    print("\n| scale | medfed wall s | plain wall s | ratio | startup s (medfed / plain) | s per round (medfed / plain) | peak MiB (medfed / plain) | memory ratio | identical final accuracy |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['scale']} | {r['medfed_wall']:.2f} | {r['plain_wall']:.2f} | {r['ratio']:.3f} | "
              f"{r['medfed_startup']:.2f} / {r['plain_startup']:.2f} | {r['medfed_round']:.2f} / {r['plain_round']:.2f} | "
              f"{r['medfed_rss']:.0f} / {r['plain_rss']:.0f} | {r['mem_ratio']:.2f} | "
              f"{'yes' if r['identical_accuracy'] else 'NO'} (mean test acc {r['mean_test_accuracy']:.3f}) |")


if __name__ == "__main__":
    main()
