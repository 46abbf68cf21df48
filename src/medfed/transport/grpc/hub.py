"""The server side of the deployment transport: the gRPC servicer that sites call.

The round loop hands the hub a batch of tasks (one per selected site) and waits for their
answers until a deadline; gRPC handler threads serve sites' joins, polls and submissions.
The hub wires the parts that do the work, which share one condition variable:

* ``auth.py``     who is calling: a certificate of the consortium CA (checked by TLS) whose
                  site is in the job and not left out of the run; a header naming that site
* ``sessions.py`` each site's session: joined, ready with its data summary and the
                  description of the model it built, or declined the job; still polling
* ``tasks.py``    the task board: queues, open and closed tasks, the wait for a batch
* ``intake.py``   an answer read and checked before it is used, the memory budget of updates
* ``audit.py``    the audit trail, and every refusal logged with the site, its address and
                  the reason
* ``guard.py``    what one site may hold of the server (open calls, transfers, time on a stream)
* ``splitting.py`` split learning's per-batch exchange: a site in its turn streams
                  activations and gradients, the server answers from the turn's seat

A submission must carry this job's id and answer an open task of that same site and
round, exactly once (see intake.py for the checks on its payload).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pydantic import ValidationError

from medfed import __version__
from medfed.config import SITE_LOCAL, Job, map_paths
from medfed.core.errors import CodecError
from medfed.core.modelspec import ModelSpec, model_mismatch
from medfed.core.summary import SiteSummary
from medfed.core.types import SiteFailure
from medfed.server.store import RunStore
from medfed.tasks import metric_bounds
from medfed.transport.grpc import wire
from medfed.transport.grpc.audit import Audit
from medfed.transport.grpc.auth import Callers, read_header
from medfed.transport.grpc.guard import Call, Direction, Guard, Refused
from medfed.transport.grpc.intake import Intake
from medfed.transport.grpc.sessions import Session, Sessions
from medfed.transport.grpc.splitting import Seats, serve_turn
from medfed.transport.grpc.tasks import Answer, Task, TaskBoard, TaskKind
from medfed.transport.pki.revocation import Revocations

__all__ = ["SITE_LOCAL", "TRANSFERS", "UPDATES_IN_MEMORY", "Hub", "SiteSummary", "Task", "TaskKind", "site_view"]

log = logging.getLogger("medfed")

# updates of one round kept in memory as they arrive (in model sizes); the others are
# spooled to temporary files, so the server's memory does not grow with the number of sites
UPDATES_IN_MEMORY = 3
# model-sized transfers the server makes at once in each direction (more sites wait their
# turn): the memory a transfer in flight holds does not add up with the number of sites
TRANSFERS = 4

_ENDED = "the call had ended"


def _read_summary(raw: Any) -> tuple[SiteSummary, ModelSpec | None]:
    """A ready message's ``summary``: the site's data summary, and under ``"model"`` the
    description of the model it built (None when absent: the server leaves such a site out
    once it compares models). Refused naming the field when either does not fit."""
    model = None
    if isinstance(raw, dict) and "model" in raw:
        raw = dict(raw)
        try:
            model = ModelSpec.from_wire(raw.pop("model"))
        except CodecError as e:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"bad model description: {e}") from None
    try:
        summary = SiteSummary.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "summary"
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"bad data summary: {where}: {err['msg']}") from None
    return summary, model


def site_view(job: Job) -> dict[str, Any]:
    """The job as sites receive it: every file path replaced by ``<site-local>``."""
    return map_paths(job, lambda _p: SITE_LOCAL).model_dump(mode="json")


class Hub:
    """Shared state of the server process. ``store`` (a RunStore, optional) receives the
    participants and the audit trail."""

    def __init__(self, job: Job, job_id: str, store: RunStore | None = None, revocations: Revocations | None = None):
        self.job_id = job_id
        self.job_view = site_view(job)
        self.round_timeout = job.round_timeout
        self.store = store
        self._cv = threading.Condition()  # guards sessions, tasks and the settling of answers
        self.callers = Callers(frozenset(job.site_names), job_id, revocations)
        self.sessions = Sessions(self._cv)
        self.board = TaskBoard(job.site_names, self._cv)
        self.intake = Intake(self.sessions, metric_bounds(job.task), store, slots=TRANSFERS, keep=UPDATES_IN_MEMORY)
        self.audit = Audit(store)
        self.guard = Guard()  # each site's open calls and transfers, and the bounds on them
        self.seats = Seats()  # split learning: the turns the round loop opened (splitting.py)
        self._sending = threading.BoundedSemaphore(TRANSFERS)  # held while a model chunk is sent
        self._model: tuple[ModelSpec, str] | None = None  # the server's model and what to do about another
        # each site's certificate (DER) as it presented it: a relayed topology's sites seal models with them
        self._certificates: dict[str, bytes] = {}
        # what a queue server adds to the join reply (dispatch.py): the run of its queue this job is
        self.join_extra: dict[str, Any] = {}

    def certificates(self) -> dict[str, bytes]:
        """Each joined site's certificate (DER), as TLS verified it."""
        with self._cv:
            return dict(self._certificates)

    # ------------------------------------------------------------------ gRPC methods

    def join(self, messages: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        site, call = None, None
        try:
            site, fingerprint = self.callers.identify(context)
            with self.guard.call(site, "join", context) as call:
                # what the site had open belongs to a connection it left (it restarted)
                self.guard.cut_site(site, "the site joined again", keep=call)
                hdr = read_header(self.guard.first(call, messages, "join request"), "join")
                self.callers.check(hdr, site, with_job=False)
        except Refused as e:
            self._refuse(context, "join", site, e, call)
        now = time.time()
        pem = (context.auth_context().get("x509_pem_cert") or [b""])[0]
        with self._cv:  # a site that rejoins has lost what it was working on
            lost = self.board.fail_sent(site, "the site reconnected before answering (restarted?)")
            self.sessions.join(site, context.peer(), fingerprint, now)
            self._certificates[site] = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
        for t in lost:
            self.audit.task(t, "failed", 0, None, time.monotonic() - t.sent_at, t.answer.cause)
        if self.store is not None:
            self.store.site_seen(site, fingerprint, context.peer(), now)
        log.info("site '%s' joined from %s", site, context.peer())
        return wire.encode_header({"job": self.job_view, "job_id": self.job_id, "medfed_version": __version__,
                                   **self.join_extra})

    def ready(self, messages: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        site, call = None, None
        try:
            site, _ = self.callers.identify(context)
            with self.guard.call(site, "ready", context) as call:
                hdr = read_header(self.guard.first(call, messages, "ready request"), "ready")
            self.callers.check(hdr, site)
            if "error" in hdr:
                cause = str(hdr["error"])[:2000]
                if self.sessions.decline(site, cause):  # nobody waits for it any more; a repeat is not told again
                    log.warning("site '%s' cannot take part in the job: %s", site, cause)
                    self.audit.declined(site, cause)
                return wire.encode_header({"ok": True})
            summary, model = _read_summary(hdr.get("summary"))
            if summary.name != site:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"data summary names site {summary.name!r}")
            if summary.skipped_files:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                              "data summary names files: file names stay at the site (send the count only)")
            with self._cv:  # checked against the server's model once it is known (expect_model)
                why = model_mismatch(model, *self._model) if self._model is not None else None
                if why is None:
                    self.sessions.ready(site, summary, model)
        except Refused as e:
            self._refuse(context, "ready", site, e, call)
        if why is not None:  # a site that joins after the check: left out as those before it were
            self.exclude(site, why)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"this site is left out of the run: {why}")
        log.info("site '%s' is ready: %d train, %d val, %d test, shape %s, model %s",
                 site, summary.train, summary.val, summary.test, summary.shape,
                 model.fingerprint[:12] if model is not None else "not described")
        return wire.encode_header({"ok": True})

    def poll(self, messages: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        site, call = None, None
        try:
            site, _ = self.callers.identify(context)
            with self.guard.call(site, "poll", context) as call:
                yield from self._serve_poll(site, call, messages, context)
        except Refused as e:
            self._refuse(context, "poll", site, e, call)

    def _serve_poll(self, site: str, call: Call, messages: Iterator[bytes],
                    context: grpc.ServicerContext) -> Iterator[bytes]:
        hdr = read_header(self.guard.first(call, messages, "poll request"), "poll")
        self.callers.check(hdr, site)
        have = hdr.get("have")  # the id of the model the site holds, if any
        session = self.sessions.ready_session(site)
        with self.guard.transfer(call, Direction.TO_SITE):  # before a task is taken: none is lost to a refusal
            task = self._next_task(session, context)
            if task is None:
                done = self.board.done
                if done:
                    self.sessions.heard_done(session)
                yield wire.encode_header({"kind": "done" if done else "wait"})
                return
            yield from self._send(task, have, call)

    def _next_task(self, session: Session, context: grpc.ServicerContext) -> Task | None:
        """The site's next task, waiting for one until a poll is answered "wait"."""
        left = context.time_remaining()
        with self.sessions.polling(session):
            return self.board.next_task(session.site, min(wire.POLL_WAIT, max(0.0, (left or wire.POLL_WAIT) - 1.0)))

    def _send(self, task: Task, have: Any, call: Call) -> Iterator[bytes]:
        """``task``'s header, then its payload in chunks (none when the site holds it: ``have``)."""
        cached = task.kind is not TaskKind.EXCHANGE and isinstance(have, str) and have == task.model_id
        t0 = time.monotonic()
        call.begin(Direction.TO_SITE, len(task.blob), lambda: task.open)
        try:
            self.guard.sent(call)
            yield wire.encode_header(
                {**task.header, "kind": task.kind.value, "task_id": task.id, "round": task.round, "arm": task.arm,
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
                cause = f"cut off: {call.cut}"
                if not self._settle(task, SiteFailure(task.site, cause), "refused", 0, None, t0, cause):
                    self.audit.refused(task.arm, task.round, task.site, "call", f"download {cause}")

    def submit(self, messages: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        site, task, t0, call = None, None, time.monotonic(), None
        try:
            site, _ = self.callers.identify(context)
            self.sessions.seen(site)  # a site that answers is connected
            with self.guard.call(site, "submission", context) as call, \
                    self.guard.transfer(call, Direction.FROM_SITE):
                hdr = read_header(self.guard.first(call, messages, "submission header"), "submission")
                self.callers.check(hdr, site)
                task = self.board.task_for(hdr.get("task_id"), site)
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
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"{task.kind.value} task of round {task.round} expired before the answer arrived"))
        if status == "failed":
            log.warning("%s round %d: site '%s' reported an error: %s", task.arm, task.round, site, answer.cause)
        return wire.encode_header({"accepted": True})

    def split(self, messages: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        """A site's split-learning turn (splitting.py): the header names its open fit task,
        whose seat the round loop opened; then the per-batch frames. One audit row per turn."""
        site, call, seat, t0 = None, None, None, time.monotonic()
        status, reason = "failed", "the split call broke under the server"
        try:
            site, _ = self.callers.identify(context)
            with self.guard.call(site, "split turn", context) as call:
                hdr = read_header(self.guard.first(call, messages, "split header"), "split")
                self.callers.check(hdr, site)
                task = self.board.task_for(hdr.get("task_id"), site)
                seat = self.seats.take(task)
                call.alive = lambda: task.open  # the round timeout closes the task: the call ends too
                yield from serve_turn(seat, call, messages)
                status, reason = "accepted", None
        except Refused as e:
            e = self._why(e, call, context)
            status, reason = "refused", e.reason
            if call is not None and seat is not None:
                call.audited = True  # the turn's row says it
            self._refuse(context, "a split turn", site, e, call)
        finally:  # a turn that ended otherwise (the stream broke, the site went away) is "failed"
            if seat is not None:
                self.audit.turn(seat.arm, seat.round, seat.site, status, seat.wire_sent, seat.wire_received,
                                time.monotonic() - t0, reason)

    def _receive(self, task: Task, hdr: dict[str, Any], call: Call, messages: Iterator[bytes],
                 context: grpc.ServicerContext, site: str) -> tuple[Answer, int, str | None]:
        """The answer to ``task``: an update waits for one of the ``TRANSFERS`` upload slots
        (bounded by the call's deadline or the round timeout), then arrives under the
        guard's bounds."""
        left = context.time_remaining()
        wait = self.round_timeout if left is None else max(0.0, left)
        fit = task.kind is TaskKind.FIT
        if fit and not self.intake.take_slot(wait, task, call):
            raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED, "the call's deadline passed while other updates arrived")
        size = hdr.get("size")
        call.begin(Direction.FROM_SITE, size if isinstance(size, int) and not isinstance(size, bool) else 0,
                   lambda: task.open)
        try:
            return self.intake.read(task, hdr, self.guard.received(call, messages), site, UPDATES_IN_MEMORY)
        except (Refused, grpc.RpcError):
            raise
        except Exception as e:  # a payload that breaks a decoder in a way its checks did not foresee
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"unreadable answer ({type(e).__name__}: {str(e)[:200]})") from None
        finally:
            if fit:
                self.intake.release_slot()

    def _settle(self, task: Task, answer: Answer, status: str, nbytes: int, digest: str | None, t0: float,
                reason: str | None = None) -> bool:
        """Record ``answer`` for ``task`` unless it was closed meanwhile; audit it."""
        with self._cv:
            self.sessions.seen(task.site)  # it answered: connected, about to poll again
            if not task.open:
                return False
            if status == "accepted" and task.kind is TaskKind.FIT and digest is not None:
                self.intake.accepted(digest)
            self.board.close(task, answer)
        seconds = time.monotonic() - task.sent_at if task.sent_at else time.monotonic() - t0
        if reason is None and isinstance(answer, SiteFailure):
            reason = answer.cause
        self.audit.task(task, status, nbytes, digest, seconds, reason)
        return True

    # ------------------------------------------------------------------ refusals

    def _refuse(self, context: grpc.ServicerContext, what: str, site: str | None, e: Refused,
                call: Call | None = None) -> None:
        """Log and audit the refusal, then end the call with it. A call the guard cut off for
        stalling is refused with the bound it broke; one that gRPC ended under the handler
        (a message over the size limit, or the site cancelled it) says so. The audit row is
        the task's when the task was settled with the refusal (``call.audited``), else one
        of its own; repeats are held back (audit.RefusalLog)."""
        e = self._why(e, call, context)
        peer = call.peer if call is not None else context.peer()
        self.audit.refusal(what, site, e, peer, audited=call is not None and call.audited)
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

    # ------------------------------------------------------------------ the round loop's side

    def run(self, tasks: list[Task], timeout: float) -> None:
        """Queue ``tasks`` and wait until each is answered or ``timeout`` seconds pass.

        A task for a site that is not connected (never joined, or stopped polling) fails
        at once instead of holding the round until the timeout; a task a site took and
        did not answer fails at the timeout, and a later answer to it is refused."""
        t0 = time.monotonic()
        if any(t.kind is TaskKind.FIT for t in tasks):  # the round loop has let go of the last round's updates
            self.intake.budget.reset()
        expired = self.board.run(tasks, timeout, self.sessions.connected)
        for t in expired:
            self.audit.task(t, "timeout", 0, None, time.monotonic() - t0, t.answer.cause)

    def wait_ready(self, sites: list[str], timeout: float,
                   on_change: Callable[[list[str]], None] | None = None) -> list[str]:
        """Wait until every site in ``sites`` is ready or has said it cannot take part in the
        job, or ``timeout`` s pass; return the ready ones. ``on_change(ready)`` is called
        whenever the set grows."""
        return self.sessions.wait_ready(sites, timeout, on_change)

    def exclude(self, site: str, reason: str) -> None:
        """Leave ``site`` out of this run for ``reason``: its session ends, and every call it
        makes from now on is refused with the reason (a site stops on such a refusal)."""
        self.callers.exclude(site, reason)
        self.sessions.end(site)
        self.guard.cut_site(site, f"left out of the run: {reason}")
        log.warning("site '%s' is left out of the run: %s", site, reason)
        self.audit.refused("connection", 0, site, "call", f"left out of the run: {reason}")

    def expect_model(self, model: ModelSpec, hint: str) -> dict[str, str]:
        """The server's own model is ``model``: leave out every ready site that built
        another one (or did not describe its model), and every site that becomes ready from
        now on likewise; ``hint`` says what to do about it. Returns the sites left out, with
        why (the first difference: see core/modelspec.py)."""
        with self._cv:  # a site's Ready either comes before (checked here) or after (checked there)
            self._model = (model, hint)
            odd = {s: why for s, m in self.sessions.models().items() if (why := model_mismatch(m, model, hint))}
        for site, why in odd.items():
            self.exclude(site, why)
        return odd

    def summaries(self) -> dict[str, SiteSummary]:
        return self.sessions.summaries()

    def declined(self) -> dict[str, str]:
        """The sites that said they cannot take part in the job, and why."""
        return self.sessions.declined()

    def interrupt(self) -> None:
        """The job is being stopped (a queue server's abort): a wait for the sites ends now."""
        with self._cv:
            self.sessions.interrupted = True
            self._cv.notify_all()

    def finish(self, grace: float) -> None:
        """Tell polling sites the job is done; wait up to ``grace`` s for them to hear it."""
        self.board.finish()
        self.sessions.wait_done(grace)
