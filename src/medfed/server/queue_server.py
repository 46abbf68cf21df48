"""One server, many jobs (``medfed server --kit SERVER_KIT --queue RUNS_DIR``).

A long-running server: one mutual-TLS gRPC port for the sites' calls (transport/grpc/
dispatch.py) and the admins' (transport/grpc/admin.py), and the job queue kept in RUNS_DIR
(server/queue.py). Jobs run one after another, first submitted first, each through
:func:`~medfed.server.deploy.serve_job` (the same round loop and run folder as ``medfed
server --job``), its output ``RUNS_DIR/<id>``. The sites stay connected between jobs.

A job that fails (an exception in its round loop, a quorum not met, its run folder not
writable) is marked ``failed`` with its error, logged, and the next job runs: the server
and the other jobs go on. An aborted job stops at its next round boundary and is marked
``aborted``.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from medfed.core.errors import MedfedError
from medfed.server.loop import RoundSummary
from medfed.server.queue import JobAborted, JobQueue, JobStatus, QueuedJob
from medfed.transport.base import describe_exception
from medfed.transport.pki import Kit

if TYPE_CHECKING:
    from medfed.core.types import Params
    from medfed.transport.grpc.dispatch import Dispatcher

log = logging.getLogger("medfed")

MAX_SITES = 64  # sites a queue server has threads for (each holds a poll and a submission)
IDLE_TICK = 1.0  # seconds between looks at the stop event while the queue is empty


def serve_queue(kit: Kit, runs_dir: Path, listen: str | None = None, he_context: Path | None = None,
                stop: threading.Event | None = None, max_sites: int = MAX_SITES) -> None:
    """Serve the queue of ``runs_dir`` until ``stop`` is set (or the process is stopped).
    ``listen``: the address to bind (default ``0.0.0.0:<kit port>``)."""
    from medfed.transport.grpc import wire
    from medfed.transport.grpc.admin import AdminService
    from medfed.transport.grpc.dispatch import Dispatcher
    from medfed.transport.grpc.transport import start_server
    from medfed.transport.pki.revocation import CRL_FILE, Revocations

    stop = stop or threading.Event()
    queue = JobQueue(runs_dir, he_context, max_sites)
    revocations = Revocations(kit.path / CRL_FILE, kit.ca_pem)
    dispatcher = Dispatcher(revocations)
    queue.on_abort = dispatcher.interrupt  # a job still waiting for its sites stops waiting
    admin = AdminService(queue, revocations)
    address = listen or f"0.0.0.0:{kit.server_port}"
    server = start_server(dispatcher, address, wire.server_credentials(kit.ca_pem, kit.cert_pem, kit.key_pem),
                          max_sites, extra=[admin.handler()])
    waiting = sum(j.status is JobStatus.QUEUED for j in queue.jobs())
    log.info("queue server listening on %s; runs in %s; %d job(s) queued", address, queue.runs_dir, waiting)
    try:
        while not stop.is_set():
            entry = queue.take(IDLE_TICK)
            if entry is not None:
                run_queued(entry, queue, kit, dispatcher, he_context)
    finally:
        server.stop(grace=2.0).wait(5.0)


def run_queued(entry: QueuedJob, queue: JobQueue, kit: Kit, dispatcher: Dispatcher,
               he_context: Path | None) -> JobStatus:
    """Run ``entry`` to its end through serve_job; mark it complete, failed or aborted."""
    from medfed.core.types import Arm
    from medfed.server.deploy import serve_job

    log.info("job %s (%s) starts%s", entry.id, entry.name, " again after its last saved round" if entry.resumed else "")

    def on_round(s: RoundSummary, _params: Params) -> None:
        if s.arm is Arm.FEDERATED:
            queue.progress(entry.id, s.round)  # raises JobAborted when an admin asked
        elif queue.abort_asked(entry.id) is not None:
            raise JobAborted(f"aborted by admin '{queue.abort_asked(entry.id)}'")

    dispatcher.run = {"run": entry.id, "resumed": entry.resumed}
    try:
        job = queue.load(entry.id, entry.source)
        serve_job(job, kit, resume=entry.resumed, on_round=on_round, he_context=he_context, host=dispatcher)
    except JobAborted as e:
        queue.ended(entry.id, JobStatus.ABORTED, str(e))
        log.warning("job %s (%s) %s; its run folder is kept: %s", entry.id, entry.name, e, entry.run_dir)
        return JobStatus.ABORTED
    except (KeyboardInterrupt, SystemExit):
        raise  # the job stays "running": resumed when the server starts again
    except BaseException as e:  # a job's crash must not stop the server or the other jobs
        why = str(e) if isinstance(e, MedfedError) else describe_exception(e)
        by = queue.abort_asked(entry.id)
        status = JobStatus.ABORTED if by is not None else JobStatus.FAILED
        queue.ended(entry.id, status, why if by is None else f"aborted by admin '{by}': {why}")
        log.error("job %s (%s) %s: %s; the server takes the next job", entry.id, entry.name, status.value, why,
                  exc_info=not isinstance(e, MedfedError))
        return status
    queue.ended(entry.id, JobStatus.COMPLETE)
    log.info("job %s (%s) complete: %s", entry.id, entry.name, entry.run_dir)
    return JobStatus.COMPLETE
