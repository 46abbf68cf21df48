"""The attack table of issue 21: a hostile site against a real deployment on 127.0.0.1.

Usage: python benchmarks/attacks.py [--out FOLDER] [--only N] [--round-timeout S]

Real processes, as a consortium runs them: kits from ``medfed.transport.pki.provision``
(CA, server, three sites), one ``medfed server`` process, two honest ``medfed site``
processes (hospital_a, hospital_b) and one hostile site (hospital_c) driven from this
process through ``medfed.transport.grpc.client.Connection`` with its own kit and
certificate (and, for the oversized message, a raw gRPC channel with the same
certificate). The job is the quick start shrunk for a CPU: 16x16 images, 160/120/200
training images, 3 rounds, ``min_sites: 2`` (the two honest sites are a quorum),
``round_timeout`` 20 s, no baselines, 1 thread per process.

The hostile site joins and reports a data summary like an honest site's (its synthetic
split sizes and image shape), then answers every task with a site error ("declines"),
except the task(s) it attacks. A reference run has the same site declining every task and
no attack: its final model is the honest sites' model, and every attack whose input is
refused must end with that same model, bit for bit.

Each attack is its own run (``--only`` picks one: 1..8, 7a, 7b; the reference always runs):

1. 8 submit streams that open and send nothing + 6 that send the header of the site's
   round-1 fit task and then trickle one byte a second; a stream that ends is opened again
   1 s later while the round-1 task could still be open (round_timeout);
2. the same with 4 trickling streams only (the upload slots);
3. taking the round-1 fit task and never reading the model (the poll's stream is held
   open, unread, for round_timeout + 5 s);
4. the round-1 evaluation answered with n = 1e9 and AUC (and accuracy) 1.0;
5. the round-1 evaluation answered with an unknown metric name;
6. an error answer to the round-1 fit task (and a "cannot take part" message at start)
   whose reason has a newline forging a "federated round 99/99 done" line and ANSI escapes;
7a. a valid (untrained) update accepted in round 1, the same bytes again for the same task,
   and the same bytes again for the round-2 task (a replay);
7b. an update with NaN (round 1) and an update with a wrong tensor shape (round 2);
8. a 3 MiB gRPC message (the limit is 2 MiB): as the payload after a valid header for the
   round-1 fit task, and as the first message of a submission.

The table: whether the attack was refused and how (gRPC status the hostile client saw,
or the server cutting the stream after N s), the first line of the server's run.log that
names hospital_c and a refusal, the audit rows (state.sqlite) of hospital_c with status
other than "accepted" and a reason other than the decline, whether the server was still up
after the attack and exited with status 0, whether the run completed with the honest
sites' model (equal to the reference's final model; else: all rounds done and
metrics.jsonl holds the honest sites' records), and the seconds the attack cost the run
(its wall time, server start to server exit, minus the mean of two reference runs').

``--out FOLDER`` keeps the kits, every run folder and every process's log there (default:
a temporary folder, deleted at the end). Every process started is in its own process
group, killed at the end, also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from local_consortium import CLI, make_kits, small_job

HONEST = ("hospital_a", "hospital_b")
HOSTILE = "hospital_c"
SITES = (*HONEST, HOSTILE)
ROUNDS = 3
DECLINE = "declines this task (benchmark: a site that takes no part)"
FORGED = "boom\n2026-12-04T10:00:00.000 INFO federated round 99/99 done\x1b[2J\x1b]0;owned\x07"
OVERSIZE = 3 << 20  # bytes: one gRPC message over the 2 MiB limit
ATTACKS = {
    "1": "8 empty + 6 trickling submit streams",
    "2": "4 trickling submit streams",
    "3": "fit task taken, model never read",
    "4": "evaluation with n = 1e9, AUC 1.0",
    "5": "evaluation with an unknown metric",
    "6": "error reason forging a log line + ANSI",
    "7a": "replayed update (same bytes twice, then for a new task)",
    "7b": "update with NaN; update with a wrong shape",
    "8": "3 MiB message (after a header; as the first message)",
}

_PROCS: list[subprocess.Popen] = []


# ---------------------------------------------------------------------- processes


def start(args: list[str], log: Path) -> subprocess.Popen:
    """A medfed command in its own process group, its output in ``log``."""
    with open(log, "ab") as f:
        p = subprocess.Popen([*CLI, *args], stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    _PROCS.append(p)
    return p


def kill(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def kill_all() -> None:
    while _PROCS:
        kill(_PROCS.pop())


def _terminate(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


# ---------------------------------------------------------------------- consortium and job


def make_job(path: Path, output: Path, round_timeout: float) -> Path:
    return small_job(path, output, rounds=ROUNDS, round_timeout=round_timeout, min_sites=2)


def hostile_summary(job_path: Path) -> dict[str, Any]:
    """What an honest hospital_c would report: its synthetic split sizes and image shape."""
    from medfed.config import load_job
    from medfed.data.sites import build_sites, describe_sites

    job = load_job(job_path)
    data = [s for s in build_sites(job, order=job.site_names) if s.name == HOSTILE]
    return describe_sites(data, job.task, job.held_out)[0].for_the_server()


# ---------------------------------------------------------------------- the hostile site


@dataclass
class Outcome:
    """One call the hostile site made as part of an attack, as its client saw it."""

    label: str
    code: str  # gRPC status name, or "OK"
    details: str
    seconds: float
    by_attacker: bool = False  # the attacker ended it (its window was over), not the server


@dataclass
class Record:
    outcomes: list[Outcome] = field(default_factory=list)
    attack_at: float | None = None  # time.time() the attack began
    attack_end: float | None = None
    server_up_after: bool | None = None
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _status(e: Exception) -> tuple[str, str]:
    import grpc

    if isinstance(e, grpc.RpcError):
        return e.code().name, (e.details() or "")
    return type(e).__name__, str(e)


class Hostile:
    """hospital_c, driven from here: joins, declines every task, attacks the one its
    attack names."""

    def __init__(self, kits: Path, port: int, attack: str | None, summary: dict, round_timeout: float,
                 server: subprocess.Popen):
        from medfed.transport.grpc.client import Connection
        from medfed.transport.pki import load_kit

        self.kit = load_kit(kits / HOSTILE, role="site")
        self.target = f"127.0.0.1:{port}"
        self.conn = Connection(self.target, self.kit.ca_pem, self.kit.cert_pem, self.kit.key_pem, HOSTILE)
        self.attack, self.summary, self.rt, self.server = attack, summary, round_timeout, server
        self.job_id = ""
        self.rec = Record()
        self.release = threading.Event()  # ends every stalled stream of the attacker
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._main, name="hostile", daemon=True)
        self.done_attacks: set[str] = set()
        self.replay: bytes | None = None
        self._bg: list[threading.Thread] = []
        self._raw = None
        self.events: list[str] = []  # what the hostile site did and saw, for hostile.log

    def event(self, text: str) -> None:
        if self.events and self.events[-1].split(" ", 1)[1].removesuffix(" (repeated)") == text:
            self.events[-1] = self.events[-1].removesuffix(" (repeated)") + " (repeated)"  # the same, again
            return
        self.events.append(f"{time.strftime('%H:%M:%S')}.{int(time.time() * 1000) % 1000:03d} {text}")

    # -------------------------------------------------------------- life

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.release.set()
        self.thread.join(timeout=15)
        for t in self._bg:
            t.join(timeout=15)
        self.conn.close()
        if self._raw is not None:
            self._raw.close()

    def _attack_begins(self) -> None:
        if self.rec.attack_at is None:
            self.rec.attack_at = time.time()

    def _attack_ends(self) -> None:
        self.rec.attack_end = time.time()
        self.rec.server_up_after = self.server.poll() is None

    def _main(self) -> None:
        try:
            self._join()
            self._loop()
        except Exception as e:  # noqa: BLE001 - reported in the table's notes
            self.rec.errors.append(f"hostile driver stopped: {type(e).__name__}: {e}")

    def _join(self) -> None:
        import grpc

        deadline = time.monotonic() + 120
        while True:
            try:
                info = self.conn.join()
                break
            except grpc.RpcError:
                if time.monotonic() > deadline or self.stop.is_set():
                    raise
                self.conn.wait_connected(1.0)
                time.sleep(0.2)
        self.job_id = str(info["job_id"])
        self.conn.ready(self.job_id, self.summary)
        if self.attack == "6":  # the other place a site's own words reach the log
            self._attack_begins()
            self.conn.refuse_job(self.job_id, FORGED)  # logged; the site stays ready

    # -------------------------------------------------------------- the task loop

    def _loop(self) -> None:
        import grpc

        while not self.stop.is_set():
            try:
                if self.attack == "3" and "3" not in self.done_attacks:
                    hdr, blob = self._stalling_poll()
                    if hdr is None:
                        continue
                else:
                    hdr, blob = self.conn.poll(self.job_id, self.rt)
            except grpc.RpcError as e:
                self.event(f"poll: {e.code().name} {e.details()}")
                if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    try:
                        self.conn.join()
                        self.conn.ready(self.job_id, self.summary)
                    except grpc.RpcError:
                        pass
                time.sleep(0.3)
                continue
            kind = hdr.get("kind")
            if kind != "wait":
                self.event(f"poll: {kind} round {hdr.get('round')}")
            if kind == "done":
                return
            if kind not in ("fit", "evaluate", "exchange"):
                continue
            try:
                if not self._attack_task(hdr, blob or b""):
                    self._decline(hdr)
            except grpc.RpcError as e:
                self.event(f"answer: {e.code().name} {e.details()}")
            del blob

    def _reply(self, hdr: dict, kind: str | None = None) -> dict:
        return {"task_id": hdr.get("task_id"), "job_id": self.job_id, "round": hdr.get("round"),
                "kind": kind or hdr.get("kind")}

    def _decline(self, hdr: dict) -> None:
        import grpc

        deadline = time.monotonic() + 5.0  # its own stalled upload may hold the slot a moment longer
        while True:
            try:
                self.conn.submit({**self._reply(hdr, "error"), "cause": DECLINE}, b"", self.rt)
                self.event("declined")
                return
            except grpc.RpcError as e:
                self.event(f"decline: {e.code().name} {e.details()}")
                if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                    return
                time.sleep(0.25)

    def _call(self, label: str, fn) -> Outcome:
        """Run one attacking call; record what the client saw."""
        t0 = time.monotonic()
        try:
            fn()
            o = Outcome(label, "OK", "", time.monotonic() - t0)
        except Exception as e:  # noqa: BLE001
            code, details = _status(e)
            o = Outcome(label, code, details, time.monotonic() - t0)
        self.rec.outcomes.append(o)
        self.event(f"{label}: {o.code} after {o.seconds:.2f} s {o.details}")
        return o

    def _attack_task(self, hdr: dict, blob) -> bool:
        """Attack this task if the attack is about it; True when it was answered (or held)."""
        a, kind, rnd = self.attack, hdr.get("kind"), hdr.get("round")
        if a is None or kind == "exchange":
            return False
        if a in ("1", "2") and kind == "fit" and a not in self.done_attacks:
            self.done_attacks.add(a)
            self._attack_begins()
            t = threading.Thread(target=self._streams, args=(hdr, len(blob), 8 if a == "1" else 0, 6 if a == "1" else 4),
                                 name="hostile-streams", daemon=True)
            self._bg.append(t)
            t.start()
            return True
        if a in ("4", "5") and kind == "evaluate" and a not in self.done_attacks:
            self.done_attacks.add(a)
            self._attack_begins()
            body = self._forged_eval(hdr, a)
            self._call("forged evaluation", lambda: self.conn.submit(self._reply(hdr), body, self.rt))
            self._attack_ends()
            return True
        if a == "6" and kind == "fit" and a not in self.done_attacks:
            self.done_attacks.add(a)
            self._attack_begins()
            self._call("error answer with forged text",
                       lambda: self.conn.submit({**self._reply(hdr, "error"), "cause": FORGED}, b"", self.rt))
            self._attack_ends()
            return True
        if a == "7a" and kind == "fit" and rnd in (1, 2):
            self._attack_begins()
            if rnd == 1:
                self.replay = self._update_bytes(blob, rnd)
                self._call("valid update", lambda: self.conn.submit(self._reply(hdr), self.replay, self.rt))
                self._call("same bytes, same task", lambda: self.conn.submit(self._reply(hdr), self.replay, self.rt))
            else:
                self._call("same bytes, round-2 task", lambda: self.conn.submit(self._reply(hdr), self.replay, self.rt))
                self._attack_ends()
            return True
        if a == "7b" and kind == "fit" and rnd in (1, 2):
            self._attack_begins()
            body = self._update_bytes(blob, rnd, "nan" if rnd == 1 else "shape")
            self._call("NaN update" if rnd == 1 else "wrong-shape update",
                       lambda: self.conn.submit(self._reply(hdr), body, self.rt))
            if rnd == 2:
                self._attack_ends()
            return True
        if a == "8" and kind == "fit" and a not in self.done_attacks:
            self.done_attacks.add(a)
            self._attack_begins()
            self._oversize(hdr, blob)
            self._attack_ends()
            return True
        return False

    # -------------------------------------------------------------- payloads

    def _update_bytes(self, blob, rnd: int, spoil: str | None = None) -> bytes:
        import torch

        from medfed.core import codec
        from medfed.core.types import Update

        params, _ = codec.decode_model(blob)
        params = {k: v.clone() for k, v in params.items()}
        first = next(k for k, v in params.items() if v.is_floating_point() and v.dim() >= 2)
        if spoil == "nan":
            params[first] = torch.full_like(params[first], float("nan"))
        elif spoil == "shape":
            params[first] = params[first].reshape(-1)
        upd = Update(HOSTILE, rnd, params, int(self.summary["train"]), 1)
        return bytes(codec.encode_update(upd))

    def _forged_eval(self, hdr: dict, attack: str) -> bytes:
        from medfed.core import codec
        from medfed.core.types import EvalResult, Split

        out = []
        for s in hdr.get("splits") or ["val", "test"]:
            split = Split(s)
            if attack == "4":
                out.append(EvalResult(HOSTILE, split, 1_000_000_000, {"auc": 1.0, "accuracy": 1.0}))
            else:
                out.append(EvalResult(HOSTILE, split, int(self.summary[s]), {"auc": 0.5, "sensitivity_forged": 1.0}))
        return codec.encode_eval_results(out)

    # -------------------------------------------------------------- 1, 2: streams held open

    def _streams(self, hdr: dict, size: int, n_empty: int, n_trickle: int) -> None:
        """Keep ``n_empty`` silent and ``n_trickle`` trickling submissions open: each that
        ends is opened again 1 s later, while the round-1 task may still be open
        (round_timeout after it was taken). Every stream is let go 60 s after the start at
        the latest (the server should have cut it long before)."""
        from medfed.transport.grpc import wire

        submit = self.conn.channel.stream_unary(wire.SUBMIT)
        t_start = time.monotonic()
        reopen_until = t_start + self.rt
        let_go = t_start + 60.0
        header = wire.encode_header({**self._reply(hdr), "site": HOSTILE, "size": size})

        def silent():
            while not self.release.wait(0.5):
                if time.monotonic() > let_go:
                    return
            return
            yield  # never reached: makes this a generator

        def trickle():
            yield header
            for _ in range(size):
                if self.release.wait(1.0) or time.monotonic() > let_go:
                    return
                yield b"x"

        # the trickling ones first: one of them takes the site's upload slot (an empty one
        # would take it, and hold it until it is cut, if it came first)
        slots = [("trickle", trickle)] * n_trickle + [("empty", silent)] * n_empty
        live: list[tuple[str, Any, float] | None] = [None] * len(slots)
        ended: list[float] = [0.0] * len(slots)

        def open_slot(i):
            label, gen = slots[i]
            live[i] = (label, submit.future(gen(), timeout=90.0), time.monotonic())

        for i in range(len(slots)):
            open_slot(i)
        while True:
            now = time.monotonic()
            for i, item in enumerate(live):
                if item is None:
                    if now < reopen_until and now - ended[i] >= 1.0 and not self.stop.is_set():
                        open_slot(i)
                    continue
                label, fut, t0 = item
                if not fut.done():
                    continue
                try:
                    fut.result()
                    code, details = "OK", ""
                except Exception as e:  # noqa: BLE001
                    code, details = _status(e)
                o = Outcome(label, code, details, time.monotonic() - t0,
                            by_attacker=time.monotonic() >= let_go or self.release.is_set())
                self.rec.outcomes.append(o)
                if o.seconds >= 0.5 or code not in ("RESOURCE_EXHAUSTED",):
                    self.event(f"{label} stream: {code} after {o.seconds:.2f} s {details}")
                live[i], ended[i] = None, time.monotonic()
            if all(x is None for x in live) and (now >= reopen_until or self.stop.is_set()):
                break
            time.sleep(0.05)
        self._attack_ends()

    # -------------------------------------------------------------- 3: a download never read

    def _stalling_poll(self):
        """A poll whose fit task is taken and whose model is never read; other replies are
        read as usual."""
        from medfed.transport.grpc import wire

        stream = self.conn._poll(wire.encode_header({"site": HOSTILE, "job_id": self.job_id, "have": None}),
                                 timeout=self.rt * 3 + 30)
        try:
            hdr = wire.decode_header(next(stream), "poll reply")
            if hdr.get("kind") != "fit":
                if hdr.get("kind") in ("evaluate", "exchange"):
                    rest = b"".join(stream)
                    return hdr, rest
                return hdr, None
            self.done_attacks.add("3")
            self._attack_begins()
            self.rec.notes.append(f"the server declared a model of {hdr.get('size')} bytes")
            t0 = time.monotonic()
            self.release.wait(self.rt + 5.0)  # never read
            self.rec.outcomes.append(Outcome("stalled download", "held", "", time.monotonic() - t0, True))
            self._attack_ends()
            return None, None
        finally:
            stream.cancel()

    # -------------------------------------------------------------- 8: over the message limit

    def _oversize(self, hdr: dict, blob) -> None:
        import grpc

        from medfed.transport.grpc import wire

        opts = dict(wire.CHANNEL_OPTIONS)
        opts["grpc.max_send_message_length"] = 16 << 20
        opts["grpc.max_receive_message_length"] = 16 << 20
        creds = wire.channel_credentials(self.kit.ca_pem, self.kit.cert_pem, self.kit.key_pem)
        self._raw = grpc.secure_channel(self.target, creds, options=list(opts.items()))
        submit = self._raw.stream_unary(wire.SUBMIT)
        size = len(self._update_bytes(blob, int(hdr.get("round"))))
        big = b"\0" * OVERSIZE
        header = wire.encode_header({**self._reply(hdr), "site": HOSTILE, "size": size})
        self._call("header, then a 3 MiB chunk", lambda: submit(iter([header, big]), timeout=60))
        self._call("3 MiB first message", lambda: submit(iter([big]), timeout=60))


# ---------------------------------------------------------------------- one run


@dataclass
class Run:
    name: str
    wall: float
    rc: int | None
    rec: Record
    folder: Path
    log_lines: list[str]
    audit: list[dict]
    metrics: list[dict]
    complete: bool
    rounds_done: int
    model: dict | None
    hostile_joined_line: int


def one_run(name: str, attack: str | None, kits: Path, port: int, folder: Path, round_timeout: float) -> Run:
    from safetensors.torch import load_file

    rdir = folder / name
    rdir.mkdir(parents=True, exist_ok=True)
    run = rdir / "run"
    job = make_job(rdir / "job.yaml", run, round_timeout)
    summary = hostile_summary(job)
    t0 = time.monotonic()
    server = start(["server", "--kit", str(kits / "server"), "--job", str(job), "--listen", f"127.0.0.1:{port}",
                    "--join-timeout", "90"], rdir / "server.log")
    sites = [start(["site", "--kit", str(kits / s), "--give-up-after", "120"], rdir / f"{s}.log") for s in HONEST]
    hostile = Hostile(kits, port, attack, summary, round_timeout, server)
    hostile.start()
    rc = None
    try:
        try:
            rc = server.wait(timeout=300)
        except subprocess.TimeoutExpired:
            hostile.rec.errors.append("the server did not end within 300 s: killed")
        wall = time.monotonic() - t0
        for p in sites:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                hostile.rec.errors.append(f"site process {p.args[-3:]} did not end: killed")
    finally:
        for p in (server, *sites):
            kill(p)
            if p in _PROCS:
                _PROCS.remove(p)
        hostile.close()
    text = (run / "run.log").read_text(errors="replace") if (run / "run.log").exists() else ""
    lines = text.splitlines()
    audit: list[dict] = []
    if (run / "state.sqlite").exists():
        db = sqlite3.connect(f"file:{run / 'state.sqlite'}?mode=ro", uri=True)
        db.row_factory = sqlite3.Row
        audit = [dict(r) for r in db.execute('SELECT * FROM audit ORDER BY id')]
        db.close()
    metrics = ([json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
               if (run / "metrics.jsonl").exists() else [])
    complete = (run / "run.json").exists() and json.loads((run / "run.json").read_text()).get("status") == "complete"
    rounds_done = len(set(re.findall(rf" INFO federated round (\d+)/{ROUNDS} done", text)))
    model = load_file(str(run / "model_final.safetensors")) if (run / "model_final.safetensors").exists() else None
    joined = next((i for i, ln in enumerate(lines) if f"site '{HOSTILE}' joined" in ln), 0)
    (rdir / "hostile.log").write_text("\n".join(hostile.events) + "\n")
    (rdir / "hostile.json").write_text(json.dumps(
        {"outcomes": [o.__dict__ for o in hostile.rec.outcomes], "attack_at": hostile.rec.attack_at,
         "attack_end": hostile.rec.attack_end, "server_up_after": hostile.rec.server_up_after,
         "notes": hostile.rec.notes, "errors": hostile.rec.errors}, indent=2))
    return Run(name, wall, rc, hostile.rec, rdir, lines, audit, metrics, complete, rounds_done, model, joined)


# ---------------------------------------------------------------------- the table


def _md(s: str, limit: int = 120) -> str:
    s = s if len(s) <= limit else s[: limit - 3] + "..."
    return s.replace("|", "\\|").replace("\n", "\\n")


def how_refused(r: Run, attack: str) -> str:
    """What the hostile client saw, grouped: label: CODE xN (at once | after a-b s)."""
    if attack == "3":
        rows = [a for a in r.audit if a["site"] == HOSTILE and a["kind"] == "fit" and a["round"] == 1]
        if not rows:
            return "no audit row for its task"
        row = rows[0]
        how = "cut off" if "cut off" in (row["reason"] or "") else row["status"]
        return f"task failed ({how}) after {row['seconds']:.1f} s; download stream left open"
    groups: dict[tuple[str, str], list[Outcome]] = {}
    for o in r.rec.outcomes:
        groups.setdefault((o.label, o.code), []).append(o)
    parts = []
    for (label, code), os_ in groups.items():
        lo, hi = min(o.seconds for o in os_), max(o.seconds for o in os_)
        when = "at once" if hi < 0.5 else (f"after {lo:.1f} s" if hi - lo < 0.2 else f"after {lo:.1f}-{hi:.1f} s")
        if code in ("CANCELLED", "DEADLINE_EXCEEDED") and hi >= 0.5:
            when = "cut off " + when
        mark = " (ended by the attacker: NOT cut)" if any(o.by_attacker for o in os_) else ""
        n = f" x{len(os_)}" if len(os_) > 1 else ""
        parts.append(f"{label}: {code}{n} {when}{mark}")
    return "; ".join(parts) or "nothing sent"


_REFUSAL = re.compile(r"refused|cut off|left out|could not evaluate|reported an error|cannot take part|excluded")


def _norm(text: str) -> str:
    """A message with its numbers and addresses blanked: lines that differ only there are one."""
    return re.sub(r"\d+(\.\d+)?", "#", re.sub(r"\(ipv[46]:[^)]*\)", "", text))


def logged_reason(r: Run, attack: str, most: int = 2) -> str:
    """The first run.log lines (up to ``most`` different ones) after the hostile site joined
    that name it with a refusal, a cut or a failure, other than its declines."""
    found: dict[str, str] = {}
    for ln in r.log_lines[r.hostile_joined_line:]:
        if HOSTILE not in ln or DECLINE in ln or not _REFUSAL.search(ln):
            continue
        if attack == "6" and "99/99" not in ln:
            continue
        m = re.match(r"\S+ (\w+) (.*)$", ln)
        text = f"{m.group(1)} {m.group(2)}" if m else ln
        found.setdefault(_norm(text), _md(text, 150))
        if len(found) >= most:
            break
    return " / ".join(found.values()) or "NONE"


def _hostile_rows(r: Run) -> list[dict]:
    return [a for a in r.audit if a["site"] == HOSTILE and a["status"] != "accepted"
            and DECLINE not in (a["reason"] or "")]


def audited(r: Run, most: int = 2) -> str:
    rows = _hostile_rows(r)
    if not rows:
        return "NO"
    shown: dict[str, str] = {}
    for a in rows:
        text = f"{a['kind']} r{a['round']} {a['status']}: {a['reason']}"
        shown.setdefault(_norm(text), _md(text, 110))
    parts = list(shown.values())[:most]
    more = f" ({len(rows)} rows)" if len(rows) > 1 else ""
    return "yes: " + " / ".join(parts) + more


def completed(r: Run, ref: Run | None) -> str:
    import torch

    # the honest sites' evaluations: a val AUC (or accuracy) of each, every round
    honest = all(any(m["site"] == s and m["arm"] == "federated" and m["round"] == k and m["split"] == "val"
                     and m["metric"] in ("auc", "accuracy") for m in r.metrics)
                 for s in HONEST for k in range(1, ROUNDS + 1))
    trained = all(any(m["site"] == s and m["arm"] == "federated" and m["round"] == k and m["metric"] == "loss"
                      for m in r.metrics) for s in HONEST for k in range(1, ROUNDS + 1))
    ev = f"honest training records {'yes' if trained else 'NO'}, honest evaluation records {'yes' if honest else 'NO'}"
    if not (r.complete and r.rounds_done == ROUNDS):
        return f"NO: {r.rounds_done}/{ROUNDS} rounds, run.json {'complete' if r.complete else 'missing'}"
    if ref is not None and ref.model is not None and r.model is not None and r is not ref:
        same = r.model.keys() == ref.model.keys() and all(torch.equal(r.model[k], ref.model[k]) for k in r.model)
        if same:
            return f"yes: model = reference; {ev}"
        return f"{ROUNDS}/{ROUNDS} rounds, {ev}; model differs from the reference"
    return f"{ROUNDS}/{ROUNDS} rounds, {ev}"


def server_error(r: Run) -> str:
    """The last line of the server's output that names an error, for a server that failed."""
    lines = [ln.strip() for ln in (r.folder / "server.log").read_text(errors="replace").splitlines()]
    errs = [ln for ln in lines if re.search(r"Error|error:", ln)]
    return errs[-1][:160] if errs else (lines[-1][:160] if lines else "")


