"""What a site keeps of its decisions on jobs: the operator's approvals, per job hash, and
the audit log of every decision. Both live in the site's state folder (``<kit>/state/``),
readable by its user only (0600).

* ``approvals.json``: ``{"jobs": {job_hash: record}}``, one record per job this site has
  shown its operator (``pending``) and what the operator decided (``approved`` or
  ``rejected``, with when and why). Rewritten atomically, under a lock (``approvals.lock``)
  so that the waiting site and ``medfed site approve`` never lose each other's writes.
* ``audit.jsonl``: one JSON line per decision, appended: the time, the site, the job (hash,
  id, name), the decision (:class:`Decision`), who made it (``policy`` or ``operator``) and
  why. Never rewritten.
* ``jobs/<job_hash>.yaml``: the resolved settings of each job shown for approval.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path

from medfed.core.errors import ConfigError
from medfed.core.files import PRIVATE, atomic_write_text
from medfed.core.text import printable

APPROVALS = "approvals.json"
AUDIT = "audit.jsonl"
MIN_PREFIX = 16  # hex digits: the job id; a shorter prefix of a hash is refused (too easy to mistype onto another)
_HEX = re.compile(r"[0-9a-f]{16,64}")


def state_folder(kit: Path) -> Path:
    """The state folder of the site whose kit folder is ``kit``."""
    return Path(kit) / "state"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class Status(str, Enum):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"


class Decision(str, Enum):
    """An audit line's decision."""

    ACCEPTED = "accepted"  # the job may run: by the policy (approve: auto) or an approval on record
    REFUSED = "refused"  # by a rule of the policy, a rejection on record, or what the site lacks
    SHOWN = "shown"  # waiting for the operator (approve: manual)
    APPROVED = "approved"  # the operator's command
    REJECTED = "rejected"  # the operator's command
    TIMED_OUT = "timed_out"  # no decision within the approval timeout
    INVALID = "invalid"  # bad input: an approval for a hash no job has, a policy file that does not check


@dataclass(frozen=True)
class Approval:
    """One job shown to the operator and what became of it (times in UTC, ISO 8601)."""

    job_hash: str
    job_id: str
    job_name: str
    status: Status
    shown: str
    decided: str | None = None
    reason: str = ""

    def to_json(self) -> dict:
        return {**asdict(self), "status": self.status.value}

    @classmethod
    def from_json(cls, h: str, d: object, where: str) -> Approval:
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: the record of job {h[:16]} is not an object")
        try:
            return cls(job_hash=h, job_id=str(d["job_id"]), job_name=str(d["job_name"]),
                       status=Status(d["status"]), shown=str(d["shown"]),
                       decided=None if d.get("decided") is None else str(d["decided"]),
                       reason=str(d.get("reason", "")))
        except (KeyError, ValueError) as e:
            raise ConfigError(f"{where}: the record of job {h[:16]} is damaged ({e!r})") from None


class ApprovalStore:
    """The approvals of one site (``folder/approvals.json``), remembered per job hash."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / APPROVALS

    @contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.folder / "approvals.lock", os.O_RDWR | os.O_CREAT, PRIVATE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _read(self) -> dict[str, Approval]:
        where = f"approvals file '{self.path}'"
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"{where} is not valid JSON ({e}); move it away to start afresh "
                              "(every job is then shown for approval again)") from None
        jobs = raw.get("jobs") if isinstance(raw, dict) else None
        if not isinstance(jobs, dict):
            raise ConfigError(f"{where} has no 'jobs' object; move it away to start afresh")
        return {h: Approval.from_json(h, d, where) for h, d in jobs.items()}

    def _write(self, jobs: dict[str, Approval]) -> None:
        body = {"jobs": {h: a.to_json() for h, a in sorted(jobs.items())}}
        atomic_write_text(self.path, json.dumps(body, indent=2) + "\n", mode=PRIVATE)

    def get(self, job_hash: str) -> Approval | None:
        return self._read().get(job_hash)

    def all(self) -> list[Approval]:
        return sorted(self._read().values(), key=lambda a: a.shown)

    def show(self, job_hash: str, job_id: str, job_name: str) -> Approval:
        """Record that the job is waiting for the operator; a decision already on record is kept."""
        with self._locked():
            jobs = self._read()
            if job_hash not in jobs:
                jobs[job_hash] = Approval(job_hash, job_id, job_name, Status.PENDING, _now())
                self._write(jobs)
            return jobs[job_hash]

    def find(self, given: str) -> Approval:
        """The job a hash the operator typed names: the whole hash or its first 16 digits
        (or more). ConfigError when it is no hash, or no job shown here has it."""
        jobs = self._read()
        return jobs[self._match(given, jobs)]

    def decide(self, given: str, status: Status, reason: str = "") -> Approval:
        """Record the operator's decision on the job ``given`` names (see :meth:`find`)."""
        with self._locked():
            jobs = self._read()
            h = self._match(given, jobs)
            jobs[h] = Approval(h, jobs[h].job_id, jobs[h].job_name, status, jobs[h].shown, _now(), reason)
            self._write(jobs)
            return jobs[h]

    def _match(self, given: str, jobs: dict[str, Approval]) -> str:
        g = given.strip().lower()
        if not _HEX.fullmatch(g):
            raise ConfigError(f"'{printable(given, 80)}' is not a job hash: give the {MIN_PREFIX} to 64 hex digits "
                              "the site printed when it showed the job")
        found = [h for h in jobs if h.startswith(g)]
        if len(found) == 1:
            return found[0]
        known = "; ".join(f"{a.job_hash[:16]} '{a.job_name}' ({a.status.value})" for a in jobs.values()) or "none"
        raise ConfigError(f"no job with hash {g} has been shown at this site ({self.folder}); jobs shown here: "
                          f"{known}. A job is shown when the server sends it to a site started with a policy of "
                          "approve: manual")


class AuditLog:
    """The site's audit log (``folder/audit.jsonl``): one JSON line per decision, appended."""

    def __init__(self, folder: Path, site: str):
        self.folder = Path(folder)
        self.path = self.folder / AUDIT
        self.site = site

    def record(self, decision: Decision, by: str, reason: str = "", job_hash: str = "", job_id: str = "",
               job_name: str = "") -> None:
        line = {"time": _now(), "site": self.site, "decision": decision.value, "by": by, "job_hash": job_hash,
                "job_id": job_id, "job": job_name, "reason": reason}
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), PRIVATE)
        try:
            os.write(fd, (json.dumps(line) + "\n").encode())
        finally:
            os.close(fd)

    def read(self) -> list[dict]:
        """Every line so far (a damaged line is skipped)."""
        rows = []
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        for line in text.splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
        return rows


def write_job_settings(folder: Path, job_hash: str, text: str) -> Path:
    """Keep a shown job's resolved settings as ``folder/jobs/<hash>.yaml`` for the operator."""
    jobs = Path(folder) / "jobs"
    jobs.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = jobs / f"{job_hash}.yaml"
    atomic_write_text(path, text, mode=PRIVATE)
    return path
