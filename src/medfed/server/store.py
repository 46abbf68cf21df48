"""The run state of a deployed federation server: ``state.sqlite`` in the run folder.

The server is one process that may be killed at any time (kill -9 included) and resumed.
Everything it must know to resume lives here: the job the run folder belongs to, the
participants that connected, which rounds of each arm started and completed (and the
checkpoint file of each completed round), an audit row per exchange with a site, and the
metrics. ``metrics.jsonl`` and ``audit.json`` are exported from the store, so the report
reads the same files for simulated and deployed runs.

Every write is its own committed transaction; the database runs in WAL mode with
``synchronous=FULL``, so a kill loses at most the write in progress. The store is shared by
the threads of one process (gRPC handler threads and the round loop): one connection, every
method guarded by one lock.

Times (``when``, ``first_seen``, ``last_seen``, ``started``, ``completed``) are seconds since
the Unix epoch (``time.time()``); durations (``seconds``) are seconds; sizes are bytes.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Self

from medfed.core.errors import RunDirError
from medfed.core.text import printable
from medfed.core.types import CAUSE_LIMIT
from medfed.core.files import PRIVATE, atomic_write_text
from medfed.tracking.metrics import ARMS, FIELDS, SPLITS, _clean

SCHEMA_VERSION = 1
STORE_NAME = "state.sqlite"
# exchange: a protocol message of the update path (secure aggregation); call: a call cut off before
# it named a task (arm "connection", round 0)
KINDS = ("fit", "evaluate", "exchange", "call", "split")  # split: one turn of split learning (its Split call)
STATUSES = ("accepted", "refused", "failed", "timeout", "redone")
AUDIT_FIELDS = ("arm", "round", "site", "kind", "status", "bytes_sent", "bytes_received", "sha256", "seconds",
                "reason", "when")

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE job (id INTEGER PRIMARY KEY CHECK (id = 1), job_hash TEXT NOT NULL, job_json TEXT NOT NULL);
CREATE TABLE participants (
    name TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, address TEXT NOT NULL,
    first_seen REAL NOT NULL, last_seen REAL NOT NULL, connects INTEGER NOT NULL);
CREATE TABLE rounds (
    arm TEXT NOT NULL, round INTEGER NOT NULL, sites TEXT NOT NULL, started REAL,
    completed REAL, checkpoint TEXT, PRIMARY KEY (arm, round));
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, arm TEXT NOT NULL, round INTEGER NOT NULL, site TEXT NOT NULL,
    kind TEXT NOT NULL, status TEXT NOT NULL, bytes_sent INTEGER NOT NULL, bytes_received INTEGER NOT NULL,
    sha256 TEXT, seconds REAL NOT NULL, reason TEXT, "when" REAL NOT NULL);
CREATE INDEX audit_sha256 ON audit (sha256);
CREATE TABLE metrics (
    id INTEGER PRIMARY KEY AUTOINCREMENT, round INTEGER NOT NULL, arm TEXT NOT NULL, site TEXT NOT NULL,
    split TEXT NOT NULL, metric TEXT NOT NULL, value REAL,
    UNIQUE (round, arm, site, split, metric));
"""


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable by the run's user only (mode 0600):
    what the store exports is its audit trail and metrics."""
    atomic_write_text(Path(path), text, mode=PRIVATE)


def _create_private(path: Path) -> None:
    """Create ``path`` empty with mode 0600 unless it exists. The store holds the audit
    trail (who connected from where, what they sent): only the server's user may read it.
    SQLite gives the ``-wal`` and ``-shm`` files it adds the database file's mode."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), PRIVATE))
    except FileExistsError:
        pass