def server_up(r: Run) -> str:
    after = r.rec.server_up_after
    if r.rc != 0:
        return f"NO: exit {r.rc} ({_md(server_error(r), 100)})"
    return f"{'yes' if after else ('NO' if after is False else '? (attack never ran)')}; exit {r.rc}"


def checks(r: Run, attack: str) -> list[str]:
    """What the row alone does not show, and what did not behave as the issue requires."""
    out = list(r.rec.errors)
    if r.rc != 0:
        out.append(f"the SERVER FAILED (exit {r.rc}): {server_error(r)}")
    if attack not in ("-", None) and r.rec.attack_at is None:
        out.append("the attack never ran (no task reached the hostile site)")
    refused = [o for o in r.rec.outcomes if o.code not in ("OK", "held")]
    out.append(f"calls of the attack: {len(r.rec.outcomes)} ({len(refused)} refused or cut by the server); "
               f"audit rows of {HOSTILE} other than its declines: {len(_hostile_rows(r))}")
    cuts = [ln for ln in r.log_lines if "cut off the" in ln and f"site '{HOSTILE}'" in ln]
    if cuts and not any("cut off" in (a["reason"] or "") for a in _hostile_rows(r)):
        m = re.match(r"\S+ \w+ (.*)$", cuts[0])
        out.append(f"the server cut {len(cuts)} call(s) of {HOSTILE} (run.log: {(m.group(1) if m else cuts[0])[:150]}) "
                   "but NO audit row says so")
    no_peer = [ln for ln in r.log_lines if f"site '{HOSTILE}' ()" in ln]
    if no_peer:
        out.append(f"{len(no_peer)} run.log line(s) about {HOSTILE} with an empty peer address '()'")
    honest_refused = [ln for ln in r.log_lines if "refused" in ln and any(f"site '{h}'" in ln for h in HONEST)]
    if honest_refused:
        m = re.match(r"\S+ \w+ (.*)$", honest_refused[0])
        out.append(f"answers of the HONEST sites refused by the server: {len(honest_refused)} run.log lines, first: "
                   f"{(m.group(1) if m else honest_refused[0])[:160]}")
    acc = [a for a in r.audit if a["site"] in HONEST and a["kind"] == "fit" and a["status"] == "accepted"]
    if len(acc) != len(HONEST) * ROUNDS:
        out.append(f"honest fit answers accepted: {len(acc)} of {len(HONEST) * ROUNDS}")
    if attack in ("4", "5"):
        mine = [m for m in r.metrics if m["site"] == HOSTILE]
        if mine:
            out.append(f"{len(mine)} metric records of {HOSTILE} in metrics.jsonl, e.g. {mine[0]}")
        pooled = [m["value"] for m in r.metrics if m["site"] == "all" and m["metric"] == "auc" and m["split"] == "val"]
        if pooled:
            out.append(f"consortium val AUC (site 'all') by round: {', '.join(f'{v:.3f}' for v in pooled if v is not None)}")
        if attack == "5" and any(m["metric"] == "sensitivity_forged" for m in r.metrics):
            out.append("the unknown metric is in metrics.jsonl")
    if attack == "6":
        run = r.folder / "run"
        raw = (run / "run.log").read_bytes() if (run / "run.log").exists() else b""
        term = (r.folder / "server.log").read_bytes()
        forged_line = any(re.match(r"(\S+ )?\S+ INFO federated round 99/99 done", ln) or
                          ln.startswith("2026-12-04T10:00:00.000") for ln in r.log_lines)
        state = b""
        if (run / "state.sqlite").exists():
            db = sqlite3.connect(f"file:{run / 'state.sqlite'}?mode=ro", uri=True)
            state = "\n".join(str(a[0]) for a in db.execute("SELECT reason FROM audit WHERE reason IS NOT NULL")
                              ).encode()
            db.close()
        report = (run / "report.html").read_bytes() if (run / "report.html").exists() else b""
        out.append("forged 'round 99/99 done' line at the start of a run.log line: " + ("YES" if forged_line else "no")
                   + "; ESC/BEL bytes in run.log: " + ("YES" if b"\x1b" in raw or b"\x07" in raw else "no")
                   + ", in the server's terminal output: " + ("YES" if b"\x1b]0;owned" in term or b"\x1b[2J" in term
                                                                 else "no")
                   + ", in state.sqlite's audit reasons: " + ("YES" if b"\x1b" in state or b"\n2026" in state else "no")
                   + ", in report.html: " + ("YES" if b"\x1b" in report else "no"))
        n_lines = sum("99/99" in ln for ln in r.log_lines)
        out.append(f"run.log lines holding the forged text (escaped): {n_lines}")
    out.extend(r.rec.notes)
    return out


