"""How soon the sites of a deployment are back after the server is killed and restarted.

Usage: python benchmarks/reconnect.py [--outages 1,20] [--reconnect-max S] [--rounds N]
                                      [--no-check] [--out FOLDER]

Real processes on 127.0.0.1, as a consortium runs them: ``medfed provision`` kits (CA,
server, three sites), one ``medfed server`` and three ``medfed site`` processes (the CLI,
``python -c "from medfed.cli import main; main()"``). The job is the quick start shrunk
for a CPU (16x16 images, 160/120/200 training images, 1 thread), ``rounds`` federated
rounds (default: one more than the outages) and no baselines.

For each outage in ``--outages`` (seconds, in order): once the server logs the end of a
federated round, it is killed (SIGKILL), and after the outage it is started again with
``--resume`` on the same run folder. For every site the figure is the time from the
restarted server's ``listening on`` line to its ``site '...' joined`` line, and to its
``site '...' is ready`` line, both read from the server's ``run.log`` (times to the
millisecond, one clock). The sites are never restarted: they reconnect by themselves, with
``--reconnect-max`` (default: medfed's default) passed to ``medfed site``.

At the end the run must complete; unless ``--no-check``, its final model is compared, bit
for bit, with a simulation of the same job (``medfed.server.runner.run_job``): a site that
missed the resumed server's join window would make them differ. ``--out FOLDER`` keeps
the kits, run folder and every process's log there (default: a temporary folder, deleted
at the end).
"""

from __future__ import annotations

import argparse
import platform
import re
import signal
import subprocess
import tempfile
import time
from datetime import date, datetime
from pathlib import Path

from local_consortium import CLI, SITES, make_kits, small_job

STAMP = r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})"


def make_job(folder: Path, rounds: int) -> Path:
    return small_job(folder / "job.yaml", folder / "run", rounds=rounds, round_timeout=120)


def start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen([*CLI, *args], stdout=f, stderr=subprocess.STDOUT)


def wait_for(check, timeout: float, what: str, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        dead = [" ".join(p.args[3:6]) for p in procs if p.poll() is not None]
        if dead and not check():  # checked again: it may have stopped after doing what was awaited
            raise RuntimeError(f"process(es) {'; '.join(dead)} stopped while waiting for {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def _when(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%f").timestamp()


def rejoin_times(log_text: str, since_line: int) -> tuple[float, dict[str, float], dict[str, float]]:
    """(listening time, joined time per site, ready time per site) in the run.log lines
    from ``since_line`` on: the first listening line there, and each site's first join
    and ready after it."""
    listening, joined, ready = None, {}, {}
    for line in log_text.splitlines()[since_line:]:
        m = re.match(STAMP + r" \w+ (.*)$", line)
        if not m:
            continue
        t, text = _when(m.group(1)), m.group(2)
        if listening is None:
            if " listening on " in text:
                listening = t
            continue
        m2 = re.match(r"site '([^']+)' (joined from|is ready)", text)
        if m2:
            table = joined if m2.group(2) == "joined from" else ready
            table.setdefault(m2.group(1), t)
    if listening is None:
        raise RuntimeError("no 'listening on' line in run.log")
    return listening, joined, ready


def simulate(job_path: Path, folder: Path):
    from safetensors.torch import load_file

    from medfed.config import load_job
    from medfed.server.runner import run_job

    job = load_job(job_path).model_copy(update={"output": folder / "simulated"})
    return load_file(str(run_job(job).run_dir / "model_final.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--outages", default="1,20", help="seconds the server stays down, one restart each (default 1,20)")
    ap.add_argument("--reconnect-max", type=float, default=None, help="passed to medfed site (default: its own)")
    ap.add_argument("--rounds", type=int, default=None, help="federated rounds (default: outages + 1)")
    ap.add_argument("--no-check", action="store_true", help="do not compare the final model with a simulation")
    ap.add_argument("--out", type=Path, default=None, help="keep the files here (default: a temporary folder)")
    args = ap.parse_args()
    outages = [float(x) for x in args.outages.split(",") if x.strip()]
    rounds = args.rounds or len(outages) + 1
    if rounds <= len(outages):
        ap.error("--rounds must be larger than the number of outages")

    import torch
    from safetensors.torch import load_file

    import medfed

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.out or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        kits, port = make_kits(folder)
        job = make_job(folder, rounds)
        run = folder / "run"
        server_args = ["server", "--kit", str(kits / "server"), "--job", str(job), "--listen", f"127.0.0.1:{port}"]
        site_args = ["--give-up-after", "600"] + (["--reconnect-max", str(args.reconnect_max)]
                                                  if args.reconnect_max is not None else [])
        print(f"# medfed {medfed.__version__}, Python {platform.python_version()}, {platform.machine()}, "
              f"{date.today()}; 3 site processes and 1 server process on 127.0.0.1, {rounds} rounds; "
              f"--reconnect-max {args.reconnect_max if args.reconnect_max is not None else 'default'}", flush=True)
        server = start(server_args, folder / "server.log")
        sites = [start(["site", "--kit", str(kits / s), *site_args], folder / f"{s}.log") for s in SITES]
        procs = [server, *sites]
        log_text = lambda: (run / "run.log").read_text() if (run / "run.log").exists() else ""  # noqa: E731
        results = []
        try:
            for i, outage in enumerate(outages, start=1):
                wait_for(lambda: f"federated round {i}/{rounds} done" in log_text(), 600, f"round {i}", procs)
                server.send_signal(signal.SIGKILL)
                server.wait(timeout=30)
                time.sleep(outage)
                since = len(log_text().splitlines())
                server = start([*server_args, "--resume"], folder / "server.log")
                procs = [server, *sites]
                wait_for(lambda: len(rejoin_times(log_text(), since)[2]) == len(SITES)
                         if " listening on " in "\n".join(log_text().splitlines()[since:]) else False,
                         300, f"the sites after the restart {i}", procs)
                listening, joined, ready = rejoin_times(log_text(), since)
                results.append((outage, {s: (joined[s] - listening, ready[s] - listening) for s in SITES}))
            rc = server.wait(timeout=900)
            if rc != 0:
                raise RuntimeError(f"the server ended with status {rc}: {(folder / 'server.log').read_text()[-2000:]}")
            for p in sites:
                p.wait(timeout=60)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(timeout=10)

        print("\n| outage (s) | site | joined after listening (s) | ready after listening (s) |")
        print("|---:|---|---:|---:|")
        for outage, per_site in results:
            for s, (j, r) in per_site.items():
                print(f"| {outage:g} | {s} | {j:.2f} | {r:.2f} |")
            last = max(j for j, _ in per_site.values())
            print(f"| {outage:g} | **last site** | **{last:.2f}** | **{max(r for _, r in per_site.values()):.2f}** |")
        if not args.no_check:
            same = simulate(job, folder)
            final = load_file(str(run / "model_final.safetensors"))
            equal = final.keys() == same.keys() and all(torch.equal(final[k], same[k]) for k in final)
            print(f"\nfinal model after {len(outages)} restart(s) equals the uninterrupted (simulated) run: "
                  f"{'yes' if equal else 'NO'}")


if __name__ == "__main__":
    main()
