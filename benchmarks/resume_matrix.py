"""The resume matrix: every algorithm x the moment a run is stopped, resumed, against the
run never stopped, bit for bit.

Usage: python benchmarks/resume_matrix.py [--part simulation|sigkill|deployment|all]
                                          [--out FOLDER]

* ``simulation``: ``medfed run`` (``run_job``) stopped in this process where a kill could
  land, then ``--resume`` (``run_job(resume=True)``), for each algorithm with state at the
  server or the sites and two without, with the in-process and (for five of them) the
  process-pool transport, at three moments: (a) the sites of round 2 have trained and
  saved their state, the server has not aggregated; (b) round 2 aggregated, evaluated and
  its best model saved, its resume point not written; (c) round 1, before any site trained.
* ``sigkill``: a real ``medfed run`` process (5 rounds, 28x28 images, 16 times the
  training images) killed with SIGKILL once round 2 has started plus a seeded random delay
  (0 to 1.5 s), then ``medfed run ... --resume``.
* ``deployment``: a real consortium on 127.0.0.1 (``medfed provision`` kits, one ``medfed
  server``, three ``medfed site`` processes), every algorithm above but central DP (its
  deployed noise is fresh) and sampling by loss; the server killed with SIGKILL (a) once the
  first update of round 3 is accepted (a site has trained round 3), (b) once all three
  are (the server aggregates and evaluates), (c) once the first update of round 1 is
  accepted; then ``medfed server --resume``; the final model against a simulation.

Each row: equal (the final model, the best model and, in simulation, every metric record,
bit for bit), how many sites went back one round (``back to its state of round``; "–" for
the process pool, whose workers log it where the run does not see), and
whether the server logged that a site could not continue exactly. The job: three synthetic
sites (16x16 images), 3 rounds, small_cnn width 4, plain SGD (sigkill: see above;
deployment: the quick start made small, local_consortium.small_job, 4 rounds,
plain SGD).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import date
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from local_consortium import CLI, SITES, make_kits, small_job

RAW = {
    "name": "resume", "rounds": 3, "threads": 1, "seed": 3,
    "data": {"source": "synthetic", "image_size": 16,
             "sites": [{"name": "a", "n_train": 24, "n_val": 8, "n_test": 8},
                       {"name": "b", "n_train": 16, "n_val": 8, "n_test": 8},
                       {"name": "c", "n_train": 20, "n_val": 8, "n_test": 8}]},
    "model": {"name": "small_cnn", "width": 4}, "task": {"labels": "binary"},
    "train": {"batch_size": 8, "lr": 0.05, "local_epochs": 1, "momentum": 0.0},
    "compare": ["local"],
}
GROUP = {"model": {"name": "small_cnn", "width": 4, "norm": "group"}}
ALGORITHMS = {
    "fedavg": {},
    "fedprox": {"algorithm": {"name": "fedprox", "mu": 0.1}},
    "fedadam": {"algorithm": {"name": "fedadam", "server_lr": 0.05}},
    "fednova": {"algorithm": {"name": "fednova"}},
    "qfedavg": {"algorithm": {"name": "qfedavg", "q": 1.0}},
    "scaffold": {"algorithm": {"name": "scaffold"}},
    "feddyn": {"algorithm": {"name": "feddyn", "alpha": 0.1}},
    "moon": {"algorithm": {"name": "moon", "mu": 1.0}},
    "ditto": {"algorithm": {"name": "ditto", "lam": 0.1}},
    "fedce": {"algorithm": {"name": "fedce"}},
    "fedbn": {"algorithm": {"name": "fedbn"}},
    "fedper": {"algorithm": {"name": "fedper", "personal_layers": ["head"]}},
    "fedrep": {"algorithm": {"name": "fedrep", "personal_layers": ["head"]}},
    "topk + error feedback": {"compression": {"method": "topk", "fraction": 0.2}},
    "central DP, sampled": {**GROUP, "sampling": {"fraction": 0.67},
                            "privacy": {"dp": {"clip": 1.0, "noise_multiplier": 0.3, "noise": "central",
                                               "delta": 1e-3}}},
    "sampling by loss": {"sampling": {"method": "loss", "fraction": 0.67, "candidates": 3}},
}
POOLED = ("fedavg", "scaffold", "ditto", "fedbn", "topk + error feedback")
MOMENTS = {"a": "sites trained round 2, not aggregated", "b": "round 2 aggregated, not checkpointed",
           "c": "round 1, nothing trained"}


class Stop(KeyboardInterrupt):
    pass


def _same_models(a: Path, b: Path) -> bool:
    for name in ("model_final", "model_best"):
        x, y = load_file(str(a / f"{name}.safetensors")), load_file(str(b / f"{name}.safetensors"))
        if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
            return False
    return True


def _same_records(a: Path, b: Path) -> bool:
    return (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()


class LogCounter:
    """Counts the medfed log lines of a resumed run: sites that went back a round, sites
    the server found not continuing exactly."""

    def __init__(self):
        import logging

        self.lines: list[str] = []
        self.handler = logging.Handler()
        self.handler.emit = lambda r: self.lines.append(r.getMessage())  # type: ignore[method-assign]
        logging.getLogger("medfed").addHandler(self.handler)

    def close(self):
        import logging

        logging.getLogger("medfed").removeHandler(self.handler)

    def back(self) -> int:
        return sum("back to its state of round" in m for m in self.lines)

    def inexact(self) -> int:
        return sum("no longer continues exactly" in m for m in self.lines)


@contextmanager
def _stopping(moment: str, transport: str):
    """Stop the run at ``moment`` (see the module docstring)."""
    import medfed.server.runner as runner
    from medfed.transport.inprocess import InProcessTransport
    from medfed.transport.pool import PoolTransport

    cls = PoolTransport if transport == "pool" else InProcessTransport
    fit, save = cls.fit, runner.save_state

    def stop_fit(self, requests, timeout):
        federated = [r for r in requests if r.plan.arm.value == "federated"]
        if moment == "c" and federated and federated[0].plan.round == 1:
            raise Stop()
        out = fit(self, requests, timeout)
        if moment == "a" and federated and federated[0].plan.round == 2:
            raise Stop()
        return out

    def stop_save(folder, rnd, *args):
        if moment == "b" and rnd == 2:
            raise Stop()
        return save(folder, rnd, *args)

    cls.fit, runner.save_state = stop_fit, stop_save
    try:
        yield
    finally:
        cls.fit, runner.save_state = fit, save


def _job(folder: Path, name: str, over: dict, transport: str):
    from medfed.config import parse_job

    raw = {**copy.deepcopy(RAW), **copy.deepcopy(over), "output": str(folder / name), "transport": transport}
    if transport == "pool":
        raw.update(threads=3, workers=3)
    return parse_job(raw)


def simulation(folder: Path) -> list[dict]:
    from medfed.server.runner import run_job

    rows = []
    for name, over in ALGORITHMS.items():
        for transport in ("inprocess", "pool"):
            if transport == "pool" and name not in POOLED:
                continue
            straight = run_job(_job(folder / f"{name}-{transport}", "straight", over, transport)).run_dir
            for moment in MOMENTS:
                work = folder / f"{name}-{transport}-{moment}"
                job = _job(work, "stopped", over, transport)
                with _stopping(moment, transport):
                    try:
                        run_job(job)
                        raise RuntimeError("the run was not stopped")
                    except Stop:
                        pass
                partial = next(work.glob(".stopped.partial-*"))
                os.rename(partial, work / ".stopped.partial-999999999")  # its process is gone
                logs = LogCounter()
                try:
                    resumed = run_job(job, resume=True).run_dir
                finally:
                    logs.close()
                row = {"part": "simulation", "algorithm": name, "transport": transport, "moment": moment,
                       "equal": _same_models(straight, resumed) and _same_records(straight, resumed),
                       "back": logs.back(), "inexact": logs.inexact()}
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def sigkill(folder: Path, seed: int = 0) -> list[dict]:
    from medfed.config import parse_job
    from medfed.server.runner import run_job

    rng = random.Random(seed)
    rows = []
    for name in ("scaffold", "ditto", "fedbn", "fedavg"):
        for transport in ("inprocess", "pool"):
            work = folder / f"kill-{name}-{transport}"
            work.mkdir(parents=True)
            raw = {**copy.deepcopy(RAW), **copy.deepcopy(ALGORITHMS[name]), "rounds": 5, "transport": transport,
                   "output": "killed"}
            raw["data"]["image_size"] = 28
            for site in raw["data"]["sites"]:  # rounds long enough for the kill to land inside the run
                site["n_train"] *= 16
            if transport == "pool":
                raw.update(threads=3, workers=3)
            (work / "job.yaml").write_text(yaml.safe_dump(raw))
            straight = run_job(parse_job({**raw, "output": str(work / "straight")})).run_dir
            cmd = [*CLI, "run", str(work / "job.yaml"), "-o", str(work / "killed"), "-q"]
            proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline, delay = time.monotonic() + 300, rng.uniform(0.0, 1.5)
            while time.monotonic() < deadline:
                logs = list(work.glob(".killed.partial-*/run.log"))
                if logs and "federated round 2/5 started" in logs[0].read_text():
                    break
                time.sleep(0.01)
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            if (work / "killed" / "run.json").exists():
                print(f"{name} {transport}: the run finished before the kill; not counted", flush=True)
                continue
            done = subprocess.run([*cmd, "--resume"], cwd=work, capture_output=True, text=True, timeout=600)
            log = (work / "killed" / "run.log").read_text() if done.returncode == 0 else done.stderr[-500:]
            after = next((line.split("resuming job 'resume' ")[1] for line in log.splitlines()
                          if "resuming job 'resume' " in line), "?")
            row = {"part": "sigkill", "algorithm": name, "transport": transport, "moment": f"+{delay:.2f} s",
                   "resumed": after, "equal": done.returncode == 0 and _same_models(straight, work / "killed")
                   and _same_records(straight, work / "killed"),
                   "back": log.count("back to its state of round"), "inexact": log.count("no longer continues exactly")}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def _accepted(run: Path, rnd: int) -> int:
    path = run / "state.sqlite"
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1) as db:
            return int(db.execute("SELECT COUNT(*) FROM audit WHERE arm = 'federated' AND kind = 'fit' AND round = ? "
                                  "AND status = 'accepted'", (rnd,)).fetchone()[0])
    except sqlite3.Error:
        return 0


def deployment(folder: Path) -> list[dict]:
    from medfed.config import load_job
    from medfed.server.runner import run_job

    sgd = {"local_epochs": 1, "batch_size": 32, "lr": 0.02, "optimizer": "sgd", "momentum": 0.0}
    # every algorithm; not central DP (a deployment's noise is drawn fresh, so no two runs are equal) nor
    # sampling by loss (its own row above), and the quick start's batch-norm network for all
    algos = {k: v for k, v in ALGORITHMS.items() if k not in ("central DP, sampled", "sampling by loss")}
    moments = {"a": (3, 1), "b": (3, 3), "c": (1, 1)}  # (round, accepted updates) at the kill
    rows = []
    for name, over in algos.items():
        ref = None
        for moment, (rnd, count) in moments.items():
            work = folder / f"deploy-{name}-{moment}"
            work.mkdir(parents=True)
            kits, port = make_kits(work)
            job = small_job(work / "job.yaml", work / "run", rounds=4, round_timeout=60, train=sgd, **over)
            if ref is None:
                sim = load_job(job).model_copy(update={"output": work / "simulated"})
                ref = load_file(str(run_job(sim).run_dir / "model_final.safetensors"))
            args = ["server", "--kit", str(kits / "server"), "--job", str(job), "--listen", f"127.0.0.1:{port}"]
            procs = []
            with open(work / "server.log", "wb") as f:
                server = subprocess.Popen([*CLI, *args], stdout=f, stderr=subprocess.STDOUT)
            procs.append(server)
            for s in SITES:
                with open(work / f"{s}.log", "wb") as f:
                    procs.append(subprocess.Popen([*CLI, "site", "--kit", str(kits / s), "--give-up-after", "120"],
                                                  stdout=f, stderr=subprocess.STDOUT))
            try:
                deadline = time.monotonic() + 180
                while _accepted(work / "run", rnd) < count:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{name} {moment}: round {rnd} never had {count} update(s)")
                    time.sleep(0.005)
                server.send_signal(signal.SIGKILL)
                server.wait(timeout=10)
                run_log = (work / "run" / "run.log").read_text()
                saved = f"round {rnd}/4 done" in run_log
                with open(work / "server2.log", "wb") as f:
                    again = subprocess.Popen([*CLI, *args, "--resume"], stdout=f, stderr=subprocess.STDOUT)
                procs.append(again)
                ok = again.wait(timeout=300) == 0
                for p in procs[1:4]:
                    p.wait(timeout=60)
            finally:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            final = load_file(str(work / "run" / "model_final.safetensors")) if ok else {}
            site_logs = " ".join(" ".join((work / f"{s}.log").read_text().split()) for s in SITES)
            server_log = (work / "run" / "run.log").read_text()
            row = {"part": "deployment", "algorithm": name, "transport": "grpc", "moment": moment,
                   "saved_before_kill": saved,
                   "equal": ok and final.keys() == ref.keys() and all(torch.equal(final[k], ref[k]) for k in ref),
                   "back": site_logs.count("back to its state of round"),
                   "inexact": server_log.count("no longer continues exactly")}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("simulation", "sigkill", "deployment", "all"), default="all")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.out or Path(tmp)
        rows = []
        for part, fn in (("simulation", simulation), ("sigkill", sigkill), ("deployment", deployment)):
            if args.part in (part, "all"):
                rows += fn(folder / part)
    print(f"\nresume matrix, {date.today()}, python {sys.version.split()[0]}, torch {torch.__version__}")
    print("| part | algorithm | transport | stopped | equal bit for bit | sites back one round | logged inexact |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        stopped = MOMENTS.get(r["moment"], r["moment"]) if r["part"] == "simulation" else r["moment"]
        if r["part"] == "sigkill":
            stopped = f"SIGKILL {r['moment']} after round 2 started (resumed {r['resumed']})"
        if r["part"] == "deployment":
            stopped = {"a": "SIGKILL after 1 of 3 updates of round 3", "b": "SIGKILL after 3 of 3 updates of round 3",
                       "c": "SIGKILL after 1 of 3 updates of round 1"}[r["moment"]]
        back = "–" if r["transport"] == "pool" else r["back"]  # logged in the workers
        print(f"| {r['part']} | {r['algorithm']} | {r['transport']} | {stopped} | {'yes' if r['equal'] else 'NO'} | "
              f"{back} | {r['inexact']} |")
    print(f"\n{sum(r['equal'] for r in rows)} of {len(rows)} equal")


if __name__ == "__main__":
    main()
