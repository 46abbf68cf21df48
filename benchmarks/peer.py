"""medfed beside its peers: one FedAvg workload through a plain PyTorch loop, medfed
in-process, medfed on Ray and Flower's Simulation Engine, at 10, 100 and 1,000 sites.

Usage: python benchmarks/peer.py [--scales 10x1000,100x100,1000x10] [--repeats 3]
       python benchmarks/peer.py --quick             (small scales, one run each)
       python benchmarks/peer.py --table RUNS.jsonl  (the tables of earlier --jsonl runs)

The workload is overhead.py's job (``job_body``): synthetic 1x28x28 images from medfed's
generator (each site also 20 val and 50 test images), the small CNN of width 16, FedAvg
weighted by training examples, 5 rounds, 1 local epoch of SGD (lr 0.01, momentum 0.9),
batch 32, 2 threads, and one evaluation of every site's val and test accuracy after the
last round. The default scales keep 10,000 training images per round at every scale
(SITESxIMAGES per site), so that what grows with the sites is the frameworks' work.

Each run is a separate process, launched from here:

* ``plain``: ``benchmarks/plain_loop.py JOB``, the reference (it builds the data with
  medfed's generator and trains with plain PyTorch);
* ``plain-malloc``: the same loop with glibc's allocator set as medfed sets it in every
  process that trains (core/allocator.py: its mmap and trim thresholds, here through
  glibc's environment variables ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_``),
  so that medfed's own overhead is measured against a loop that allocates alike;
* ``medfed``: ``medfed run JOB --quiet`` (``transport: inprocess``);
* ``medfed-ray``: the same job with ``transport: ray`` and ``ray: {cpus_per_site: C}``:
  a local Ray instance of 2 CPUs, whose actors train with C threads (default C = 2: one
  actor, the same arithmetic as the in-process run);
* ``flower``: ``benchmarks/peer_flower.py`` with the Python of a virtual environment of
  its own (``--venv``, made once with ``python -m venv`` and ``pip install
  "flwr[simulation]" torch==2.13.0``; Flower is never a dependency of medfed): Flower's
  ``run_simulation`` on Ray with 2 CPUs, each ClientApp actor asking for C CPUs and
  training with C threads. It reads the sites' arrays and the initial weights from an
  .npz this script writes once per scale from medfed's generator, so Flower does not
  generate the data (the time to generate them is printed beside its figures).

The runs alternate (the order rotates each repeat) and the tables give medians over the
repeats of: whole-process wall time (launch to exit) and its ratio to the plain loop's;
start-up, from launch to round 1 (plain: the loop's start; medfed: the log's "federated
round 1/5 started"; Flower: the first ClientApp's train call of round 1); the peak memory
of the process tree (Ray and Flower start worker processes): the sum of the resident
sets (RSS) of the launched process and all its descendants, read from /proc every 0.2 s
by a thread of this script (and the proportional set size, PSS, which counts a shared
page once, every 1 s); and whether every site's final val and test accuracy equals the
plain loop's (otherwise the largest absolute difference). Linux only (/proc).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from overhead import job_body, medfed_timings  # noqa: E402  (the same job, and how its run is read)

FRAMEWORKS = ("plain", "plain-malloc", "medfed", "medfed-ray", "flower")
DEFAULT_SCALES = "10x1000,100x100,1000x10"
QUICK_SCALES = "4x100,20x10"
DEFAULT_VENV = Path.home() / ".cache" / "medfed-bench" / "flwr-venv"
FLOWER_PACKAGES = ["flwr[simulation]", "torch==2.13.0"]  # torch pinned: the CPU build, as medfed's
PAGE = os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------- Flower's virtual environment

def flower_python(venv: Path) -> Path:
    """The Python of ``venv``, made (once) with Flower's simulation extra and torch."""
    py = venv / "bin" / "python"
    probe = "import flwr, ray, torch; assert torch.__version__.split('+')[0] == '2.13.0', torch.__version__"
    if py.exists() and subprocess.run([py, "-c", probe], capture_output=True).returncode == 0:
        return py
    print(f"making Flower's virtual environment in {venv} (once) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([py, "-m", "pip", "install", "--quiet", *FLOWER_PACKAGES], check=True)
    subprocess.run([py, "-c", probe], check=True)
    return py


def versions(flwr_py: Path | None) -> dict[str, str]:
    v = {f"{p} (medfed's venv)": importlib.metadata.version(p) for p in ("medfed", "torch", "ray")}
    v["python"] = sys.version.split()[0]
    if flwr_py is not None:
        code = "import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in ('flwr', 'ray', 'torch')}))"
        out = json.loads(subprocess.run([flwr_py, "-c", code], capture_output=True, text=True, check=True).stdout)
        v.update({f"{p} (Flower's venv)": val for p, val in out.items()})
    return v


# ---------------------------------------------------------------- the data, once per scale

def write_sites(body: dict, path: Path) -> tuple[float, dict]:
    """Every site's arrays from medfed's generator, and the initial weights of its
    SmallCNN, into ``path`` (.npz) for the Flower run. Returns the seconds the generator
    took and the training settings of the job (as plain_loop.py reads them)."""
    import torch

    from medfed.config import parse_job
    from medfed.data.synthetic import make_synthetic_sites
    from medfed.models import SmallCNN

    job = parse_job(body)
    t = time.perf_counter()
    sites = make_synthetic_sites(job.data, job.seed)
    generate_s = time.perf_counter() - t
    arrays: dict[str, np.ndarray] = {"names": np.array([s.name for s in sites])}
    for split in ("train", "val", "test"):
        parts = [s.split(split) for s in sites]
        arrays[f"x_{split}"] = np.concatenate([p.images.numpy() for p in parts])
        arrays[f"y_{split}"] = np.concatenate([p.labels.numpy() for p in parts])
        arrays[f"off_{split}"] = np.cumsum([0] + [len(p) for p in parts])
    torch.manual_seed(job.seed)
    for k, v in SmallCNN(1, 1, job.model.width).state_dict().items():
        arrays[f"init/{k}"] = v.numpy()
    np.savez(path, **arrays)
    tr = job.train
    return generate_s, {"rounds": job.rounds, "seed": job.seed, "width": job.model.width, "lr": tr.lr,
                        "momentum": tr.momentum, "weight-decay": tr.weight_decay, "batch": tr.batch_size,
                        "epochs": tr.local_epochs}


# ---------------------------------------------------------------- one measured process

def _tree_memory(root: int, pss: bool) -> tuple[int, int, int]:
    """(RSS bytes summed over ``root`` and its descendants, processes, PSS bytes summed or 0)."""
    parent: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
            except OSError:
                continue
            parent[int(name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    tree, frontier = {root}, [root]
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    while frontier:
        for c in children.get(frontier.pop(), []):
            if c not in tree:
                tree.add(c)
                frontier.append(c)
    rss = pss_sum = 0
    for pid in tree:
        try:
            rss += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
            if pss:
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        pss_sum += int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError, IndexError):
            continue
    return rss, len(tree), pss_sum


def measured(cmd: list, log: Path, env: dict | None = None) -> dict:
    """Run ``cmd`` (output to ``log``), sampling its process tree's memory meanwhile."""
    peak = {"rss": 0, "pss": 0, "procs": 0, "samples": 0}
    done = threading.Event()

    def sample(pid: int) -> None:
        k = 0
        while not done.is_set():
            rss, procs, pss = _tree_memory(pid, pss=k % 5 == 0)
            peak["rss"], peak["pss"] = max(peak["rss"], rss), max(peak["pss"], pss)
            peak["procs"], peak["samples"] = max(peak["procs"], procs), peak["samples"] + 1
            k += 1
            done.wait(0.2)

    cpu0 = time.process_time()
    with open(log, "w") as out:
        t0 = time.time()
        proc = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT, env=env)
        sampler = threading.Thread(target=sample, args=(proc.pid,), daemon=True)
        sampler.start()
        rc = proc.wait()
        wall = time.time() - t0
    done.set()
    sampler.join()
    if rc != 0:
        sys.exit(f"command failed ({rc}): {' '.join(map(str, cmd))}\n{log.read_text()[-3000:]}")
    return {"wall": wall, "t0": t0, "rss_mib": peak["rss"] / 2**20, "pss_mib": peak["pss"] / 2**20,
            "procs": peak["procs"], "sampler_cpu_s": time.process_time() - cpu0}


def run_one(who: str, body: dict, work: Path, tag: str, flwr_py: Path | None, npz: Path, settings: dict,
            cpus_per_site: int) -> dict:
    out = work / f"run-{tag}"
    job = work / f"job-{tag}.yaml"
    body = {**body, "output": str(out)}
    if who == "medfed-ray":
        body |= {"transport": "ray", "ray": {"cpus_per_site": cpus_per_site}}
    job.write_text(yaml.safe_dump(body, sort_keys=False))
    log = work / f"log-{tag}.txt"
    if who in ("plain", "plain-malloc"):
        env = None
        if who == "plain-malloc":
            from medfed.core.allocator import as_environment

            env = {**os.environ, **as_environment()}
        m = measured([sys.executable, HERE / "plain_loop.py", job], log, env)
        res = json.loads(log.read_text().strip().splitlines()[-1])
        startup, acc = res["round1_at"] - m["t0"], res["accuracy"]
    elif who in ("medfed", "medfed-ray"):
        m = measured([Path(sys.executable).with_name("medfed"), "run", job, "--quiet"], log)
        startup, _, acc = medfed_timings(out, m["t0"])
    else:
        result = work / f"flower-{tag}.json"
        args = [f"--{k}={v}" for k, v in settings.items()]
        env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}  # no network here; Flower's telemetry would try
        m = measured([flwr_py, HERE / "peer_flower.py", f"--data={npz}", f"--out={result}", "--cpus=2",
                      f"--cpus-per-client={cpus_per_site}", *args], log, env)
        res = json.loads(result.read_text())
        startup, acc = res["round1_at"] - m["t0"], res["accuracy"]
    return {k: v for k, v in m.items() if k != "t0"} | {"startup": startup, "acc": acc}


