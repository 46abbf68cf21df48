"""The admin's side of a queue server's admin service (admin.py): ``medfed submit`` and
``medfed jobs`` dial the server named by an admin kit over mutual TLS, one call each, with
a deadline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc

from medfed.core.errors import ConfigError, MedfedError, NetworkError
from medfed.server.queue import QueuedJob, UnknownJob
from medfed.transport.grpc import wire
from medfed.transport.grpc.admin import ABORT_JOB, LIST_JOBS, SHOW_JOB, SUBMIT_JOB
from medfed.transport.pki import Kit

ADMIN_DEADLINE = 120.0  # seconds for one call: a submitted job's model is built once to check it


class AdminRefused(MedfedError):
    """The server refused the admin's call (not an admin certificate, a job that has ended...)."""


class AdminConnection:
    """One admin's channel to the queue server named by its ``kit`` (or ``target``)."""

    def __init__(self, kit: Kit, target: str | None = None):
        self.target = target or f"{kit.server_host}:{kit.server_port}"
        creds = wire.channel_credentials(kit.ca_pem, kit.cert_pem, kit.key_pem)
        self.channel = grpc.secure_channel(self.target, creds, options=wire.CHANNEL_OPTIONS)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> AdminConnection:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _call(self, method: str, request: dict[str, Any]) -> dict[str, Any]:
        call = self.channel.unary_unary(method)
        try:
            reply = call(wire.encode_header(request), timeout=ADMIN_DEADLINE)
        except grpc.RpcError as e:
            code, details = e.code(), e.details() or ""
            if code is grpc.StatusCode.INVALID_ARGUMENT and method == SUBMIT_JOB:
                raise ConfigError(details) from None
            if code is grpc.StatusCode.NOT_FOUND:
                raise UnknownJob(details) from None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise NetworkError(f"cannot reach the queue server at {self.target}: {details or code.name} (is it "
                                   "running with --queue?)") from None
            if code is grpc.StatusCode.UNIMPLEMENTED:
                raise AdminRefused(f"the server at {self.target} runs one job (medfed server --job), not a queue: "
                                   "start it with --queue RUNS_DIR") from None
            raise AdminRefused(f"the server refused: {details} ({code.name})") from None
        return wire.decode_header(reply, "admin reply")

    def submit(self, job_file: Path) -> QueuedJob:
        try:
            text = job_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"job file '{job_file}': cannot read it ({e})") from None
        return QueuedJob.from_wire(self._call(SUBMIT_JOB, {"text": text, "source": job_file.name})["job"])

    def list(self) -> list[QueuedJob]:
        jobs = self._call(LIST_JOBS, {}).get("jobs")
        return [QueuedJob.from_wire(j) for j in jobs] if isinstance(jobs, list) else []

    def show(self, jid: str) -> QueuedJob:
        return QueuedJob.from_wire(self._call(SHOW_JOB, {"id": jid})["job"])

    def abort(self, jid: str) -> QueuedJob:
        return QueuedJob.from_wire(self._call(ABORT_JOB, {"id": jid})["job"])