class RunStore:
    """state.sqlite of one run folder. Every write is its own committed transaction (WAL mode,
    synchronous=FULL) so a kill -9 loses at most the write in progress.

    Times are seconds since the Unix epoch, durations seconds, sizes bytes::

        with RunStore(run_dir / "state.sqlite") as store:
            store.set_job(job.job_hash(), job_json)
            store.round_started("federated", 1, ["north", "south"], time.time())
    """

    def __init__(self, path: Path):
        """Open the store at ``path``, creating its tables if the file is absent or empty.

        Raises RunDirError if the file cannot be opened, is not SQLite, is an SQLite database
        of something else, or carries a schema_version this medfed does not know.
        """
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            _create_private(self.path)
            self._conn: sqlite3.Connection | None = sqlite3.connect(
                self.path, timeout=10, isolation_level=None, check_same_thread=False)
        except (sqlite3.Error, OSError) as e:
            raise RunDirError(f"run state '{self.path}' cannot be opened: {e}") from None
        try:
            self._open()
        except sqlite3.Error as e:
            self._conn.close()
            self._conn = None
            raise RunDirError(f"run state '{self.path}' is not a medfed store ({e}); "
                              "move it away or use another run folder") from None
        except RunDirError:
            self._conn.close()
            self._conn = None
            raise

    def _open(self) -> None:
        conn = self._conn
        assert conn is not None
        # reading the schema first: a file that is not SQLite fails here, before any pragma writes to it
        conn.execute("SELECT name FROM sqlite_master").fetchall()
        conn.execute("PRAGMA journal_mode=WAL").fetchall()
        conn.execute("PRAGMA synchronous=FULL")
        with self._tx():
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not tables:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                return
            if "meta" not in tables:
                raise RunDirError(f"run state '{self.path}' is an SQLite database but not a medfed store "
                                  "(no meta table); move it away or use another run folder")
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None or row[0] != str(SCHEMA_VERSION):
                found = "none" if row is None else row[0]
                raise RunDirError(f"run state '{self.path}' has schema_version {found}; this medfed knows "
                                  f"{SCHEMA_VERSION}. Was it written by another medfed version?")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One committed transaction (rolled back on an exception). Callers hold the lock."""
        conn = self._conn
        if conn is None:
            raise ValueError(f"RunStore for '{self.path}' is closed")
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _query(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        """Rows of a read-only query as sqlite3.Row. Callers hold the lock."""
        conn = self._conn
        if conn is None:
            raise ValueError(f"RunStore for '{self.path}' is closed")
        cur = conn.execute(sql, params)
        cur.row_factory = sqlite3.Row
        return cur.fetchall()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ----------------------------------------------------------------------- job

    def set_job(self, job_hash: str, job_json: str) -> None:
        """Bind the run folder to a job. The first call stores it; a later call with the same
        hash does nothing, one with another hash raises RunDirError."""
        with self._lock, self._tx() as conn:
            row = conn.execute("SELECT job_hash FROM job WHERE id = 1").fetchone()
            if row is None:
                conn.execute("INSERT INTO job (id, job_hash, job_json) VALUES (1, ?, ?)", (job_hash, job_json))
            elif row[0] != job_hash:
                raise RunDirError(f"this run folder belongs to job {row[0]}, not {job_hash} "
                                  f"(run state '{self.path}'); use another output folder for a changed job")

    def job_hash(self) -> str | None:
        """The stored job hash, or None before :meth:`set_job`."""
        with self._lock:
            rows = self._query("SELECT job_hash FROM job WHERE id = 1")
        return rows[0]["job_hash"] if rows else None

    def job_json(self) -> str | None:
        """The stored job (as given to :meth:`set_job`), or None."""
        with self._lock:
            rows = self._query("SELECT job_json FROM job WHERE id = 1")
        return rows[0]["job_json"] if rows else None

    # ----------------------------------------------------------------------- participants

    def site_seen(self, site: str, fingerprint: str, address: str, when: float) -> None:
        """Record a connection of ``site`` at ``when`` (seconds since the epoch): the first one
        sets first_seen; every one updates last_seen, fingerprint, address and adds 1 to connects."""
        with self._lock, self._tx() as conn:
            conn.execute(
                "INSERT INTO participants (name, fingerprint, address, first_seen, last_seen, connects) "
                "VALUES (?, ?, ?, ?, ?, 1) ON CONFLICT (name) DO UPDATE SET fingerprint = excluded.fingerprint, "
                "address = excluded.address, last_seen = excluded.last_seen, connects = connects + 1",
                (site, fingerprint, address, float(when), float(when)))

    def participants(self) -> list[dict]:
        """``{name, fingerprint, address, first_seen, last_seen, connects}`` per site, in
        first-connection order; times in seconds since the epoch."""
        with self._lock:
            rows = self._query("SELECT name, fingerprint, address, first_seen, last_seen, connects "
                               "FROM participants ORDER BY rowid")
        return [dict(r) for r in rows]

    # ----------------------------------------------------------------------- rounds

    def round_started(self, arm: str, rnd: int, sites: list[str], when: float) -> None:
        """Round ``rnd`` of ``arm`` started at ``when`` (seconds since the epoch) with ``sites``.
        Starting a round again (a redo) clears its completion."""
        with self._lock, self._tx() as conn:
            conn.execute(
                "INSERT INTO rounds (arm, round, sites, started, completed, checkpoint) VALUES (?, ?, ?, ?, NULL, NULL) "
                "ON CONFLICT (arm, round) DO UPDATE SET sites = excluded.sites, started = excluded.started, "
                "completed = NULL, checkpoint = NULL",
                (arm, int(rnd), json.dumps(list(sites)), float(when)))

    def round_completed(self, arm: str, rnd: int, checkpoint: str, when: float) -> None:
        """Round ``rnd`` of ``arm`` completed at ``when`` (seconds since the epoch); ``checkpoint``
        is the file name of the saved global state. A round never started gets a row with no
        sites and no start time."""
        with self._lock, self._tx() as conn:
            conn.execute(
                "INSERT INTO rounds (arm, round, sites, started, completed, checkpoint) VALUES (?, ?, '[]', NULL, ?, ?) "
                "ON CONFLICT (arm, round) DO UPDATE SET completed = excluded.completed, "
                "checkpoint = excluded.checkpoint",
                (arm, int(rnd), float(when), checkpoint))

    def last_completed_round(self, arm: str) -> tuple[int, str] | None:
        """(round, checkpoint) of the highest completed round of ``arm``, or None."""
        with self._lock:
            rows = self._query("SELECT round, checkpoint FROM rounds WHERE arm = ? AND completed IS NOT NULL "
                               "ORDER BY round DESC LIMIT 1", (arm,))
        return (rows[0]["round"], rows[0]["checkpoint"]) if rows else None

    def rounds(self) -> list[dict]:
        """``{arm, round, sites, started, completed, checkpoint}`` per round started or completed,
        by arm (first-started order) and round; times in seconds since the epoch, None where
        not (yet) happened."""
        with self._lock:
            rows = self._query(
                "SELECT arm, round, sites, started, completed, checkpoint FROM rounds "
                "ORDER BY (SELECT MIN(r2.rowid) FROM rounds r2 WHERE r2.arm = rounds.arm), round")
        return [dict(r) | {"sites": json.loads(r["sites"])} for r in rows]

    # ----------------------------------------------------------------------- audit

    def audit(self, arm: str, rnd: int, site: str, kind: str, status: str, bytes_sent: int, bytes_received: int,
              sha256: str | None, seconds: float, reason: str | None = None, when: float | None = None) -> None:
        """One exchange of the server with ``site``: ``kind`` is "fit" or "evaluate", ``status``
        "accepted", "refused", "failed" or "timeout". ``bytes_sent`` (server to site) and
        ``bytes_received`` (site to server) are payload sizes in bytes, ``sha256`` the hex digest
        of the site's answer (None if there was none), ``seconds`` the duration of the exchange,
        ``reason`` why it was not accepted, ``when`` seconds since the epoch (default: now)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        if _clean(seconds) is None:
            raise ValueError(f"seconds must be a finite number, got {seconds!r}")
        when = time.time() if when is None else float(when)
        site = printable(site, 200)  # a site's name and reasons may come from the peer
        reason = None if reason is None else printable(reason, CAUSE_LIMIT)
        with self._lock, self._tx() as conn:
            conn.execute(
                'INSERT INTO audit (arm, round, site, kind, status, bytes_sent, bytes_received, sha256, seconds, '
                'reason, "when") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)',
                (arm, int(rnd), site, kind, status, int(bytes_sent), int(bytes_received), sha256, float(seconds),
                 reason, when))

    def seen_update(self, sha256: str) -> bool:
        """Whether an accepted fit update with this SHA-256 hex digest was recorded (replay check)."""
        with self._lock:
            rows = self._query("SELECT 1 FROM audit WHERE sha256 = ? AND kind = 'fit' AND status = 'accepted' "
                               "LIMIT 1", (sha256,))
        return bool(rows)

    def audit_rows(self) -> list[dict]:
        """All audit rows in the order written, each with the fields of :meth:`audit`."""
        with self._lock:
            rows = self._query('SELECT arm, round, site, kind, status, bytes_sent, bytes_received, sha256, seconds, '
                               'reason, "when" FROM audit ORDER BY id')
        return [dict(r) for r in rows]

    # ----------------------------------------------------------------------- metrics

    def write_metric(self, round: int, arm: str, site: str, split: str, metric: str, value: float | None) -> None:
        """Record one metric, as :meth:`medfed.tracking.metrics.MetricsWriter.write` (NaN and
        infinite values become None). A record with the same (round, arm, site, split, metric)
        is replaced in place: it keeps its position in the export, so a redone round rewrites
        its records instead of duplicating them."""
        if arm not in ARMS:
            raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        with self._lock, self._tx() as conn:
            conn.execute(
                "INSERT INTO metrics (round, arm, site, split, metric, value) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (round, arm, site, split, metric) DO UPDATE SET value = excluded.value",
                (int(round), arm, site, split, metric, _clean(value)))

    def last_values(self, arm: str, split: str, metric: str) -> dict[str, float]:
        """Each site's value of ``metric`` in the last round it has one (a resumed run's
        memory of, e.g., each site's last training loss); None values left out."""
        with self._lock:
            rows = self._query("SELECT site, value FROM metrics WHERE arm = ? AND split = ? AND metric = ? "
                               "AND value IS NOT NULL ORDER BY round", (arm, split, metric))
        return {r["site"]: float(r["value"]) for r in rows}

    def kept_rounds(self, arm: str) -> dict[str, int]:
        """Per site, the last round of ``arm`` whose update was accepted (and not redone):
        where a resumed run expects each site's algorithm state to be from."""
        with self._lock:
            rows = self._query("SELECT site, MAX(round) AS r FROM audit WHERE arm = ? AND kind = 'fit' "
                               "AND status = 'accepted' GROUP BY site", (arm,))
        return {r["site"]: int(r["r"]) for r in rows}

    def released_after(self, arm: str, rnd: int) -> int:
        """How many rounds of ``arm`` after ``rnd`` released something: an accepted update
        or evaluation in the audit (what a resume redoes, and so releases again)."""
        with self._lock:
            rows = self._query("SELECT COUNT(DISTINCT round) AS n FROM audit WHERE arm = ? AND round > ? "
                               "AND status = 'accepted' AND kind IN ('fit', 'evaluate')", (arm, int(rnd)))
        return int(rows[0]["n"])

    def add_released_again(self, n: int) -> int:
        """Add ``n`` to the run's count of rounds released twice (kept across resumes, for
        the privacy ledger); return the new count."""
        with self._lock, self._tx() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'released_again'").fetchone()
            total = (int(row[0]) if row is not None else 0) + int(n)
            conn.execute("INSERT INTO meta (key, value) VALUES ('released_again', ?) "
                         "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (str(total),))
        return total

    def drop_after(self, arm: str, rnd: int) -> None:
        """Forget the rounds of ``arm`` after ``rnd`` (on resume they are redone): delete
        their metrics and round rows. Their audit rows stay, as evidence of what was
        exchanged, but accepted updates become ``redone`` so that the same update sent
        again for the redone round is not taken for a replay. Other arms are kept."""
        with self._lock, self._tx() as conn:
            for table in ("metrics", "rounds"):
                conn.execute(f"DELETE FROM {table} WHERE arm = ? AND round > ?", (arm, int(rnd)))
            conn.execute("UPDATE audit SET status = 'redone' WHERE arm = ? AND round > ? AND status = 'accepted'",
                         (arm, int(rnd)))

    # ----------------------------------------------------------------------- export

    def _metric_records(self) -> list[dict]:
        rows = self._query("SELECT round, arm, site, split, metric, value FROM metrics ORDER BY id")
        return [{f: r[f] for f in FIELDS} for r in rows]

    def metric_records(self) -> list[dict]:
        """Every metric record, in the order first written (a resumed deployment replays
        unbiased sampling's from them, server/unbiased.py)."""
        with self._lock:
            return self._metric_records()

    def export_metrics(self, path: Path) -> int:
        """Write all metric records to ``path`` in the ``metrics.jsonl`` format of
        :class:`~medfed.tracking.metrics.MetricsWriter`, in the order first written, atomically
        (temporary file, then rename). Returns the number of records."""
        with self._lock:
            records = self._metric_records()
        _atomic_write(Path(path), "".join(json.dumps(r, allow_nan=False) + "\n" for r in records))
        return len(records)

    def export_audit(self, path: Path) -> int:
        """Write ``{"rows": [...]}`` (the rows of :meth:`audit_rows`) to ``path`` as JSON,
        atomically. Returns the number of rows."""
        rows = self.audit_rows()
        _atomic_write(Path(path), json.dumps({"rows": rows}, indent=1, allow_nan=False) + "\n")
        return len(rows)