# ---------------------------------------------------------------- a scale, and the tables

def bench(sites: int, per_site: int, repeats: int, frameworks: list[str], flwr_py: Path | None,
          cpus_per_site: int, jsonl: Path | None) -> list[dict]:
    scale = f"{sites}x{per_site}"
    rows = []
    with tempfile.TemporaryDirectory(prefix=f"peer-{scale}-") as tmp:
        work = Path(tmp)
        body = job_body(sites, per_site, work / "unused")
        npz = work / "sites.npz"
        generate_s, settings = write_sites(body, npz) if "flower" in frameworks else (None, {})
        for rep in range(repeats):
            order = frameworks[rep % len(frameworks):] + frameworks[: rep % len(frameworks)]
            for who in order:
                r = run_one(who, body, work, f"{who}-{rep}", flwr_py, npz, settings, cpus_per_site)
                r |= {"scale": scale, "sites": sites, "per_site": per_site, "framework": who, "rep": rep,
                      "generate_s": generate_s, "cpus_per_site": cpus_per_site}
                rows.append(r)
                print(f"  {scale} {who:10s} rep {rep}: wall {r['wall']:.2f} s, start-up {r['startup']:.2f} s, "
                      f"tree RSS {r['rss_mib']:.0f} MiB (PSS {r['pss_mib']:.0f}, {r['procs']} processes)", flush=True)
                if jsonl is not None:
                    with open(jsonl, "a") as f:
                        f.write(json.dumps(r) + "\n")
    return rows


