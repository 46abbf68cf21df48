"""Reading a run folder while it is written, without ever writing to it.

* :class:`LineFollower`: the new complete lines of an append-only file (``metrics.jsonl``,
  ``run.log``) since the last read; it starts over when the file is replaced or shrinks.
* :func:`read_store`: a deployment's ``state.sqlite``, opened read-only (``mode=ro``); in WAL
  mode a reader neither waits for the server nor holds it up (while the server holds the
  store open, SQLite's readers share its ``-shm`` index; one closed is read as immutable).
* :func:`parse_log_line`: the events of a ``run.log`` line that say what a site is doing.

Times are seconds since the Unix epoch.
"""

from __future__ import annotations

import json
import math
import os
import re
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from medfed.core.errors import RunDirError
from medfed.tracking.metrics import FIELDS

MAX_READ = 64 * 1024 * 1024  # bytes read from a file per refresh; the rest at the next one


class LineFollower:
    """The complete lines appended to ``path`` since the last :meth:`read`.

    A line without its newline yet is left for the next read. When the file is replaced (a
    new inode) or shrinks, the follower starts again from its first line and :meth:`read`
    says so, so that what was built from the old lines can be dropped. Moving the folder
    that holds the file (a staging folder put into place) keeps the inode: nothing is re-read.
    """

    def __init__(self) -> None:
        self.inode: int | None = None
        self.offset = 0

    def read(self, path: Path) -> tuple[list[str], bool]:
        """(new lines, whether the file started over). A missing file: no lines."""
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                restart = st.st_ino != self.inode or st.st_size < self.offset
                if restart:
                    self.inode, self.offset = st.st_ino, 0
                f.seek(self.offset)
                data = f.read(min(MAX_READ, max(0, st.st_size - self.offset)))
        except FileNotFoundError:
            restart = self.inode is not None
            self.inode, self.offset = None, 0
            return [], restart
        end = data.rfind(b"\n") + 1
        self.offset += end
        lines = data[:end].decode("utf-8", errors="replace").splitlines()
        return lines, restart


def metric_line(line: str) -> dict | None:
    """One ``metrics.jsonl`` line as a record, or None if it is not one."""
    try:
        return metric_record(json.loads(line))
    except json.JSONDecodeError:
        return None


def metric_record(obj: Any) -> dict | None:
    """A metrics record (round, arm, site, split, metric, value) checked, its value a finite
    number or None; None if ``obj`` is not one."""
    if not isinstance(obj, dict) or any(f not in obj for f in FIELDS):
        return None
    rnd, value = obj["round"], obj["value"]
    if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 1:
        return None
    if not all(isinstance(obj[k], str) and obj[k] for k in ("arm", "site", "split", "metric")):
        return None
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value)):
        value = None
    return {f: obj[f] for f in FIELDS} | {"value": value}


# --------------------------------------------------------------------------- state.sqlite


def read_store(path: Path) -> dict[str, Any]:
    """What a deployment's ``state.sqlite`` holds, read in one read-only transaction:
    ``job_hash``, ``participants``, ``rounds``, ``audit`` (rows as server/store.py
    writes them) and ``metrics`` (records in the order first written).

    RunDirError when the file cannot be opened or is not a medfed store."""
    # a store no server holds open has no -wal file: read it as immutable, or SQLite would
    # create -wal and -shm beside it; a server that opens it meanwhile is seen at the next read
    idle = not Path(f"{path}-wal").exists()
    uri = f"file:{quote(str(path))}?mode=ro" + ("&immutable=1" if idle else "")
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=2.0, isolation_level=None)
    except sqlite3.Error as e:
        raise RunDirError(f"'{path}' cannot be opened read-only: {e}") from None
    try:
        conn.row_factory = sqlite3.Row
        conn.execute("BEGIN")  # one snapshot of the database for every query below
        rows = lambda sql: [dict(r) for r in conn.execute(sql)]  # noqa: E731
        job = rows("SELECT job_hash FROM job WHERE id = 1")
        out = {
            "job_hash": job[0]["job_hash"] if job else None,
            "participants": rows("SELECT name, address, first_seen, last_seen, connects FROM participants "
                                 "ORDER BY rowid"),
            "rounds": rows("SELECT arm, round, sites, started, completed FROM rounds ORDER BY started, arm, round"),
            "audit": rows('SELECT id, arm, round, site, kind, status, bytes_sent, bytes_received, seconds, reason, '
                          '"when" FROM audit ORDER BY id'),
            "metrics": [metric_record(r) for r in
                        rows("SELECT round, arm, site, split, metric, value FROM metrics ORDER BY id")],
        }
        conn.execute("COMMIT")
    except sqlite3.Error as e:
        hint = ("; run the dashboard as the user that runs `medfed server`" if "unable to open" in str(e)
                else "")
        raise RunDirError(f"'{path}' cannot be read as a medfed run state: {e}{hint}") from None
    finally:
        conn.close()
    for r in out["rounds"]:
        try:
            r["sites"] = [str(s) for s in json.loads(r["sites"])]
        except (TypeError, ValueError):
            r["sites"] = []
    out["metrics"] = [m for m in out["metrics"] if m is not None]
    return out


