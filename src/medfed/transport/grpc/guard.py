"""Bounds on what one site can hold of the server: its calls, its transfers, its time.

A certificate makes a site a member of the consortium, not a trusted peer. A member that
opens calls and sends nothing, or sends its answer a byte at a time, must not hold the
server's request threads or its transfer slots and so stall the honest sites' rounds.
Every call of a site goes through the hub's :class:`Guard`:

* a site has at most ``MAX_CALLS`` calls open at once (an honest one has a poll, a
  submission and, while it reconnects, a join); a call beyond them is refused at once;
* a site has at most one transfer in each direction at a time (a model being sent to it,
  an answer being received from it);
* every wait on a site is bounded: a call's first message within ``FIRST_MESSAGE``
  seconds; in a transfer, each next message within ``NEXT_MESSAGE`` s and the whole
  transfer within ``TRANSFER_GRACE`` s plus its size at ``MIN_RATE`` bytes/s; a transfer
  whose task closed (it expired at the round timeout) ends too.

One watchdog thread, running while calls are open, checks them every ``TICK`` s and
cancels each that is past its bound. The call's handler then sees its stream end and
refuses it with :attr:`Call.cut`, the bound it broke, naming the site (log and audit).

The server registers every method as streaming in (see transport.py), so that its handler
runs, and the site is known, before the first message arrives: gRPC would otherwise hold a
request thread for a unary call's message with no bound of its own.
"""

from __future__ import annotations

import enum
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc

log = logging.getLogger("medfed")

MAX_CALLS = 4  # calls of one site open at once
FIRST_MESSAGE = 10.0  # s from opening a call to its first message
NEXT_MESSAGE = 30.0  # s between two messages of a transfer
TRANSFER_GRACE = 30.0  # s a transfer may take on top of its size at MIN_RATE
MIN_RATE = 256 * 1024  # bytes/s: the slowest transfer the server waits for (2 Mbit/s)
TICK = 0.25  # s between two checks of the watchdog


class Refused(Exception):
    """A request that breaks a rule: answered with ``code``, logged and audited with the
    reason. ``name``: the certificate's, when known; ``task``: (arm, round, kind) of the
    task the request was about, when known (an answer to a task already closed)."""

    def __init__(self, code: grpc.StatusCode, reason: str, name: str | None = None,
                 task: tuple[str, int, str] | None = None):
        super().__init__(reason)
        self.code, self.reason, self.name, self.task = code, reason, name, task


class Direction(enum.Enum):
    TO_SITE = "download"  # a task's payload, server to site
    FROM_SITE = "upload"  # an answer's payload, site to server


def transfer_limit(size: int) -> float:
    """Seconds a transfer of ``size`` bytes may take."""
    return TRANSFER_GRACE + max(0, size) / MIN_RATE


@dataclass(eq=False)
class Call:
    """One open call of a site, as the watchdog sees it."""

    site: str
    what: str  # "join", "ready", "poll", "submission"
    context: grpc.ServicerContext
    peer: str = ""  # the caller's address, kept: gRPC forgets it once the call has ended
    deadline: float = math.inf  # time.monotonic() by which the site must have done ``bound``
    bound: str = ""
    ends: float = math.inf  # the end of the transfer in progress, if any
    transfer_bound: str = ""  # the bound ``ends`` stands for
    alive: Callable[[], bool] | None = None  # during a transfer: whether its task is still open
    cut: str | None = None  # why the watchdog cancelled the call (None: it did not)
    audited: bool = False  # its refusal is in the audit already (its task's row says it)

    def expect(self, seconds: float, bound: str) -> None:
        """The site must do ``bound`` within ``seconds`` (and before its transfer ends)."""
        now = time.monotonic()
        if self.ends < now + seconds:
            self.deadline, self.bound = self.ends, self.transfer_bound
        else:
            self.deadline, self.bound = now + seconds, bound

    def hold(self) -> None:
        """The server is the one working or waiting now: no bound on the site (but the end
        of a transfer in progress)."""
        self.deadline, self.bound = self.ends, self.transfer_bound

    def begin(self, direction: Direction, size: int, alive: Callable[[], bool]) -> None:
        """A transfer of ``size`` bytes starts: it must end within :func:`transfer_limit`,
        and ends as soon as ``alive()`` turns false."""
        limit = transfer_limit(size)
        self.ends = time.monotonic() + limit
        self.transfer_bound = (f"{direction.value} of {size} bytes not done within {limit:.0f} s "
                               f"(the server waits for at least {MIN_RATE // 1024} KiB/s)")
        self.alive = alive
        self.hold()


