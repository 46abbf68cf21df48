"""Who is connected to the hub: each site's session from its join, its data summary once it
is ready, and whether it still polls (liveness). Shares the hub's condition variable."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
from medfed.core.modelspec import ModelSpec
from medfed.core.summary import SiteSummary
from medfed.transport.grpc import wire
from medfed.transport.grpc.guard import Refused

# seconds after its last poll that a site still counts as connected (a site polls again
# at once after each answer, and every POLL_WAIT s when idle)
LIVE_WINDOW = 3 * wire.POLL_WAIT


@dataclass
class Session:
    site: str
    address: str
    fingerprint: str
    joined: float
    summary: SiteSummary | None = None
    model: ModelSpec | None = None  # the description of the model it built (None: it sent none)
    declined: str | None = None  # why it cannot take part in the job, when it said so
    got_done: bool = False
    last_seen: float = 0.0  # time.monotonic() of its last poll
    polling: int = 0  # polls open right now


class Sessions:
    """The session of every site that joined (and was not left out since)."""

    def __init__(self, cv: threading.Condition):
        self._cv = cv
        self._sessions: dict[str, Session] = {}
        self.interrupted = False  # the job is being stopped (a queue server's abort): no more waiting for sites

    def join(self, site: str, address: str, fingerprint: str, when: float) -> None:
        """A new session of ``site`` (one it had before is over)."""
        with self._cv:
            self._sessions[site] = Session(site, address, fingerprint, when)
            self._cv.notify_all()

    def ready(self, site: str, summary: SiteSummary, model: ModelSpec | None = None) -> None:
        """``site`` is ready with the data of ``summary`` and the model ``model`` describes;
        Refused when it has not joined."""
        with self._cv:
            session = self._sessions.get(site)
            if session is None:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION, "call Join first")
            session.summary, session.model, session.declined = summary, model, None
            session.last_seen = time.monotonic()
            self._cv.notify_all()

    def decline(self, site: str, reason: str) -> bool:
        """``site`` said it cannot take part in the job, for ``reason``: nobody waits for it
        any more (until it joins again). False when its session had said so already (a
        repeat, not to be told again); True otherwise, also without a session (the server
        restarted while the site set the job up: its reason is still worth telling)."""
        with self._cv:
            session = self._sessions.get(site)
            if session is None:
                return True
            if session.declined == reason:
                return False
            session.declined = reason
            self._cv.notify_all()
            return True

    def end(self, site: str) -> None:
        with self._cv:
            self._sessions.pop(site, None)
            self._cv.notify_all()

    def ready_session(self, site: str) -> Session:
        """The session of ``site``, which must have joined and be ready; else Refused."""
        with self._cv:
            session = self._sessions.get(site)
            if session is None or session.summary is None:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION, "call Join and Ready first")
            return session

    def summary(self, site: str) -> SiteSummary | None:
        with self._cv:
            return self._sessions[site].summary if site in self._sessions else None

    # ------------------------------------------------------------------ liveness

    def seen(self, site: str) -> None:
        """``site`` answered: it is connected, about to poll again."""
        with self._cv:
            if site in self._sessions:
                self._sessions[site].last_seen = time.monotonic()

    @contextmanager
    def polling(self, session: Session) -> Iterator[None]:
        """A poll of ``session``'s site is open (it counts as connected meanwhile)."""
        with self._cv:
            session.polling += 1
            session.last_seen = time.monotonic()
        try:
            yield
        finally:
            with self._cv:
                session.polling -= 1
                session.last_seen = time.monotonic()

    def connected(self, site: str, now: float) -> bool:
        """A ready site is connected while it polls, or polled within ``LIVE_WINDOW`` s."""
        with self._cv:
            s = self._sessions.get(site)
            return s is not None and s.summary is not None and (s.polling > 0 or now - s.last_seen < LIVE_WINDOW)

    # ------------------------------------------------------------------ the round loop's side

    def wait_ready(self, sites: list[str], timeout: float, on_change: Callable[[list[str]], None] | None = None
                   ) -> list[str]:
        """Wait until every site in ``sites`` is ready or has declined the job, or ``timeout``
        s pass; return the ready ones. ``on_change(ready)`` is called whenever the set grows."""
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        with self._cv:
            while True:
                ready = [s for s in sites if s in self._sessions and self._sessions[s].summary is not None]
                declined = [s for s in sites if s in self._sessions and self._sessions[s].declined is not None]
                if ready != seen and on_change is not None:
                    on_change(ready)
                seen = ready
                left = deadline - time.monotonic()
                if len(set(ready) | set(declined)) == len(sites) or left <= 0 or self.interrupted:
                    return ready
                self._cv.wait(min(left, 1.0))

    def summaries(self) -> dict[str, SiteSummary]:
        with self._cv:
            return {s: x.summary for s, x in self._sessions.items() if x.summary is not None}

    def models(self) -> dict[str, ModelSpec | None]:
        """The model each ready site described (None: it sent no description)."""
        with self._cv:
            return {s: x.model for s, x in self._sessions.items() if x.summary is not None}

    def declined(self) -> dict[str, str]:
        """Why each site that declined the job (and did not join again since) cannot take part."""
        with self._cv:
            return {s: x.declined for s, x in self._sessions.items() if x.declined is not None}

    def heard_done(self, session: Session) -> None:
        """``session``'s site was told the job is done."""
        with self._cv:
            session.got_done = True
            self._cv.notify_all()

    def wait_done(self, grace: float) -> None:
        """Wait up to ``grace`` s until every site has been told the job is done."""
        deadline = time.monotonic() + grace
        with self._cv:
            while any(not s.got_done for s in self._sessions.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
