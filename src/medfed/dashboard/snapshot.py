"""The dashboard's view of a run: everything the page shows, as one JSON object.

:class:`RunView` reads the run folder (followed by :class:`~medfed.dashboard.source.RunSource`)
when it changed, at most once per ``MIN_INTERVAL`` seconds however many pages poll, and
keeps the result until the next change. A file that cannot be read becomes a line in
``problems``, never an error of the page: a run in progress is read while it is written.

The object (times in seconds since the Unix epoch, sizes in bytes)::

    {"version", "server_time", "folder", "mode": "simulation" | "deployment",
     "status": {"state": "running" | "complete" | "stopped" | "gone", "text", "last_write"},
     "job": {"name", "hash", "rounds", "algorithm", "task", "model", "sites", "yaml", ...},
     "progress": {"round", "done", "total", "in_round", "timing": [...], "arms": [...]},
     "sites": [{"name", "state", "cause", "arm", "round", "last_seen", "held_out"}],
     "curves": [{"key", "split", "metric", "rounds": [...], "series": [{"site", "arm", "values"}]}],
     "privacy": {"rounds", "epsilon", "budget", "delta"} | null,
     "bytes": {"rounds", "series": [{"label", "values"}]} | null,
     "audit": {"total", "statuses", "rows": [...]} | null,
     "log": {"lines": [{"level", "text"}]}, "problems": [...]}
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from medfed.core.errors import MedfedError
from medfed.dashboard.progress import round_progress, site_states, store_events
from medfed.dashboard.readers import Event, LineFollower, metric_line, parse_log_line, read_store
from medfed.dashboard.source import STORE_NAME, WATCHED, RunSource, Where, stamp
from medfed.tracking.metrics import ARMS, CONSORTIUM_SITES, site_order

MIN_INTERVAL = 0.5  # seconds between two looks at the run folder
LOG_LINES = 200  # the log tail shown
MAX_LINE = 2000  # characters of a log line shown
AUDIT_ROWS = 200  # the latest audit rows shown (all of them stay in state.sqlite)
MAX_JOB_BYTES = 256 * 1024
OWN_CHARTS = {"epsilon", "bytes_sent", "model_bytes"}  # shown in charts of their own, not as curves


class RunView:
    """The latest snapshot of one run, rebuilt when the run folder changes."""

    def __init__(self, source: RunSource):
        self.source = source
        self._lock = threading.Lock()
        self._checked = -MIN_INTERVAL
        self._version = ""
        self._body = b""
        self._last: dict[str, Any] | None = None
        self._metrics = LineFollower()
        self._records: list[dict] = []
        self._log = LineFollower()
        self._tail: deque[dict[str, str]] = deque(maxlen=LOG_LINES)
        self._events: list[Event] = []
        self._job_key: tuple | None = None
        self._job: dict[str, Any] = {}
        self._job_problems: list[str] = []

    def current(self) -> tuple[str, bytes]:
        """(version, the snapshot as JSON bytes); the version changes with the snapshot."""
        with self._lock:
            now = time.monotonic()
            if not self._version or now - self._checked >= MIN_INTERVAL:
                self._checked = now
                where = self.source.where()
                version = stamp(where)
                if version != self._version:
                    snap = self._build(where) | {"version": version}
                    self._body = json.dumps(snap, allow_nan=False).encode()
                    self._version = version
            return self._version, self._body

    # ----------------------------------------------------------------------- building

    def _build(self, where: Where) -> dict[str, Any]:
        if where.folder is None:
            return self._gone()
        folder = where.folder
        problems: list[str] = []
        deployment = (folder / STORE_NAME).is_file()
        job = self._job_info(folder, problems)
        run = _read_json(folder / "run.json", problems)
        sites_file = _read_json(folder / "sites.json", problems)
        self._follow_log(folder, problems)
        store = None
        if deployment:
            try:
                store = read_store(folder / STORE_NAME)
            except MedfedError as e:
                problems.append(str(e))
        if store is not None:
            records = store["metrics"]
            events = store_events(store) + [e for e in self._events if e.kind == "ready"]
            job["hash"] = store["job_hash"] or job.get("hash")
        else:
            self._follow_metrics(folder, problems)
            records = self._records
            events = self._events
        if run and run.get("job_hash"):
            job["hash"] = str(run["job_hash"])

        names = list(job.get("sites") or [])
        described = (sites_file or {}).get("sites")
        described = [s for s in described if isinstance(s, dict) and isinstance(s.get("name"), str)] \
            if isinstance(described, list) else []
        built = [s["name"] for s in described]
        held = list(job.get("held_out") or []) + [s["name"] for s in described if s.get("held_out")]
        seen = {p["name"]: p["last_seen"] for p in store["participants"]} if store else None
        snap = {
            "server_time": time.time(),
            "folder": str(folder),
            "mode": "deployment" if deployment else "simulation",
            "status": _status(where, run, folder, deployment),
            "job": job,
            "progress": round_progress(events, records, job.get("rounds")),
            "sites": site_states(names or built, held, events, present=[] if deployment else built,
                                 infer_answers=not deployment, last_seen=seen),
            **charts(records, job, store["audit"] if store else None),
            "audit": audit(store),
            "log": {"lines": list(self._tail)},
            "problems": problems,
        }
        self._last = snap
        return snap

    def _gone(self) -> dict[str, Any]:
        text = ("the run folder is gone: a simulation that stops with an error removes its staging folder, "
                "or the folder was moved or removed")
        last = dict(self._last) if self._last is not None else {
            "folder": str(self.source.output), "mode": "simulation", "job": {}, "progress": None, "sites": [],
            "curves": [], "privacy": None, "bytes": None, "audit": None, "log": {"lines": []}, "problems": []}
        return last | {"server_time": time.time(), "status": {"state": "gone", "text": text, "last_write": None}}

    def _job_info(self, folder: Path, problems: list[str]) -> dict[str, Any]:
        path = folder / "job.yaml"
        try:
            st = path.stat()
        except OSError:
            return {}
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        if key != self._job_key:
            self._job_key = key
            self._job_problems = []
            self._job = job_info(path, self._job_problems)
        problems.extend(self._job_problems)
        return dict(self._job)

    def _follow_log(self, folder: Path, problems: list[str]) -> None:
        try:
            lines, restart = self._log.read(folder / "run.log")
        except OSError as e:
            problems.append(f"'{folder / 'run.log'}' cannot be read: {e.strerror or e}")
            return
        if restart:
            self._tail.clear()
            self._events = []
        last = None
        for line in lines:
            when, level, event = parse_log_line(line)
            if when is None:  # not one of run.log's records: part of the one before
                level = last or "INFO"
            last = level
            self._tail.append({"level": level, "text": line[:MAX_LINE]})
            if event is not None:
                self._events.append(event)

    def _follow_metrics(self, folder: Path, problems: list[str]) -> None:
        try:
            lines, restart = self._metrics.read(folder / "metrics.jsonl")
        except OSError as e:
            problems.append(f"'{folder / 'metrics.jsonl'}' cannot be read: {e.strerror or e}")
            return
        if restart:
            self._records = []
        bad = 0
        for line in lines:
            if not line.strip():
                continue
            record = metric_line(line)
            if record is None:
                bad += 1
            else:
                self._records.append(record)
        if bad:
            problems.append(f"{folder / 'metrics.jsonl'}: {bad} line(s) that are not metric records were skipped")


# --------------------------------------------------------------------------- sections


def _read_json(path: Path, problems: list[str]) -> dict | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        problems.append(f"'{path}' cannot be read: {e}")
        return None
    if not isinstance(obj, dict):
        problems.append(f"'{path}' does not hold a JSON object")
        return None
    return obj


def job_info(path: Path, problems: list[str]) -> dict[str, Any]:
    """The job of a run folder: its settings from ``job.yaml`` (checked by
    :func:`medfed.config.load_job`, whose hash it gives) and the file's text. A job this
    medfed cannot load still shows its name, rounds and sites, read as plain YAML."""
    from medfed.config import load_job

    try:
        text = path.read_text(encoding="utf-8")[:MAX_JOB_BYTES]
    except (OSError, UnicodeDecodeError) as e:
        problems.append(f"'{path}' cannot be read: {e}")
        return {}
    info: dict[str, Any] = {"yaml": text}
    try:
        job = load_job(path)
    except MedfedError as e:
        problems.append(f"the job cannot be loaded by this medfed ({e}); its hash is shown once the run writes it")
        return info | _raw_job(text)
    return info | job_summary(job)


def job_summary(job: Any) -> dict[str, Any]:
    """What the page shows of a :class:`medfed.config.Job`, with its hash."""
    dp = job.privacy.dp or job.privacy.dp_sgd
    return {
        "name": job.name, "hash": job.job_hash(), "rounds": job.rounds, "algorithm": job.algorithm.name,
        "task": job.task.kind, "monitor": job.task.monitor, "model": job.model.label, "transport": job.transport,
        "sites": list(job.site_names), "held_out": list(job.held_out), "compare": list(job.compare),
        "budget": dp.max_epsilon if dp is not None else None, "delta": dp.delta if dp is not None else None,
        "dp": None if dp is None else ("DP-FedAvg, " + job.privacy.dp.noise + " noise" if job.privacy.dp is not None
                                       else "DP-SGD"),
    }


def _raw_job(text: str) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError:
        return {}
    if not isinstance(raw, dict):
        return {}
    sites = ((raw.get("data") or {}).get("sites") or []) if isinstance(raw.get("data"), dict) else []
    rounds = raw.get("rounds")
    return {"name": str(raw.get("name", "")), "rounds": rounds if isinstance(rounds, int) else None,
            "sites": [str(s["name"]) for s in sites if isinstance(s, dict) and "name" in s]}


def _status(where: Where, run: dict | None, folder: Path, deployment: bool) -> dict[str, Any]:
    last_write = None
    for name in WATCHED:
        try:
            last_write = max(last_write or 0.0, (folder / name).stat().st_mtime)
        except OSError:
            continue
    if where.staging and where.alive:
        state, text = "running", f"simulation in progress (process {where.pid})"
    elif where.staging:
        state, text = "stopped", (f"the process that wrote this run (pid {where.pid}) is gone: the run was killed "
                                  "before it finished, and its staging folder was left behind")
    elif run is not None and run.get("status") == "complete":
        state, text = "complete", "complete" + (f", finished {_when(run.get('finished'))}" if run.get("finished") else "")
    elif deployment:
        state, text = "running", ("deployment in progress (no run.json yet): running, or stopped; a stopped server "
                                  "continues with `medfed server --resume`")
    else:
        state, text = "running", "in progress (no run.json yet)"
    return {"state": state, "text": text, "last_write": last_write}


def _when(iso: Any) -> str:
    try:
        return datetime.fromisoformat(str(iso)).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return str(iso)


def curves(records: list[dict], monitor: str | None) -> list[dict[str, Any]]:
    """Every (split, metric) recorded, as a table for a chart: the rounds, and one series
    per site and arm with its value at each round (None where none). The job's monitor on
    test comes first, then val, then the other metrics; epsilon and bytes are left to their
    own charts."""
    points: dict[tuple[str, str], dict[tuple[str, str], dict[int, float | None]]] = {}
    for r in records:
        if r["metric"] in OWN_CHARTS:
            continue
        points.setdefault((r["split"], r["metric"]), {}).setdefault((r["site"], r["arm"]), {})[r["round"]] = r["value"]
    split_rank = {"test": 0, "val": 1, "train": 2}

    def rank(key: tuple[str, str]) -> tuple:
        split, metric = key
        return (metric != monitor, metric != "loss", split_rank.get(split, 3), metric)

    sites = site_order(records)
    out = []
    for key in sorted(points, key=rank):
        series = points[key]
        rounds = sorted({rnd for values in series.values() for rnd in values})
        rows = [{"site": site, "arm": arm, "values": [series[(site, arm)].get(rnd) for rnd in rounds]}
                for site in sites for arm in ARMS if (site, arm) in series]
        out.append({"key": f"{key[0]}/{key[1]}", "split": key[0], "metric": key[1], "rounds": rounds,
                    "series": rows})
    return out


def charts(records: list[dict], job: dict[str, Any], audit_rows: list[dict] | None = None) -> dict[str, Any]:
    """The snapshot's charts of a run's metrics (and a deployment's audit rows):
    ``curves``, ``privacy`` and ``bytes``, as in the dashboard; ``job`` as :func:`job_summary`."""
    return {"curves": curves(records, job.get("monitor")), "privacy": privacy(records, job),
            "bytes": traffic(records, None if audit_rows is None else {"audit": audit_rows})}


def _by_round(records: list[dict], metric: str, site: str | None) -> dict[int, float]:
    """Federated ``metric`` per round: the value of ``site``, or the sum over the sites (None)."""
    out: dict[int, float] = {}
    for r in records:
        if r["arm"] != "federated" or r["metric"] != metric or r["value"] is None:
            continue
        if site is None and r["site"] not in CONSORTIUM_SITES:
            out[r["round"]] = out.get(r["round"], 0.0) + r["value"]
        elif r["site"] == site:
            out[r["round"]] = r["value"]
    return out


def privacy(records: list[dict], job: dict[str, Any]) -> dict[str, Any] | None:
    """Epsilon after each federated round, with the job's budget; None without DP."""
    eps = _by_round(records, "epsilon", "all")
    if not eps and not job.get("dp"):
        return None
    rounds = sorted(eps)
    return {"rounds": rounds, "epsilon": [eps[r] for r in rounds], "budget": job.get("budget"),
            "delta": job.get("delta"), "mechanism": job.get("dp")}


def traffic(records: list[dict], store: dict[str, Any] | None) -> dict[str, Any] | None:
    """Bytes per federated round: the update tensors the sites sent (metrics), the model's
    size and, for a deployment, what crossed the wire either way (audit)."""
    series = {"update tensors sent by the sites": _by_round(records, "bytes_sent", None),
              "model size": _by_round(records, "model_bytes", "all")}
    if store is not None:
        down: dict[int, float] = {}
        up: dict[int, float] = {}
        for a in store["audit"]:
            rnd, sent, received = a.get("round"), a.get("bytes_sent"), a.get("bytes_received")
            if a.get("arm") == "federated" and a.get("status") != "redone" and isinstance(rnd, int) \
                    and isinstance(sent, int) and isinstance(received, int):
                down[rnd] = down.get(rnd, 0) + sent
                up[rnd] = up.get(rnd, 0) + received
        series |= {"server to sites (wire)": down, "sites to server (wire)": up}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    rounds = sorted({r for v in series.values() for r in v if r >= 1})
    return {"rounds": rounds, "series": [{"label": k, "values": [v.get(r) for r in rounds]} for k, v in series.items()]}


def audit(store: dict[str, Any] | None) -> dict[str, Any] | None:
    """The latest audit rows (newest first) and the count of each status; None in a simulation."""
    if store is None:
        return None
    rows = store["audit"]
    statuses: dict[str, int] = {}
    for a in rows:
        statuses[a["status"]] = statuses.get(a["status"], 0) + 1
    return {"total": len(rows), "statuses": statuses, "rows": rows[::-1][:AUDIT_ROWS]}
