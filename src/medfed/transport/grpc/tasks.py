"""The hub's task board: one queue of tasks per site, the open tasks by id, and the ids of
the closed ones (an answer to a closed task is a replay or comes too late).

A task goes ``queued -> sent -> answered | expired``: queued when the round loop hands it
over (:meth:`TaskBoard.run`), sent when its site's poll takes it, answered when its answer
(or a failure) is settled, expired when its site is not connected or the round timeout
passes first. The board shares the hub's condition variable: every method here takes it.
"""

from __future__ import annotations

import enum
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc

from medfed.core.types import Encoding, EvalResult, SiteFailure, Spec, Split, Update
from medfed.transport.grpc.guard import Refused


class TaskKind(enum.StrEnum):
    """What a task asks of a site; the value is the ``kind`` of the wire header and of the
    audit row."""

    FIT = "fit"  # train: the answer is an update
    EVALUATE = "evaluate"  # evaluate: the answer is a list of results
    EXCHANGE = "exchange"  # a protocol message of the update path (JSON both ways)


class TaskState(enum.StrEnum):
    QUEUED = "queued"  # waiting for its site's poll
    SENT = "sent"  # taken by its site: waiting for the answer
    ANSWERED = "answered"  # closed with its answer (or a failure)
    EXPIRED = "expired"  # closed unanswered: the site was not connected, or the round timed out


# what a task ends with: an update (fit), results (evaluate), a protocol reply (exchange), or a failure
Answer = Update | list[EvalResult] | dict[str, Any] | SiteFailure
# what the board remembers of a closed task: (arm, round, kind), for the refusal of a late answer
Closed = tuple[str, int, TaskKind]


@dataclass(eq=False)
class Task:
    """One request to one site, waiting for its answer."""

    site: str
    kind: TaskKind
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
    state: TaskState = TaskState.QUEUED
    answer: Answer | None = None
    sent_at: float = 0.0
    bytes_sent: int = 0

    def __post_init__(self) -> None:
        self.kind = TaskKind(self.kind)  # a kind given by its value ("fit") becomes the enum; another is a ValueError

    @property
    def open(self) -> bool:
        """Taken by its site and not closed yet: an answer (or an upload) for it is awaited."""
        return self.state is TaskState.SENT


class TaskBoard:
    """The tasks of the run, per site and by id. ``cv``: the hub's condition variable."""

    def __init__(self, sites: Iterable[str], cv: threading.Condition):
        self._cv = cv
        self._queues: dict[str, deque[Task]] = {s: deque() for s in sites}
        self._open: dict[str, Task] = {}  # queued or sent, by id
        self._closed: dict[str, Closed] = {}  # answered or expired tasks: id -> (arm, round, kind)
        self.done = False  # the job is over: polls are told so

    def next_task(self, site: str, wait: float) -> Task | None:
        """The next task of ``site`` (now sent), waiting up to ``wait`` s for one; None when
        none came or the job is done."""
        deadline = time.monotonic() + wait
        with self._cv:
            while not self._queues[site] and not self.done:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cv.wait(left)
            if not self._queues[site]:
                return None
            task = self._queues[site].popleft()
            task.state, task.sent_at = TaskState.SENT, time.monotonic()
            return task

    def task_for(self, tid: Any, site: str) -> Task:
        """The sent task ``tid`` of ``site`` that an answer says it is for, or Refused."""
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
        if not task.open:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"task {tid} has not been sent yet")
        return task

    def close(self, task: Task, answer: Answer) -> None:
        """Close ``task`` with ``answer`` (call with the lock held)."""
        task.answer, task.state = answer, TaskState.ANSWERED
        self._open.pop(task.id, None)
        self._closed[task.id] = (task.arm, task.round, task.kind)
        self._cv.notify_all()

    def fail_sent(self, site: str, cause: str) -> list[Task]:
        """Close every task sent to ``site`` with a failure for ``cause``; return them."""
        with self._cv:
            failed = [t for t in self._open.values() if t.site == site and t.open]
            for t in failed:
                self.close(t, SiteFailure(site, cause))
        return failed

    def run(self, tasks: list[Task], timeout: float, connected: Callable[[str, float], bool]) -> list[Task]:
        """Queue ``tasks`` and wait until each is answered or ``timeout`` seconds pass;
        return those that expired, in the order they did.

        A task for a site that is not ``connected(site, now)`` fails at once instead of
        holding the round until the timeout; a task a site took and did not answer fails at
        the timeout, and a later answer to it is refused."""
        deadline = time.monotonic() + timeout
        gone: list[Task] = []
        with self._cv:
            for t in tasks:
                self._queues[t.site].append(t)
                self._open[t.id] = t
            self._cv.notify_all()
            while True:
                now = time.monotonic()
                for t in tasks:
                    if t.state is TaskState.QUEUED and not connected(t.site, now):
                        self._expire(t, "the site is not connected")
                        gone.append(t)
                left = deadline - now
                if left <= 0 or all(t.state in (TaskState.ANSWERED, TaskState.EXPIRED) for t in tasks):
                    break
                self._cv.wait(min(left, 1.0))
            late = [t for t in tasks if t.state in (TaskState.QUEUED, TaskState.SENT)]
            for t in late:
                self._expire(t, f"no answer within round_timeout={timeout:g}s")
        return gone + late

    def _expire(self, t: Task, cause: str) -> None:  # holds the lock
        if t.state is TaskState.QUEUED:
            self._queues[t.site].remove(t)
        t.state, t.answer = TaskState.EXPIRED, SiteFailure(t.site, cause)
        self._open.pop(t.id, None)
        self._closed[t.id] = (t.arm, t.round, t.kind)

    def finish(self) -> None:
        """The job is over: waiting polls return."""
        with self._cv:
            self.done = True
            self._cv.notify_all()
