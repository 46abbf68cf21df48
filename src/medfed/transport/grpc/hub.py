"""The server side of the deployment transport: sessions, task queues, incoming checks.

The round loop hands the hub a batch of tasks (one per selected site) and waits for their
answers until a deadline; gRPC handler threads serve sites' polls and submissions. One
condition variable guards all of it.

Everything a site sends is checked before it is used, and every refusal is logged with
the site, its address and the reason: a site must hold a certificate of the consortium CA
(checked by TLS) whose name is in the job; a submission must carry this job's id and
answer an open task of that same site and round, exactly once; its payload must have the
declared size (at most what the task allows) and SHA-256 (when it declares one; the server
hashes every payload itself for its audit trail), decode without error, and, for
an update, fit the model sent (names, shapes, dtypes, finite values) and not repeat an
update accepted before; an evaluation answer must count the examples the site declared and
report only the task's metrics, within their ranges. What one site may hold of the server
(open calls, transfers, time on a stream) is bounded by the guard (guard.py).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medfed import __version__
from medfed.config import Job, map_paths
from medfed.core import codec
from medfed.core.buffers import BufferPool
from medfed.core.errors import CodecError
from medfed.core.types import Encoding, EvalResult, SiteFailure, Spec, Split, Update
from medfed.server.store import RunStore
from medfed.server.validate import eval_problem, update_problem
from medfed.tasks import metric_bounds
from medfed.transport.grpc import wire
from medfed.transport.grpc.guard import REFUSAL_WINDOW, Call, Direction, Guard, RefusalLog, Refused

log = logging.getLogger("medfed")

SITE_LOCAL = Path("<site-local>")  # stands for every file path when the job travels to sites
# updates of one round kept in memory as they arrive (in model sizes); the others are
# spooled to temporary files, so the server's memory does not grow with the number of sites
UPDATES_IN_MEMORY = 3
# model-sized transfers the server makes at once in each direction (more sites wait their
# turn): the memory a transfer in flight holds does not add up with the number of sites
TRANSFERS = 4
# seconds after its last poll that a site still counts as connected (a site polls again
# at once after each answer, and every POLL_WAIT s when idle)
LIVE_WINDOW = 3 * wire.POLL_WAIT


def site_view(job: Job) -> dict[str, Any]:
    """The job as sites receive it: every file path replaced by ``<site-local>``."""
    return map_paths(job, lambda _p: SITE_LOCAL).model_dump(mode="json")


_ENDED = "the call had ended"
# what a task ends with: an update (fit), results (evaluate), a protocol reply (exchange), or a failure
Answer = Update | list[EvalResult] | dict[str, Any] | SiteFailure


class SiteSummary(BaseModel):
    """What a site tells the server about its data when it is ready: sizes and the image
    shape, never images or file names."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    train: int = Field(ge=0)
    val: int = Field(ge=0)
    test: int = Field(ge=0)
    class_counts: dict[Literal["train", "val", "test"], list[Annotated[int, Field(ge=0)]]] = Field(default_factory=dict)
    shape: list[int] = Field(min_length=2, max_length=4)
    held_out: bool = False
    skipped: int = Field(0, ge=0)


@dataclass(eq=False)
class Task:
    """One request to one site, waiting for its answer."""

    site: str
    kind: str  # "fit" | "evaluate" | "exchange" (a protocol message of the update path, JSON)
    arm: str
    round: int
    header: dict[str, Any]  # sent with the payload: the round plan, or the splits
    blob: bytes | bytearray | memoryview  # the payload: shared by every task of a batch that sends the same one
    model_id: str  # the blob's name, the same for every task that sends it (a site names the one it holds)
    limit: int  # the most bytes the answer may have
    spec: Spec | None = None  # fit: the names, shapes and dtypes the update must have
    encoding: Encoding = Encoding.FULL  # fit: how the update must be encoded
    splits: tuple[Split, ...] = ()
    id: str = field(default_factory=lambda: secrets.token_hex(16))
    state: str = "queued"  # queued -> sent -> answered | expired
    answer: Answer | None = None
    sent_at: float = 0.0
    bytes_sent: int = 0