# ---------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="keep kits, runs and logs here (default: a temporary folder)")
    ap.add_argument("--only", default=None, help=f"one attack: {', '.join(ATTACKS)} (7 = 7a and 7b)")
    ap.add_argument("--round-timeout", type=float, default=20.0, help="the job's round_timeout, s (default 20)")
    args = ap.parse_args()
    chosen = list(ATTACKS)
    if args.only is not None:
        chosen = [a for a in ATTACKS if a == args.only or (args.only == "7" and a.startswith("7"))]
        if not chosen:
            ap.error(f"--only must be one of {', '.join(ATTACKS)} or 7")

    import grpc

    import medfed

    def git(*a: str) -> str:
        try:  # read-only: no index refresh
            return subprocess.run(["git", "--no-optional-locks", *a], cwd=Path(__file__).resolve().parent.parent, check=False,
                                  capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = ", with uncommitted changes" if git("status", "--porcelain", "--untracked-files=no", "--", "src") else ""
    signal.signal(signal.SIGTERM, _terminate)
    t_all = time.monotonic()
    print(f"# medfed {medfed.__version__} (git {commit}{dirty} in src/), Python {platform.python_version()}, grpcio {grpc.__version__}, "
          f"{platform.machine()}, {date.today()}; 1 server + 2 honest site processes + 1 hostile site "
          f"(this process) on 127.0.0.1; {ROUNDS} rounds, round_timeout {args.round_timeout:g} s, min_sites 2",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.out or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            kits, port = make_kits(folder, "attacks")
            refs = [one_run(f"reference_{i}", None, kits, port, folder, args.round_timeout) for i in (1, 2)]
            ref = refs[0]
            ref_wall = sum(x.wall for x in refs) / len(refs)
            print(f"reference runs (hostile site declines every task): {', '.join(f'{x.wall:.1f}' for x in refs)} s; "
                  f"the second {completed(refs[1], ref)}", flush=True)
            runs = []
            for a in chosen:
                r = one_run(f"attack_{a}", a, kits, port, folder, args.round_timeout)
                print(f"attack {a}: {r.wall:.1f} s", flush=True)
                runs.append((a, r))
        finally:
            kill_all()
        print()
        print("| # | attack | refused? (how) | reason logged by the server (run.log) | audited? (state.sqlite) "
              "| server still up | run completed with the honest sites' model | s the attack cost |")
        print("|---|---|---|---|---|---|---|---:|")
        print(f"| - | reference (x2): hostile site declines every task | - | - | - "
              f"| exit {', '.join(str(x.rc) for x in refs)} | {completed(ref, None)}; 2nd: {completed(refs[1], ref)} "
              f"| ({' / '.join(f'{x.wall:.1f}' for x in refs)} s) |")
        for a, r in runs:
            print(f"| {a} | {ATTACKS[a]} | {_md(how_refused(r, a), 400)} | {logged_reason(r, a)} | {audited(r)} "
                  f"| {server_up(r)} | {completed(r, ref)} | {r.wall - ref_wall:+.1f} |")
        print()
        for i, x in enumerate(refs, start=1):
            for c in checks(x, "-")[1:]:  # not the count of attacking calls: there are none
                print(f"- reference {i}: {c}")
        for a, r in runs:
            for c in checks(r, a):
                print(f"- attack {a}: {c}")
        print(f"\ntotal: {time.monotonic() - t_all:.0f} s" + (f"; files in {folder}" if args.out else ""))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        kill_all()
        print("\ninterrupted: every process this script started has been killed", file=sys.stderr)
        sys.exit(130)
    finally:
        kill_all()
