"""A queue server's site calls: one gRPC server for many jobs, each job's :class:`~.hub.Hub`
attached while the job runs (server/queue_server.py).

The sites' calls go to the hub of the job running now. A site that joins while no job of
its runs (the queue is empty, the job running is not one of its, or it was told the job is
done) is held up to ``wire.POLL_WAIT`` s for one to start, then answered ``{"idle": true}``:
it joins again at once, so an idle site keeps a call open to the server all the time (its
keep-alive) and is not counted as lost contact. Every other call while no job runs is
refused with FAILED_PRECONDITION, after which the site joins again. The certificate checks
of a join (the consortium's CA, a site certificate, not revoked) are made here for every
site; the job's own (a site of this job, not left out) by the hub.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any, Protocol

import grpc

from medfed import __version__
from medfed.config import Job
from medfed.transport.grpc import handshakes, wire
from medfed.transport.grpc.audit import Audit
from medfed.transport.grpc.auth import Callers
from medfed.transport.grpc.guard import Refused
from medfed.transport.grpc.hub import Hub
from medfed.transport.pki.revocation import Revocations

log = logging.getLogger("medfed")

NO_JOB = "no job is running on this server now: join again"


class HubHost(Protocol):
    """A gRPC server that outlives a job: it serves ``hub`` between attach and detach."""

    def attach(self, hub: Hub, job: Job) -> None: ...

    def detach(self, hub: Hub) -> None: ...


class Dispatcher:
    """The servicer of a queue server's site calls (see the module's docstring).
    ``run``: what the join reply says of the queue's job now attached (its id, and whether
    it was resumed), set by the queue server before it starts a job."""

    def __init__(self, revocations: Revocations | None):
        self._cv = threading.Condition()
        self._hub: Hub | None = None
        self._sites: frozenset[str] = frozenset()
        self._callers = Callers(frozenset(), "", revocations)  # the certificate checks only
        self._audit = Audit(None)  # refusals logged, repeats held back
        self.run: dict[str, Any] = {}

    # ------------------------------------------------------------------ HubHost

    def attach(self, hub: Hub, job: Job) -> None:
        with self._cv:
            hub.join_extra = {"queue": dict(self.run)}
            self._hub, self._sites = hub, frozenset(job.site_names)
            self._cv.notify_all()
        handshakes.attach(hub.audit)  # refused TLS handshakes in the running job's trail too

    def detach(self, hub: Hub) -> None:
        with self._cv:
            if self._hub is hub:
                self._hub, self._sites = None, frozenset()
                handshakes.attach(None)  # between jobs: logged only
            self._cv.notify_all()

    def interrupt(self) -> None:
        """The running job is being aborted: its hub stops waiting for sites (hub.interrupt)."""
        with self._cv:
            hub = self._hub
        if hub is not None:
            hub.interrupt()

    # ------------------------------------------------------------------ gRPC methods

    def join(self, messages: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        try:
            site, _ = self._callers.site_certificate(context)
        except Refused as e:
            self._audit.refusal("join", None, e, context.peer())
            context.abort(e.code, e.reason)
        left = context.time_remaining()
        deadline = time.monotonic() + min(wire.POLL_WAIT, max(0.0, (left or wire.POLL_WAIT) - 1.0))
        with self._cv:
            while (hub := self._for(site)) is None:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    break
                self._cv.wait(wait)
        if hub is None:
            return wire.encode_header({"idle": True, "queue": {}, "medfed_version": __version__})
        return hub.join(messages, context)

    def _for(self, site: str) -> Hub | None:
        """The hub of the job running now when ``site`` takes part in it (holds the lock)."""
        hub = self._hub
        if hub is None or site not in self._sites or hub.board.done or site in hub.callers.excluded:
            return None
        if site in hub.declined():  # it said it cannot take this job: asked again, it would be awaited again
            return None
        return hub

    def _current(self, context: grpc.ServicerContext) -> Hub:
        with self._cv:
            hub = self._hub
        if hub is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, NO_JOB)
        return hub

    def ready(self, messages: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return self._current(context).ready(messages, context)

    def submit(self, messages: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return self._current(context).submit(messages, context)

    def poll(self, messages: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from self._current(context).poll(messages, context)

    def split(self, messages: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from self._current(context).split(messages, context)
