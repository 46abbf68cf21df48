"""What the hub takes in: a site's answer to a task, read and checked before it is used.

An answer must be of the task's kind (or report the site's error), for the task's round;
its payload must have the declared size (at most what the task allows) and SHA-256 (when
it declares one; the server hashes every payload itself for its audit trail), and decode
without error. An update must name its site, count the training examples the site
reported, fit the model sent (names, shapes, dtypes, finite values) and not repeat an
update accepted before; an evaluation answer must count the examples the site declared
and report only the task's metrics, within their ranges.

Updates arrive through a bounded number of upload slots, and the first of a batch's
updates are received in memory (reused buffers); past the memory budget they are spooled
to temporary files, so the server's memory does not grow with the number of sites.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import grpc

from medfed.core import codec
from medfed.core.buffers import BufferPool
from medfed.core.errors import CodecError
from medfed.core.types import EvalResult, SiteFailure, Split, Update
from medfed.server.store import RunStore
from medfed.server.validate import eval_problem, update_problem
from medfed.transport.grpc import wire
from medfed.transport.grpc.guard import Call, Refused
from medfed.transport.grpc.sessions import Sessions
from medfed.transport.grpc.tasks import Answer, Task, TaskKind


class MemoryBudget:
    """The bytes of this batch's updates held in memory, and the buffers they arrive in
    (``keep`` of them are reused)."""

    def __init__(self, keep: int):
        self.buffers = BufferPool(keep=keep)
        self._lock = threading.Lock()
        self._held = 0

    def hold(self, size: int, task: Task, updates: int) -> bool:
        """Whether an update of ``size`` bytes fits in this batch's budget (then it is
        counted against it): ``updates`` times the model sent (and a header)."""
        with self._lock:
            if 0 <= size <= task.limit and self._held + size <= updates * (len(task.blob) + wire.MAX_HEADER):
                self._held += size
                return True
            return False

    def give_back(self, size: int) -> None:
        """An update held was refused: its memory is free again."""
        with self._lock:
            self._held = max(0, self._held - size)

    def reset(self) -> None:
        """A new batch: the round loop has let go of the last one's updates."""
        with self._lock:
            self._held = 0


class Intake:
    """Reads and checks answers. ``sessions``: the sites' data summaries (what an answer
    must count); ``metric_bounds``: what an evaluation answer may hold; ``store``: updates
    accepted by earlier runs of this job (replays); ``slots``: updates received at once;
    ``keep``: buffers kept for the updates received in memory."""

    def __init__(self, sessions: Sessions, metric_bounds: Mapping[str, tuple[float, float]], store: RunStore | None,
                 slots: int, keep: int):
        self.sessions = sessions
        self.metric_bounds = metric_bounds
        self.store = store
        self.budget = MemoryBudget(keep)
        self._slots = threading.BoundedSemaphore(slots)  # held while an update is received
        self._lock = threading.Lock()
        self._accepted: set[str] = set()  # SHA-256 of every update accepted in this process

    # ------------------------------------------------------------------ upload slots

    def take_slot(self, wait: float, task: Task, call: Call) -> bool:
        """One of the upload slots, within ``wait`` s and while the task is open and the call
        not cut."""
        deadline = time.monotonic() + wait
        while task.open and call.cut is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self._slots.acquire(timeout=min(left, 0.5)):
                return True
        return False

    def release_slot(self) -> None:
        self._slots.release()

    def accepted(self, digest: str) -> None:
        """The update with SHA-256 ``digest`` was accepted: the same one again is a replay."""
        with self._lock:
            self._accepted.add(digest)

    # ------------------------------------------------------------------ reading an answer

    def read(self, task: Task, hdr: dict[str, Any], messages: Iterator[bytes], site: str,
             updates_in_memory: int) -> tuple[Answer, int, str | None]:
        """(answer, payload bytes, SHA-256) of ``site``'s answer to ``task``: header ``hdr``,
        then the payload in ``messages``; or Refused. Up to ``updates_in_memory`` model
        sizes of this batch's updates are received in memory."""
        if hdr.get("round") != task.round:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"answer is for round {hdr.get('round')!r}, the task is round {task.round}")
        kind = hdr.get("kind")
        if kind == "error":
            cause = str(hdr.get("cause", "unknown error"))[:2000]
            return SiteFailure(site, f"site error: {cause}"), 0, None
        if kind != task.kind.value:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"answer kind {kind!r}, the task is '{task.kind.value}'")
        size = hdr.get("size")
        if isinstance(size, bool) or not isinstance(size, int):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"size must be an integer, got {size!r}")
        if task.kind is not TaskKind.FIT:
            return self._read_reply(task, hdr, messages, site, size)
        held = self.budget.hold(size, task, updates_in_memory)
        try:
            return self._read_update(task, hdr, messages, site, size, held)
        except BaseException:
            if held:  # refused: the memory it was given is free again
                self.budget.give_back(size)
            raise

    def _read_reply(self, task: Task, hdr: dict[str, Any], messages: Iterator[bytes], site: str,
                    size: int) -> tuple[dict[str, Any] | list[EvalResult], int, str]:
        """An exchange reply (a JSON object) or evaluation results."""
        what = f"{task.kind.value} answer"
        try:
            blob, digest = wire.gather(messages, size, task.limit, what)
            wire.check_payload(digest, hdr.get("sha256"), what)
            if task.kind is TaskKind.EXCHANGE:
                return wire.decode_json_object(blob, what), size, digest
            results = codec.decode_eval_results(site, blob, task.splits)
        except CodecError as e:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        summary = self.sessions.summary(site)
        sizes = {Split.VAL: summary.val, Split.TEST: summary.test} if summary is not None else None
        problem = eval_problem(results, self.metric_bounds, sizes)
        if problem is not None:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"evaluation results: {problem}")
        return results, size, digest

    def _read_update(self, task: Task, hdr: dict[str, Any], messages: Iterator[bytes], site: str, size: int,
                     in_memory: bool) -> tuple[Update, int, str]:
        what = f"{task.kind.value} answer"
        try:
            if in_memory:  # the update's tensors are views of the payload
                blob, _ = wire.gather(messages, size, task.limit, what, hashed=False, pool=self.budget.buffers)
                digest = wire.sha256(blob)  # at once, after the last chunk: the stream is not held up
                wire.check_payload(digest, hdr.get("sha256"), what)
                update = codec.view_update(blob)
            else:  # to disk as it arrives; its tensors are read back, in parts, when used
                f, digest = wire.gather_to_file(messages, size, task.limit, what)
                try:
                    wire.check_payload(digest, hdr.get("sha256"), what)
                    update = codec.read_update_file(f, size)
                except BaseException:
                    f.close()
                    raise
        except CodecError as e:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        if update.site != site:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, f"update says site '{update.site}'")
        with self._lock:
            replay = digest in self._accepted
        if replay or (self.store is not None and self.store.seen_update(digest)):
            raise Refused(grpc.StatusCode.ALREADY_EXISTS, f"update {digest[:12]} was accepted before (replay)")
        summary = self.sessions.summary(site)
        if summary is not None and update.num_examples != summary.train:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"update claims {update.num_examples} training examples, the site reported {summary.train}")
        problem = update_problem(update, task.spec or {}, task.round, task.encoding)
        if problem is not None:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, problem)
        return update, size, digest