@dataclass
class Session:
    site: str
    address: str
    fingerprint: str
    joined: float
    summary: SiteSummary | None = None
    got_done: bool = False
    last_seen: float = 0.0  # time.monotonic() of its last poll
    polling: int = 0  # polls open right now


class Hub:
    """Shared state of the server process. ``store`` (a RunStore, optional) receives the
    participants and the audit trail."""

    def __init__(self, job: Job, job_id: str, store: RunStore | None = None):
        self.job_id = job_id
        self.job_view = site_view(job)
        self.allowed = frozenset(job.site_names)
        self.round_timeout = job.round_timeout
        self.metric_bounds = metric_bounds(job.task)  # what an evaluation answer may hold
        self.store = store
        self._cv = threading.Condition()
        self._queues: dict[str, deque[Task]] = {s: deque() for s in job.site_names}
        self._open: dict[str, Task] = {}  # queued or sent, by id
        self._closed: dict[str, tuple[str, int, str]] = {}  # answered or expired tasks: id -> (arm, round, kind)
        self._sessions: dict[str, Session] = {}
        self._excluded: dict[str, str] = {}  # sites left out of this run, and why
        self._accepted: set[str] = set()  # SHA-256 of every update accepted in this process
        self._held = 0  # bytes of this batch's updates held in memory
        self._buffers = BufferPool(keep=UPDATES_IN_MEMORY)  # where they are received
        self._sending = threading.BoundedSemaphore(TRANSFERS)  # held while a model chunk is sent
        self._receiving = threading.BoundedSemaphore(TRANSFERS)  # held while an update is received
        self.guard = Guard()  # each site's open calls and transfers, and the bounds on them
        self._refusals = RefusalLog()
        self._done = False

    # ------------------------------------------------------------------ who is calling

    def _identify(self, context: grpc.ServicerContext) -> tuple[str, str]:
        """(site name, certificate fingerprint) of the caller, or Refused."""
        auth = context.auth_context()
        pem = (auth.get("x509_pem_cert") or [b""])[0]
        names = auth.get("x509_common_name") or []
        if not pem or not names:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "no client certificate")
        site = names[0].decode(errors="replace")
        cert = x509.load_pem_x509_certificate(pem)
        try:
            usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            usage = []
        if ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, f"certificate '{site}' is not a site certificate", site)
        if site not in self.allowed:
            raise Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"certificate names site '{site}', which is not part of this job ({', '.join(sorted(self.allowed))})",
                site,
            )
        if site in self._excluded:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, f"this site is left out of the run: {self._excluded[site]}",
                          site)
        return site, cert.fingerprint(hashes.SHA256()).hex()

    @staticmethod
    def _header(data: Any, what: str) -> dict[str, Any]:
        try:
            return wire.decode_header(data, what)
        except CodecError as e:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None

    def _check_caller(self, hdr: dict[str, Any], site: str, with_job: bool = True) -> None:
        if hdr.get("site") != site:
            raise Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"message says site {hdr.get('site')!r} but the certificate is '{site}'",
            )
        if with_job and hdr.get("job_id") != self.job_id:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"message is for job {hdr.get('job_id')!r}, this server runs job {self.job_id}",
            )

    def _refuse(self, context: grpc.ServicerContext, what: str, site: str | None, e: Refused,
                call: Call | None = None) -> None:
        """Log and audit the refusal, then end the call with it. A call the guard cut off for
        stalling is refused with the bound it broke; one that gRPC ended under the handler
        (a message over the size limit, or the site cancelled it) says so. The audit row is
        the task's when the task was settled with the refusal (``call.audited``), else one
        of its own; repeats are held back (RefusalLog)."""
        e = self._why(e, call, context)
        name = site or e.name
        who = f"site '{site}'" if site else f"certificate '{name}'" if name else "a caller"
        peer = call.peer if call is not None else context.peer()
        held = self._refusals.admit(name, what, e.code, e.reason) if name else 0
        if held is not None:
            more = f" ({held} more like it held back in the last {REFUSAL_WINDOW:g} s)" if held else ""
            log.warning("refused %s from %s (%s): %s%s", what, who, peer, e.reason, more)
            if name and not (call is not None and call.audited):
                arm, rnd, kind = e.task or ("connection", 0, "call")
                self._audit(arm, rnd, name, kind, f"{what}: {e.reason}{more}")
        context.abort(e.code, e.reason)

    def _why(self, e: Refused, call: Call | None, context: grpc.ServicerContext) -> Refused:
        """``e`` as it should be told: a call the guard cut off is refused with the bound it
        broke; one that gRPC ended under the handler says what ends a call so."""
        if call is not None and call.cut is not None:
            return self.guard.refusal(call)
        if call is not None and not context.is_active() and _ENDED not in e.reason:
            return Refused(e.code, f"{e.reason} ({_ENDED}: a message over the {wire.MAX_MESSAGE}-byte limit, or the "
                                   "site cancelled it)", e.name, e.task)
        return e

    # ------------------------------------------------------------------ gRPC methods

    def join(self, messages: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        site, call = None, None
        try:
            site, fingerprint = self._identify(context)
            with self.guard.call(site, "join", context) as call:
                # what the site had open belongs to a connection it left (it restarted)
                self.guard.cut_site(site, "the site joined again", keep=call)
                self._check_caller(self._header(self.guard.first(call, messages, "join request"), "join"), site,
                                   with_job=False)
        except Refused as e:
            self._refuse(context, "join", site, e, call)
        now = time.time()
        with self._cv:
            for t in self._open.values():  # a site that rejoins has lost what it was working on
                if t.site == site and t.state == "sent":
                    self._close(t, SiteFailure(site, "the site reconnected before answering (restarted?)"))
            self._sessions[site] = Session(site, context.peer(), fingerprint, now)
            self._cv.notify_all()
        if self.store is not None:
            self.store.site_seen(site, fingerprint, context.peer(), now)
        log.info("site '%s' joined from %s", site, context.peer())
        return wire.encode_header({"job": self.job_view, "job_id": self.job_id, "medfed_version": __version__})

    def ready(self, messages: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        site, call = None, None
        try:
            site, _ = self._identify(context)
            with self.guard.call(site, "ready", context) as call:
                hdr = self._header(self.guard.first(call, messages, "ready request"), "ready")
            self._check_caller(hdr, site)
            if "error" in hdr:
                log.warning("site '%s' cannot take part in the job: %s", site, str(hdr["error"])[:2000])
                return wire.encode_header({"ok": True})
            try:
                summary = SiteSummary.model_validate(hdr.get("summary"))
            except ValidationError as e:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"bad data summary: {e.errors()[0]['msg']}") from None
            if summary.name != site:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"data summary names site {summary.name!r}")
            with self._cv:
                session = self._sessions.get(site)
                if session is None:
                    raise Refused(grpc.StatusCode.FAILED_PRECONDITION, "call Join first")
                session.summary = summary
                session.last_seen = time.monotonic()
                self._cv.notify_all()
        except Refused as e:
            self._refuse(context, "ready", site, e, call)
        log.info("site '%s' is ready: %d train, %d val, %d test, shape %s",
                 site, summary.train, summary.val, summary.test, summary.shape)
        return wire.encode_header({"ok": True})

    def poll(self, messages: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        site, call = None, None
        try:
            site, _ = self._identify(context)
            with self.guard.call(site, "poll", context) as call:
                yield from self._serve_poll(site, call, messages, context)
        except Refused as e:
            self._refuse(context, "poll", site, e, call)

    def _serve_poll(self, site: str, call: Call, messages: Iterator[bytes],
                    context: grpc.ServicerContext) -> Iterator[bytes]:
        hdr = self._header(self.guard.first(call, messages, "poll request"), "poll")
        self._check_caller(hdr, site)
        have = hdr.get("have")  # the id of the model the site holds, if any
        with self._cv:
            session = self._sessions.get(site)
            if session is None or session.summary is None:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION, "call Join and Ready first")
        with self.guard.transfer(call, Direction.TO_SITE):  # before a task is taken: none is lost to a refusal
            left = context.time_remaining()
            with self._cv:
                session.polling += 1
                session.last_seen = time.monotonic()
            try:
                task = self._next_task(site, min(wire.POLL_WAIT, max(0.0, (left or wire.POLL_WAIT) - 1.0)))
            finally:
                with self._cv:
                    session.polling -= 1
                    session.last_seen = time.monotonic()
            if task is None:
                with self._cv:
                    if self._done:
                        session.got_done = True
                        self._cv.notify_all()
                yield wire.encode_header({"kind": "done" if self._done else "wait"})
                return
            cached = task.kind != "exchange" and isinstance(have, str) and have == task.model_id
            t0 = time.monotonic()
            call.begin(Direction.TO_SITE, len(task.blob), lambda: task.state == "sent")
            try:
                self.guard.sent(call)
                yield wire.encode_header(
                    {**task.header, "kind": task.kind, "task_id": task.id, "round": task.round, "arm": task.arm,
                     "size": len(task.blob), "model_id": task.model_id, **({"cached": True} if cached else {})}
                )
                if cached:  # the site has this very model already (it evaluated it): not sent again
                    return
                for piece in wire.chunks(task.blob):
                    self.guard.sent(call)
                    with self._sending:  # until gRPC has sent it: at most TRANSFERS chunks in flight
                        yield piece
                    task.bytes_sent += len(piece)
            finally:
                if call.cut is not None:  # the site stalled the download: its task fails now, not at the timeout
                    if not self._settle(task, SiteFailure(site, f"cut off: {call.cut}"), "refused", 0, None, t0,
                                        f"cut off: {call.cut}"):
                        self._audit(task.arm, task.round, site, "call", f"download cut off: {call.cut}")

    def submit(self, messages: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        site, task, t0, call = None, None, time.monotonic(), None
        try:
            site, _ = self._identify(context)
            with self._cv:
                if site in self._sessions:  # a site that answers is connected
                    self._sessions[site].last_seen = time.monotonic()
            with self.guard.call(site, "submission", context) as call, \
                    self.guard.transfer(call, Direction.FROM_SITE):
                hdr = self._header(self.guard.first(call, messages, "submission header"), "submission")
                self._check_caller(hdr, site)
                task = self._task_for(hdr, site)
                answer, nbytes, digest = self._receive(task, hdr, call, messages, context, site)
        except Refused as refused:
            e = self._why(refused, call, context)
            if task is not None and self._settle(task, SiteFailure(site, f"answer refused: {e.reason}"), "refused", 0,
                                                 None, t0, e.reason):
                call.audited = True  # the task's row says it
            self._refuse(context, "a submission", site, e, call)
        except grpc.RpcError:  # the stream broke under the server
            e = self._why(Refused(grpc.StatusCode.INVALID_ARGUMENT, "submission stream broke"), call, context)
            if task is not None and self._settle(task, SiteFailure(site, e.reason), "refused", 0, None, t0, e.reason):
                call.audited = True
            self._refuse(context, "a submission", site, e, call)
        status = "failed" if isinstance(answer, SiteFailure) else "accepted"
        if not self._settle(task, answer, status, nbytes, digest, t0):
            self._refuse(context, "a submission", site, Refused(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"{task.kind} task of round {task.round} expired before the answer arrived"))
        if status == "failed":
            log.warning("%s round %d: site '%s' reported an error: %s", task.arm, task.round, site, answer.cause)
        return wire.encode_header({"accepted": True})

    def _receive(self, task: Task, hdr: dict[str, Any], call: Call, messages: Iterator[bytes],
                 context: grpc.ServicerContext, site: str):
        """The answer to ``task``: an update waits for one of the ``TRANSFERS`` upload slots
        (bounded by the call's deadline or the round timeout), then arrives under the
        guard's bounds."""
        left = context.time_remaining()
        wait = self.round_timeout if left is None else max(0.0, left)
        if task.kind == "fit" and not self._take_slot(wait, task, call):
            raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED, "the call's deadline passed while other updates arrived")
        size = hdr.get("size")
        call.begin(Direction.FROM_SITE, size if isinstance(size, int) and not isinstance(size, bool) else 0,
                   lambda: task.state == "sent")
        try:
            return self._read_answer(task, hdr, self.guard.received(call, messages), site)
        except (Refused, grpc.RpcError):
            raise
        except Exception as e:  # a payload that breaks a decoder in a way its checks did not foresee
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"unreadable answer ({type(e).__name__}: {str(e)[:200]})") from None
        finally:
            if task.kind == "fit":
                self._receiving.release()

    def _take_slot(self, wait: float, task: Task, call: Call) -> bool:
        """One of the upload slots, within ``wait`` s and while the task is open and the call
        not cut."""
        deadline = time.monotonic() + wait
        while task.state == "sent" and call.cut is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self._receiving.acquire(timeout=min(left, 0.5)):
                return True
        return False

    def _audit(self, arm: str, rnd: int, site: str, kind: str, reason: str) -> None:
        """One audit row of a refusal that no task's row records."""
        if self.store is not None:
            self.store.audit(arm, rnd, site, kind, "refused", 0, 0, None, 0.0, reason)

    # ------------------------------------------------------------------ submission checks

    def _task_for(self, hdr: dict[str, Any], site: str) -> Task:
        tid = hdr.get("task_id")
        with self._cv:
            task = self._open.get(tid) if isinstance(tid, str) else None
            closed = self._closed.get(tid) if isinstance(tid, str) else None
        if task is None:
            if closed is not None:
                raise Refused(grpc.StatusCode.ALREADY_EXISTS, f"task {tid} was already answered or has expired (replay?)",
                              task=closed)
            raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                          f"no open task {tid!r}: site '{site}' was not selected for it")
        if task.site != site:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                          f"task {tid} was given to site '{task.site}', not to '{site}'")
        if task.state != "sent":
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"task {tid} has not been sent yet")
        return task

    def _read_answer(self, task: Task, hdr: dict[str, Any], messages: Iterator[bytes], site: str):
        if hdr.get("round") != task.round:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"answer is for round {hdr.get('round')!r}, the task is round {task.round}")
        kind = hdr.get("kind")
        if kind == "error":
            cause = str(hdr.get("cause", "unknown error"))[:2000]
            return SiteFailure(site, f"site error: {cause}"), 0, None
        if kind != task.kind:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"answer kind {kind!r}, the task is '{task.kind}'")
        size = hdr.get("size")
        if isinstance(size, bool) or not isinstance(size, int):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"size must be an integer, got {size!r}")
        held = kind == "fit" and self._hold(size, task)
        try:
            return self._read_payload(task, hdr, messages, site, kind, size, held)
        except BaseException:
            if held:  # refused: the memory it was given is free again
                with self._cv:
                    self._held = max(0, self._held - size)
            raise

    def _read_payload(self, task: Task, hdr: dict[str, Any], messages: Iterator[bytes], site: str, kind: str,
                      size: int, in_memory: bool):
        try:
            if kind in ("evaluate", "exchange"):
                blob, digest = wire.gather(messages, size, task.limit, f"{kind} answer")
                wire.check_payload(digest, hdr.get("sha256"), f"{kind} answer")
                if kind == "exchange":
                    return wire.decode_json_object(blob, "exchange answer"), size, digest
                results = codec.decode_eval_results(site, blob, task.splits)
                with self._cv:
                    summary = self._sessions[site].summary if site in self._sessions else None
                sizes = {Split.VAL: summary.val, Split.TEST: summary.test} if summary is not None else None
                problem = eval_problem(results, self.metric_bounds, sizes)
                if problem is not None:
                    raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"evaluation results: {problem}")
                return results, size, digest
            if in_memory:  # the update's tensors are views of the payload
                blob, _ = wire.gather(messages, size, task.limit, f"{kind} answer", hashed=False, pool=self._buffers)
                digest = wire.sha256(blob)  # at once, after the last chunk: the stream is not held up
                wire.check_payload(digest, hdr.get("sha256"), f"{kind} answer")
                update = codec.view_update(blob)
            else:  # to disk as it arrives; its tensors are read back, in parts, when used
                f, digest = wire.gather_to_file(messages, size, task.limit, f"{kind} answer")
                try:
                    wire.check_payload(digest, hdr.get("sha256"), f"{kind} answer")
                    update = codec.read_update_file(f, size)
                except BaseException:
                    f.close()
                    raise
        except CodecError as e:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        if update.site != site:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, f"update says site '{update.site}'")
        with self._cv:
            replay = digest in self._accepted
        if replay or (self.store is not None and self.store.seen_update(digest)):
            raise Refused(grpc.StatusCode.ALREADY_EXISTS, f"update {digest[:12]} was accepted before (replay)")
        with self._cv:
            summary = self._sessions[site].summary if site in self._sessions else None
        if summary is not None and update.num_examples != summary.train:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"update claims {update.num_examples} training examples, the site reported {summary.train}")
        problem = update_problem(update, task.spec or {}, task.round, task.encoding)
        if problem is not None:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, problem)
        return update, size, digest

    def _hold(self, size: int, task: Task) -> bool:
        """Whether an update of ``size`` bytes fits in this batch's memory budget (then it
        is counted against it): ``UPDATES_IN_MEMORY`` times the model sent (and a header)."""
        with self._cv:
            if 0 <= size <= task.limit and self._held + size <= UPDATES_IN_MEMORY * (len(task.blob) + wire.MAX_HEADER):
                self._held += size
                return True
            return False

    def _settle(self, task: Task, answer: Answer, status: str, nbytes: int, digest: str | None, t0: float,
                reason: str | None = None) -> bool:
        """Record ``answer`` for ``task`` unless it was closed meanwhile; audit it."""
        with self._cv:
            session = self._sessions.get(task.site)
            if session is not None:
                session.last_seen = time.monotonic()  # it answered: connected, about to poll again
            if task.state != "sent":
                return False
            if status == "accepted" and task.kind == "fit" and digest is not None:
                self._accepted.add(digest)
            self._close(task, answer)
        if self.store is not None:
            seconds = time.monotonic() - task.sent_at if task.sent_at else time.monotonic() - t0
            if reason is None and isinstance(answer, SiteFailure):
                reason = answer.cause
            self.store.audit(task.arm, task.round, task.site, task.kind, status, task.bytes_sent, nbytes, digest,
                             seconds, reason)
        return True

    # ------------------------------------------------------------------ the round loop's side

    def _close(self, task: Task, answer: Answer) -> None:  # holds the lock
        task.answer, task.state = answer, "answered"
        self._open.pop(task.id, None)
        self._closed[task.id] = (task.arm, task.round, task.kind)
        self._cv.notify_all()

    def _next_task(self, site: str, wait: float) -> Task | None:
        deadline = time.monotonic() + wait
        with self._cv:
            while not self._queues[site] and not self._done:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cv.wait(left)
            if not self._queues[site]:
                return None
            task = self._queues[site].popleft()
            task.state, task.sent_at = "sent", time.monotonic()
            return task

    def _connected(self, site: str, now: float) -> bool:  # holds the lock
        """A site is connected while it polls, or polled within ``LIVE_WINDOW`` s."""
        s = self._sessions.get(site)
        return s is not None and s.summary is not None and (s.polling > 0 or now - s.last_seen < LIVE_WINDOW)

    def run(self, tasks: list[Task], timeout: float) -> None:
        """Queue ``tasks`` and wait until each is answered or ``timeout`` seconds pass.

        A task for a site that is not connected (never joined, or stopped polling) fails
        at once instead of holding the round until the timeout; a task a site took and
        did not answer fails at the timeout, and a later answer to it is refused."""
        deadline = time.monotonic() + timeout
        gone: list[Task] = []
        with self._cv:
            if any(t.kind == "fit" for t in tasks):  # the round loop has let go of the last round's updates
                self._held = 0
            for t in tasks:
                self._queues[t.site].append(t)
                self._open[t.id] = t
            self._cv.notify_all()
            while True:
                now = time.monotonic()
                for t in tasks:
                    if t.state == "queued" and not self._connected(t.site, now):
                        self._expire(t, "the site is not connected")
                        gone.append(t)
                left = deadline - now
                if left <= 0 or all(t.state in ("answered", "expired") for t in tasks):
                    break
                self._cv.wait(min(left, 1.0))
            late = [t for t in tasks if t.state in ("queued", "sent")]
            for t in late:
                self._expire(t, f"no answer within round_timeout={timeout:g}s")
        if self.store is not None:
            for t in gone + late:
                self.store.audit(t.arm, t.round, t.site, t.kind, "timeout", t.bytes_sent, 0, None,
                                 time.monotonic() - deadline + timeout, t.answer.cause)

    def _expire(self, t: Task, cause: str) -> None:  # holds the lock
        if t.state == "queued":
            self._queues[t.site].remove(t)
        t.state, t.answer = "expired", SiteFailure(t.site, cause)
        self._open.pop(t.id, None)
        self._closed[t.id] = (t.arm, t.round, t.kind)

    def wait_ready(self, sites: list[str], timeout: float, on_change=None) -> list[str]:
        """Wait until every site in ``sites`` is ready or ``timeout`` s pass; return the
        ready ones. ``on_change(ready)`` is called whenever the set grows."""
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        with self._cv:
            while True:
                ready = [s for s in sites if s in self._sessions and self._sessions[s].summary is not None]
                if ready != seen and on_change is not None:
                    on_change(ready)
                seen = ready
                left = deadline - time.monotonic()
                if len(ready) == len(sites) or left <= 0:
                    return ready
                self._cv.wait(min(left, 1.0))

    def exclude(self, site: str, reason: str) -> None:
        """Leave ``site`` out of this run for ``reason``: its session ends, and every call it
        makes from now on is refused with the reason (a site stops on such a refusal)."""
        with self._cv:
            self._excluded[site] = reason
            self._sessions.pop(site, None)
            self._cv.notify_all()
        self.guard.cut_site(site, f"left out of the run: {reason}")
        log.warning("site '%s' is left out of the run: %s", site, reason)
        self._audit("connection", 0, site, "call", f"left out of the run: {reason}")

    def summaries(self) -> dict[str, SiteSummary]:
        with self._cv:
            return {s: x.summary for s, x in self._sessions.items() if x.summary is not None}

    def finish(self, grace: float) -> None:
        """Tell polling sites the job is done; wait up to ``grace`` s for them to hear it."""
        deadline = time.monotonic() + grace
        with self._cv:
            self._done = True
            self._cv.notify_all()
            while any(not s.got_done for s in self._sessions.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)

