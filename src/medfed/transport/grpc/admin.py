"""A queue server's admin service (``medfed.Admin``), on the same mutual-TLS port as the
sites' calls, for the consortium's admins only (``medfed submit``, ``medfed jobs``).

Every method is unary, its request and reply one JSON header:

* ``SubmitJob`` ``{"text", "source"}`` (the job file and its name) -> ``{"job"}``: queued,
  or INVALID_ARGUMENT with the ConfigError's text (the checks of ``medfed validate`` and a
  deployment's own);
* ``ListJobs``  ``{}`` -> ``{"jobs": [...]}``, in the order submitted;
* ``ShowJob``   ``{"id"}`` -> ``{"job"}``, or NOT_FOUND;
* ``AbortJob``  ``{"id"}`` -> ``{"job"}``: a queued job dropped, the running one stopped at
  its next round boundary; NOT_FOUND, or FAILED_PRECONDITION for a job that has ended.

Each call's certificate must have the admin role (auth.py :func:`~.auth.identify_admin`):
a site's, or any other, is refused with PERMISSION_DENIED naming its role. Every call,
refused or not, is logged and appended to the server's admin audit trail
(``RUNS_DIR/admin-audit.jsonl``: time, admin or certificate name, address, method, job id,
outcome, reason); repeats of one refusal are held back as the hub's are (audit.RefusalLog).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from medfed.core.errors import CodecError, ConfigError, MedfedError
from medfed.server.queue import JobQueue, QueuedJob, UnknownJob
from medfed.transport.grpc import wire
from medfed.transport.grpc.audit import RefusalLog
from medfed.transport.grpc.auth import identify_admin
from medfed.transport.grpc.guard import Refused
from medfed.transport.pki.revocation import Revocations

log = logging.getLogger("medfed")

SERVICE = "medfed.Admin"
SUBMIT_JOB, LIST_JOBS, SHOW_JOB, ABORT_JOB = (f"/{SERVICE}/{m}" for m in ("SubmitJob", "ListJobs", "ShowJob",
                                                                          "AbortJob"))
AUDIT_FILE = "admin-audit.jsonl"


class AdminService:
    """The admin methods over ``queue``; ``revocations``: the consortium's list (an admin
    kit is revoked as a site's is)."""

    def __init__(self, queue: JobQueue, revocations: Revocations | None):
        self.queue = queue
        self.revocations = revocations
        self._refusals = RefusalLog()
        self._lock = threading.Lock()  # one audit line at a time

    def handler(self) -> grpc.GenericRpcHandler:
        methods: dict[str, Callable[[dict[str, Any], str], dict[str, Any]]] = {
            "SubmitJob": self._submit, "ListJobs": self._list, "ShowJob": self._show, "AbortJob": self._abort,
        }
        return grpc.method_handlers_generic_handler(
            SERVICE, {name: grpc.unary_unary_rpc_method_handler(self._serving(name, fn))
                      for name, fn in methods.items()})

    def _serving(self, method: str, fn: Callable[[dict[str, Any], str], dict[str, Any]]):
        def serve(request: bytes, context: grpc.ServicerContext) -> bytes:
            who, jid = None, None
            try:
                who, _ = identify_admin(context, self.revocations)
                hdr = wire.decode_header(request, f"{method} request")
                jid = hdr.get("id") if isinstance(hdr.get("id"), str) else None
                reply = fn(hdr, who)
            except Refused as e:
                self._refused(method, e.name or who, context.peer(), e.code, e.reason, jid)
                context.abort(e.code, e.reason)
            except CodecError as e:
                self._refused(method, who, context.peer(), grpc.StatusCode.INVALID_ARGUMENT, str(e), jid)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            except UnknownJob as e:
                self._refused(method, who, context.peer(), grpc.StatusCode.NOT_FOUND, str(e), jid)
                context.abort(grpc.StatusCode.NOT_FOUND, str(e))
            except ConfigError as e:  # a bad job: the admin reads the same text medfed validate prints
                self._refused(method, who, context.peer(), grpc.StatusCode.INVALID_ARGUMENT, str(e), jid)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            except MedfedError as e:
                self._refused(method, who, context.peer(), grpc.StatusCode.FAILED_PRECONDITION, str(e), jid)
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
            job = reply.get("job")
            self._record(method, who, context.peer(), "ok", None, job.get("id") if isinstance(job, dict) else jid)
            return wire.encode_header(reply)

        return serve

    # ------------------------------------------------------------------ the methods

    def _submit(self, hdr: dict[str, Any], who: str) -> dict[str, Any]:
        text, source = hdr.get("text"), hdr.get("source")
        if not isinstance(text, str):
            raise CodecError("SubmitJob request: text must be the job file's text")
        source = source if isinstance(source, str) and source else "submitted job"
        return {"job": self.queue.submit(text, source[:200], who).to_wire()}

    def _list(self, _hdr: dict[str, Any], _who: str) -> dict[str, Any]:
        return {"jobs": [j.to_wire() for j in self.queue.jobs()]}

    def _show(self, hdr: dict[str, Any], _who: str) -> dict[str, Any]:
        return {"job": self.queue.get(_job_id(hdr)).to_wire()}

    def _abort(self, hdr: dict[str, Any], who: str) -> dict[str, Any]:
        return {"job": self.queue.abort(_job_id(hdr), who).to_wire()}

    # ------------------------------------------------------------------ the audit trail

    def _refused(self, method: str, who: str | None, peer: str, code: grpc.StatusCode, reason: str,
                 jid: str | None) -> None:
        held = self._refusals.admit(who or peer, method, code, reason)
        if held is None:
            return
        more = f" ({held} more like it held back)" if held else ""
        log.warning("refused %s from %s (%s): %s%s", method, f"'{who}'" if who else "a caller", peer, reason, more)
        self._record(method, who, peer, f"refused ({code.name})", reason + more, jid)

    def _record(self, method: str, who: str | None, peer: str, outcome: str, reason: str | None,
                jid: str | None) -> None:
        row = {"time": time.time(), "who": who, "peer": peer, "method": method, "job": jid, "outcome": outcome,
               "reason": reason}
        if outcome == "ok" and method in ("SubmitJob", "AbortJob"):
            log.info("admin '%s' (%s): %s %s", who, peer, method, jid or "")
        path = self.queue.runs_dir / AUDIT_FILE
        try:
            with self._lock, open(path, "a", encoding="utf-8", opener=_private) as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:
            log.error("cannot write the admin audit trail '%s': %s", path, e)


def _private(path: str, flags: int) -> int:
    """Open the audit trail readable by the server's user only."""
    return os.open(path, flags, 0o600)


def _job_id(hdr: dict[str, Any]) -> str:
    jid = hdr.get("id")
    if not isinstance(jid, str) or not jid:
        raise CodecError("request: id must name a job (see medfed jobs list)")
    return jid


def read_audit(runs_dir: Path) -> list[dict[str, Any]]:
    """The admin audit trail's rows (for tests and inspection)."""
    path = runs_dir / AUDIT_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


__all__ = ["ABORT_JOB", "LIST_JOBS", "SHOW_JOB", "SUBMIT_JOB", "AdminService", "QueuedJob", "read_audit"]