# --------------------------------------------------------------------------- run.log

_LINE = re.compile(r"^(?P<when>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?) (?P<level>[A-Z]+) (?P<msg>.*)$")


@dataclass(frozen=True)
class Event:
    """What a log line says about the run: ``kind`` is one of ``round_started``,
    ``round_done``, ``failed``, ``joined``, ``ready``, ``declined``, ``left_out``,
    ``budget_stop`` (and, from a deployment's audit, ``answered``); ``sites`` the sites it
    concerns; ``cause`` why, for a failure; ``seen``: whether the site was heard from then
    (not for a timeout)."""

    when: float
    kind: str
    arm: str | None = None
    round: int | None = None
    rounds: int | None = None
    sites: tuple[str, ...] = ()
    cause: str | None = None
    seen: bool = True


_Maker = Callable[[float, re.Match], Event]
_PATTERNS: list[tuple[re.Pattern, _Maker]] = [
    (re.compile(r"^(\w+) round (\d+)/(\d+) started: (.*)$"),
     lambda t, m: Event(t, "round_started", m[1], int(m[2]), int(m[3]), tuple(s for s in m[4].split(", ") if s))),
    (re.compile(r"^(\w+) round (\d+)/(\d+) done "),
     lambda t, m: Event(t, "round_done", m[1], int(m[2]), int(m[3]))),
    (re.compile(r"^(\w+) round (\d+): site '(.+?)' (left out|could not evaluate|reported an error): (.*)$"),
     lambda t, m: Event(t, "failed", m[1], int(m[2]), sites=(m[3],),
                        cause=m[5] if m[4] == "left out" else f"{m[4]}: {m[5]}")),
    (re.compile(r"^site '(.+?)' joined from "), lambda t, m: Event(t, "joined", sites=(m[1],))),
    (re.compile(r"^site '(.+?)' is ready: "), lambda t, m: Event(t, "ready", sites=(m[1],))),
    (re.compile(r"^site '(.+?)' cannot take part in the job: (.*)$"),
     lambda t, m: Event(t, "declined", sites=(m[1],), cause=m[2])),
    (re.compile(r"^site '(.+?)' is left out of the run: (.*)$"),
     lambda t, m: Event(t, "left_out", sites=(m[1],), cause=m[2])),
    (re.compile(r"^federated training stopped after round (\d+) of (\d+): (.*)$"),
     lambda t, m: Event(t, "budget_stop", "federated", int(m[1]), int(m[2]), cause=m[3])),
]


def log_time(text: str) -> float | None:
    """The time of a run.log stamp (local time, as logging's asctime writes it), or None."""
    try:
        return time.mktime(datetime.fromisoformat(text).timetuple()) + (float("0." + text.split(".")[1])
                                                                         if "." in text else 0.0)
    except (ValueError, OverflowError, IndexError):
        return None


def parse_log_line(line: str) -> tuple[float | None, str, Event | None]:
    """(time, level, event or None) of one run.log line; (None, "", None) for a line not in
    run.log's format."""
    m = _LINE.match(line)
    if m is None:
        return None, "", None
    when = log_time(m["when"])
    if when is None:
        return None, "", None
    for pattern, make in _PATTERNS:
        found = pattern.match(m["msg"])
        if found:
            return when, m["level"], make(when, found)
    return when, m["level"], None