class Guard:
    """The open calls and transfers of every site, and the watchdog over them."""

    def __init__(self, max_calls: int = MAX_CALLS):
        self.max_calls = max_calls
        self._lock = threading.Lock()
        self._calls: dict[str, list[Call]] = {}
        self._transfers: set[tuple[str, Direction]] = set()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ calls

    @contextmanager
    def call(self, site: str, what: str, context: grpc.ServicerContext) -> Iterator[Call]:
        """Count a call of ``site`` while it is open; refuse it when the site has
        ``max_calls`` open already."""
        c = Call(site, what, context, context.peer())
        with self._lock:
            calls = self._calls.setdefault(site, [])
            if len(calls) >= self.max_calls:
                raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"{len(calls)} calls of this site are open already, the most allowed")
            calls.append(c)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="medfed-guard", daemon=True)
                self._thread.start()
        try:
            yield c
        finally:
            with self._lock:
                self._calls[site].remove(c)

    def first(self, c: Call, messages: Iterable[Any], what: str) -> Any:
        """The call's first message, which must arrive within ``FIRST_MESSAGE`` s."""
        c.expect(FIRST_MESSAGE, f"no {what} within {FIRST_MESSAGE:g} s of opening the call")
        try:
            first = next(iter(messages), None)
        except grpc.RpcError:
            if c.cut is None:
                raise
            first = None
        c.hold()
        if first is None:
            raise self.refusal(c) or Refused(grpc.StatusCode.INVALID_ARGUMENT, f"empty {what}")
        return first

    @staticmethod
    def refusal(c: Call) -> Refused | None:
        """The refusal of a call the watchdog cut, or None when it did not cut it."""
        if c.cut is None:
            return None
        return Refused(grpc.StatusCode.DEADLINE_EXCEEDED, f"cut off: {c.cut}")

    def cut_site(self, site: str, reason: str, keep: Call | None = None) -> None:
        """Cancel every open call of ``site`` but ``keep`` (it has joined again: what it
        had open belongs to a connection it left)."""
        with self._lock:
            calls = [c for c in self._calls.get(site, []) if c is not keep and c.cut is None]
        for c in calls:
            self._cut(c, reason)

    # ------------------------------------------------------------------ transfers

    @contextmanager
    def transfer(self, c: Call, direction: Direction) -> Iterator[None]:
        """Hold the one transfer slot of ``c``'s site in ``direction`` (refused when another
        call of the site holds it); :meth:`Call.begin` bounds the transfer in time."""
        key = (c.site, direction)
        with self._lock:
            if key in self._transfers:
                raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"this site has an {direction.value} in progress already")
            self._transfers.add(key)
        try:
            yield
        finally:
            c.ends, c.transfer_bound, c.alive = math.inf, "", None
            c.hold()
            with self._lock:
                self._transfers.discard(key)

    def received(self, c: Call, messages: Iterable[Any]) -> Iterator[Any]:
        """``messages`` of a transfer from the site, each within ``NEXT_MESSAGE`` s of the
        one before. A stream the watchdog cancelled just ends (the reader sees it short)."""
        bound = f"no message for {NEXT_MESSAGE:g} s in the middle of an upload"
        c.expect(NEXT_MESSAGE, bound)
        it = iter(messages)
        while True:
            try:
                m = next(it)
            except StopIteration:
                break
            except grpc.RpcError:
                if c.cut is not None:  # the watchdog cancelled it: the reader sees it short
                    break
                raise
            c.hold()  # the server handles the message: its time is not the site's
            yield m
            c.expect(NEXT_MESSAGE, bound)
        c.ends, c.transfer_bound, c.alive = math.inf, "", None  # all in: what is left is the server's work
        c.hold()

    def sent(self, c: Call) -> None:
        """Before each message the server sends in a transfer: the site must take it within
        ``NEXT_MESSAGE`` s (gRPC holds a send until the site's window has room)."""
        c.expect(NEXT_MESSAGE, f"did not take a message for {NEXT_MESSAGE:g} s in the middle of a download")

    # ------------------------------------------------------------------ the watchdog

    def _watch(self) -> None:
        while True:
            time.sleep(TICK)
            with self._lock:
                calls = [c for cs in self._calls.values() for c in cs if c.cut is None]
                if not calls:
                    self._thread = None
                    return
            now = time.monotonic()
            for c in calls:
                if c.alive is not None and not c.alive():
                    self._cut(c, "its task closed (round timeout) before the transfer was done")
                elif now > c.deadline:
                    self._cut(c, c.bound)

    @staticmethod
    def _cut(c: Call, reason: str) -> None:
        c.cut = reason
        log.warning("cut off the %s of site '%s' (%s): %s", c.what, c.site, c.peer, reason)
        c.context.cancel()