def accuracy_note(runs: list[dict], ref: dict) -> str:
    """'identical' when every run's per-site accuracies equal the plain loop's (1e-6: medfed
    stores float32 means of counts), else the largest absolute difference. Only the sites'
    accuracies are compared."""
    worst = 0.0
    for r in runs:  # medfed also reports summaries over the sites (the median): not compared
        missing = ref.keys() - r["acc"].keys()
        if missing:
            return f"NO: {len(missing)} of plain's {len(ref)} accuracies missing"
        worst = max([worst] + [abs(r["acc"][k] - ref[k]) for k in ref])
    mean_test = statistics.mean(runs[0]["acc"][k] for k in ref if k.endswith("/test"))
    same = "identical" if worst < 1e-6 else f"differs: max abs diff {worst:.4f}"
    return f"{same} (mean test acc {mean_test:.3f})"


def table(rows: list[dict]) -> None:
    for scale in dict.fromkeys(r["scale"] for r in rows):
        at = [r for r in rows if r["scale"] == scale]
        plain = [r for r in at if r["framework"] == "plain"]
        ref = plain[0]["acc"] if plain else None
        plain_wall = statistics.median(r["wall"] for r in plain) if plain else None
        alike = [r["wall"] for r in at if r["framework"] == "plain-malloc"]
        alike_wall = statistics.median(alike) if alike else None
        n = len({r["rep"] for r in at})
        print(f"\n### {at[0]['sites']} sites x {at[0]['per_site']} training images (medians of {n})\n")
        print("| framework | wall s | ratio to plain | " + ("ratio to plain-malloc | " if alike else "")
              + "start-up s | peak tree RSS MiB (PSS) | processes | final accuracy against plain |")
        print("| --- | ---: | ---: | " + ("---: | " if alike else "") + "---: | ---: | ---: | --- |")
        for who in FRAMEWORKS:
            runs = [r for r in at if r["framework"] == who]
            if not runs:
                continue

            def med(key: str) -> float:
                return statistics.median(r[key] for r in runs)

            ratio = f"{med('wall') / plain_wall:.3f}" if plain_wall else "-"
            if alike_wall:
                ratio += f" | {med('wall') / alike_wall:.3f}"
            acc = accuracy_note(runs, ref) if ref is not None else "-"
            print(f"| {who} | {med('wall'):.2f} | {ratio} | {med('startup'):.2f} | {med('rss_mib'):.0f} "
                  f"({med('pss_mib'):.0f}) | {max(r['procs'] for r in runs)} | {acc} |")
        gen = at[0].get("generate_s")
        if gen is not None:
            print(f"\nGenerating the sites' data (medfed's generator, in the benchmark's process, once): {gen:.2f} s; "
                  "plain, medfed and medfed-ray do this inside their runs, Flower loads the same arrays from an .npz.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scales", default=None, help=f"comma-separated SITESxIMAGES (default {DEFAULT_SCALES})")
    ap.add_argument("--repeats", type=int, default=None, help="runs of each framework per scale (default 3)")
    ap.add_argument("--quick", action="store_true", help=f"scales {QUICK_SCALES}, one run each: a check that all runs")
    ap.add_argument("--frameworks", default=",".join(FRAMEWORKS), help="comma-separated subset of " + ", ".join(FRAMEWORKS))
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV, help=f"Flower's virtual environment (default {DEFAULT_VENV})")
    ap.add_argument("--cpus-per-site", type=int, default=2, choices=(1, 2),
                    help="CPUs (and torch threads) of each Ray actor, medfed's and Flower's, of the 2 (default 2)")
    ap.add_argument("--jsonl", type=Path, help="also append every run's figures to this file, as JSON lines")
    ap.add_argument("--table", type=Path, help="only print the tables of the runs in this --jsonl file")
    args = ap.parse_args()
    if args.table:
        table([json.loads(x) for x in args.table.read_text().splitlines() if x.strip()])
        return
    scales = args.scales or (QUICK_SCALES if args.quick else DEFAULT_SCALES)
    repeats = args.repeats or (1 if args.quick else 3)
    frameworks = [f for f in args.frameworks.split(",") if f]
    unknown = set(frameworks) - set(FRAMEWORKS)
    if unknown:
        sys.exit(f"--frameworks: unknown {sorted(unknown)}; choose from {', '.join(FRAMEWORKS)}")
    flwr_py = flower_python(args.venv.expanduser()) if "flower" in frameworks else None
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions(flwr_py).items()), flush=True)
    rows = []
    for s in scales.split(","):
        sites, per_site = (int(v) for v in s.split("x"))
        rows += bench(sites, per_site, repeats, frameworks, flwr_py, args.cpus_per_site, args.jsonl)
    table(rows)


if __name__ == "__main__":
    main()
