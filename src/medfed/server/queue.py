"""The job queue of a queue server (``medfed server --queue RUNS_DIR``), kept in RUNS_DIR.

``RUNS_DIR/queue.json`` lists every job submitted (written atomically after each change,
readable by the server's user only); ``RUNS_DIR/queue/<id>.yaml`` holds the job file as the
admin submitted it; ``RUNS_DIR/<id>/`` is the job's run folder (the job's own ``output`` is
ignored). Jobs run one at a time, first submitted first. A job is ``queued``, ``running``,
then ``complete``, ``failed`` (with its error) or ``aborted``.

A server that stops while it runs a job (killed, power loss, Ctrl-C) finds it ``running``
when it starts again: a job that had saved a round is resumed first, after its last
completed round (as ``medfed server --resume`` would); one that had not starts again from
round 1, its run folder emptied.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path

from medfed.config import Job, parse_job, read_yaml
from medfed.core.errors import ConfigError, MedfedError, RunDirError
from medfed.core.files import PRIVATE, atomic_write_text

log = logging.getLogger("medfed")

QUEUE_FILE = "queue.json"
JOBS_DIR = "queue"  # the submitted job files
QUEUE_VERSION = 1
MAX_JOB_TEXT = 1 << 20  # bytes: a submitted job file (a job travels to the sites in one header)


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETE = "complete"
    FAILED = "failed"
    ABORTED = "aborted"


ENDED = (JobStatus.COMPLETE, JobStatus.FAILED, JobStatus.ABORTED)


class UnknownJob(MedfedError):
    """No job of the queue has the id asked for."""


class JobAborted(MedfedError):
    """An admin aborted the running job (raised at its next round boundary)."""


@dataclass(frozen=True)
class QueuedJob:
    """One job of the queue, as ``medfed jobs list|show`` prints it."""

    id: str
    name: str
    status: JobStatus
    submitted: str  # ISO time, UTC
    submitted_by: str  # the admin's name (its certificate's)
    source: str  # the file name the admin submitted
    rounds: int
    round: int = 0  # the last federated round completed
    run_dir: str = ""
    started: str | None = None
    finished: str | None = None
    error: str | None = None
    resumed: bool = False  # runs (or ran) again after a restart of the server, from its last saved round

    def to_wire(self) -> dict[str, object]:
        return {**asdict(self), "status": self.status.value}

    @classmethod
    def from_wire(cls, raw: object) -> QueuedJob:
        """A job as the admin service sends it; MedfedError when it does not fit."""
        if not isinstance(raw, dict):
            raise MedfedError("the server sent a job that is not an object")
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{**{k: v for k, v in raw.items() if k in known}, "status": JobStatus(raw.get("status"))})
        except (TypeError, ValueError) as e:
            raise MedfedError(f"the server sent a job medfed cannot read: {e}") from None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class JobQueue:
    """The jobs of ``runs_dir``, their order and their state; safe to use from the admin
    service's threads and the server's job loop at once."""

    def __init__(self, runs_dir: Path, he_context: Path | None = None, max_sites: int | None = None):
        self.runs_dir = runs_dir.resolve()
        self.he_context = he_context  # the server's public CKKS context, for jobs with privacy.he
        self.max_sites = max_sites  # the sites the server has threads for (None: no bound)
        try:
            self.runs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            (self.runs_dir / JOBS_DIR).mkdir(mode=0o700, exist_ok=True)
        except OSError as e:
            raise RunDirError(f"--queue: cannot create the runs folder '{runs_dir}': {e.strerror or e}") from None
        self._cv = threading.Condition()
        self._jobs: dict[str, QueuedJob] = {}
        self._next = 1
        self._abort: dict[str, str] = {}  # running job id -> who asked to abort it
        self.on_abort: Callable[[], None] | None = None  # the running job asked to stop: e.g. end its wait for sites
        self._load()
        self._recover()

    # ------------------------------------------------------------------ the file

    @property
    def path(self) -> Path:
        return self.runs_dir / QUEUE_FILE

    def _load(self) -> None:
        if not self.path.is_file():
            return
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            if raw["version"] > QUEUE_VERSION:
                raise RunDirError(f"'{self.path}' was written by a newer medfed (queue version {raw['version']}); "
                                  "upgrade medfed")
            jobs = [QueuedJob.from_wire(j) for j in raw["jobs"]]
            self._next = int(raw["next"])
        except RunDirError:
            raise
        except (OSError, ValueError, KeyError, TypeError, MedfedError) as e:
            raise RunDirError(f"'{self.path}' is not a job queue medfed can read ({e}); restore it, or give another "
                              "--queue folder") from None
        self._jobs = {j.id: j for j in jobs}

    def _save(self) -> None:  # holds the lock
        body = {"version": QUEUE_VERSION, "next": self._next, "jobs": [j.to_wire() for j in self._jobs.values()]}
        atomic_write_text(self.path, json.dumps(body, indent=2) + "\n", mode=PRIVATE)

    def _recover(self) -> None:
        """Jobs left ``running`` by a server that stopped: resumed when a round was saved,
        else started again."""
        from medfed.server.runner import RUN_MARKER
        from medfed.server.store import STORE_NAME

        for j in [j for j in self._jobs.values() if j.status is JobStatus.RUNNING]:
            run = Path(j.run_dir)
            if (run / RUN_MARKER).is_file():
                self._jobs[j.id] = replace(j, status=JobStatus.COMPLETE, finished=j.finished or _now())
            elif (run / STORE_NAME).is_file():
                log.warning("job %s (%s) was running when the server stopped: resumed after its last saved round",
                            j.id, j.name)
                self._jobs[j.id] = replace(j, status=JobStatus.QUEUED, resumed=True)
            else:
                log.warning("job %s (%s) was running when the server stopped before its first round: started again",
                            j.id, j.name)
                shutil.rmtree(run, ignore_errors=True)
                self._jobs[j.id] = replace(j, status=JobStatus.QUEUED, started=None)
        self._save()

    # ------------------------------------------------------------------ the admin's side

    def submit(self, text: str, source: str, by: str) -> QueuedJob:
        """Add the job file ``text`` (named ``source`` by the admin) to the queue, once it
        passes ``medfed validate``'s checks and the deployment's own (see
        :func:`check_submitted`); ConfigError naming the field otherwise."""
        if len(text.encode()) > MAX_JOB_TEXT:
            raise ConfigError(f"{source}: a job file of {len(text.encode())} bytes; the limit is {MAX_JOB_TEXT}")
        with self._cv:
            jid = f"{self._next:04d}"
            self._next += 1
            self._save()  # an id is never given twice, even when this job is refused
        staged = self.runs_dir / JOBS_DIR / f"{jid}.yaml"
        try:
            atomic_write_text(staged, text, mode=PRIVATE)
            job = self.load(jid, source)
            if self.max_sites is not None and len(job.site_names) > self.max_sites:
                raise ConfigError(f"job {jid} ({source}): data.sites names {len(job.site_names)} sites; this queue "
                                  f"server serves at most {self.max_sites} at once")
            check_submitted(job, self.he_context)
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        entry = QueuedJob(id=jid, name=job.name, status=JobStatus.QUEUED, submitted=_now(), submitted_by=by,
                          source=source, rounds=job.rounds, run_dir=str(self.runs_dir / jid))
        with self._cv:
            self._jobs[jid] = entry
            self._save()
            self._cv.notify_all()
        log.info("job %s (%s, from %s) submitted by admin '%s'", jid, job.name, source, by)
        return entry

    def load(self, jid: str, source: str | None = None) -> Job:
        """Job ``jid`` as submitted, its output its run folder; relative paths in it are
        taken from RUNS_DIR."""
        path = self.runs_dir / JOBS_DIR / f"{jid}.yaml"
        where = f"job {jid}" + (f" ({source})" if source else "")
        raw = read_yaml(path, where)
        job = parse_job(raw, source=where, base_dir=self.runs_dir)
        return job.model_copy(update={"output": self.runs_dir / jid})

    def jobs(self) -> list[QueuedJob]:
        with self._cv:
            return list(self._jobs.values())

    def get(self, jid: str) -> QueuedJob:
        with self._cv:
            if jid not in self._jobs:
                known = ", ".join(self._jobs) or "none yet"
                raise UnknownJob(f"no job '{jid}' in this server's queue (its jobs: {known}); see medfed jobs list")
            return self._jobs[jid]

    def abort(self, jid: str, by: str) -> QueuedJob:
        """A queued job is dropped at once; the running one stops at its next round boundary
        (its run folder kept); an ended job is refused (MedfedError)."""
        with self._cv:
            j = self.get(jid)
            if j.status is JobStatus.QUEUED:
                j = self._jobs[jid] = replace(j, status=JobStatus.ABORTED, finished=_now(),
                                              error=f"aborted by admin '{by}' before it started")
                self._save()
            elif j.status is JobStatus.RUNNING:
                self._abort[jid] = by
                if self.on_abort is not None:
                    self.on_abort()
            else:
                raise MedfedError(f"job {jid} has ended ({j.status.value}): there is nothing to abort")
        log.warning("job %s (%s): abort asked by admin '%s'%s", jid, j.name, by,
                    "" if j.status is JobStatus.ABORTED else "; it stops at its next round boundary")
        return j

    # ------------------------------------------------------------------ the server's side

    def take(self, timeout: float) -> QueuedJob | None:
        """The first queued job, now running; None when none came within ``timeout`` s."""
        with self._cv:
            self._cv.wait_for(lambda: any(j.status is JobStatus.QUEUED for j in self._jobs.values()), timeout)
            queued = sorted((j for j in self._jobs.values() if j.status is JobStatus.QUEUED), key=lambda j: j.id)
            if not queued:
                return None
            j = self._jobs[queued[0].id] = replace(queued[0], status=JobStatus.RUNNING,
                                                   started=queued[0].started or _now())
            self._save()
            return j

    def progress(self, jid: str, rnd: int) -> None:
        """Job ``jid`` completed federated round ``rnd``; JobAborted when an admin asked it to stop."""
        with self._cv:
            self._jobs[jid] = replace(self._jobs[jid], round=rnd)
            self._save()
            by = self._abort.get(jid)
        if by is not None:
            raise JobAborted(f"aborted by admin '{by}' after round {rnd}")

    def abort_asked(self, jid: str) -> str | None:
        with self._cv:
            return self._abort.get(jid)

    def ended(self, jid: str, status: JobStatus, error: str | None = None) -> QueuedJob:
        with self._cv:
            self._abort.pop(jid, None)
            j = self._jobs[jid] = replace(self._jobs[jid], status=status, finished=_now(), error=error)
            self._save()
            return j


def check_submitted(job: Job, he_context: Path | None = None) -> None:
    """The checks ``medfed validate`` runs (the model and algorithm built once), and those
    a deployment adds (no simulated attack, a topology that deploys...): a bad job is
    refused when it is submitted, not when its turn comes."""
    from medfed.server.deployable import check_deployable
    from medfed.server.jobcheck import check_model_and_algorithm

    check_model_and_algorithm(job)
    check_deployable(job, he_context)
