"""The hub's audit trail: one row per exchange with a site (accepted, refused, failed, timed
out) in the run store, and every refusal logged with the site, its address and the reason,
repeats held back (:class:`RefusalLog`)."""

from __future__ import annotations

import logging
import math
import threading
import time

import grpc

from medfed.server.store import RunStore
from medfed.transport.grpc.guard import Refused
from medfed.transport.grpc.tasks import Task

log = logging.getLogger("medfed")

CONNECTION = ("connection", 0, "call")  # (arm, round, kind) of a refusal about no task
REFUSAL_WINDOW = 10.0  # s: the same refusal of one site is logged and audited once per window


class RefusalLog:
    """The same refusal of one site, repeated (a site opening calls in a loop), is logged
    and audited once per ``REFUSAL_WINDOW`` seconds, with the count of those held back
    since, so that a hostile site cannot flood the log or the audit trail."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[tuple[str, str, str, str], tuple[float, int]] = {}  # key -> (logged at, held back)

    def admit(self, site: str, what: str, code: grpc.StatusCode, reason: str) -> int | None:
        """None when this refusal is held back; otherwise how many like it were held back
        since the last one logged."""
        key, now = (site, what, code.name, reason), time.monotonic()
        with self._lock:
            if len(self._last) > 4096:  # reasons that never repeat: forget those out of their window
                self._last = {k: v for k, v in self._last.items() if now - v[0] < REFUSAL_WINDOW}
            at, held = self._last.get(key, (-math.inf, 0))
            if now - at < REFUSAL_WINDOW:
                self._last[key] = (at, held + 1)
                return None
            self._last[key] = (now, 0)
            return held


class Audit:
    """Writes the audit rows to ``store`` (none when it is None) and logs refusals."""

    def __init__(self, store: RunStore | None):
        self.store = store
        self._refusals = RefusalLog()

    def refusal(self, what: str, site: str | None, e: Refused, peer: str, audited: bool = False) -> None:
        """Log refusal ``e`` of ``what`` from ``site`` (or the certificate ``e`` names) at
        ``peer``, and give it an audit row unless the task's row has it (``audited``);
        repeats within the window are held back and counted in the next one told."""
        name = site or e.name
        who = f"site '{site}'" if site else f"certificate '{name}'" if name else "a caller"
        held = self._refusals.admit(name, what, e.code, e.reason) if name else 0
        if held is None:
            return
        more = f" ({held} more like it held back in the last {REFUSAL_WINDOW:g} s)" if held else ""
        log.warning("refused %s from %s (%s): %s%s", what, who, peer, e.reason, more)
        if name and not audited:
            arm, rnd, kind = e.task or CONNECTION
            self.refused(arm, rnd, name, kind, f"{what}: {e.reason}{more}")

    def refused(self, arm: str, rnd: int, site: str, kind: str, reason: str) -> None:
        """One audit row of a refusal that no task's row records (``kind`` "call": no task;
        a TaskKind is its name)."""
        if self.store is not None:
            self.store.audit(arm, rnd, site, kind, "refused", 0, 0, None, 0.0, reason)

    def declined(self, site: str, reason: str) -> None:
        """The row of a site that said it cannot take part in the job (status ``failed``)."""
        if self.store is not None:
            arm, rnd, kind = CONNECTION
            self.store.audit(arm, rnd, site, kind, "failed", 0, 0, None, 0.0,
                             f"cannot take part in the job: {reason}")

    def turn(self, arm: str, rnd: int, site: str, status: str, sent: int, received: int, seconds: float,
             reason: str | None) -> None:
        """The row of one split-learning turn (kind ``split``): ``sent`` bytes to the site and
        ``received`` from it (frames, headers included) in ``seconds``; ``reason`` when it was
        refused."""
        if self.store is not None:
            self.store.audit(arm, rnd, site, "split", status, sent, received, None, seconds, reason)

    def task(self, task: Task, status: str, nbytes: int, digest: str | None, seconds: float,
             reason: str | None) -> None:
        """The row of ``task``, closed with ``status`` after ``seconds``: ``nbytes`` of answer
        with SHA-256 ``digest``, or ``reason`` why it was not accepted."""
        if self.store is not None:
            self.store.audit(task.arm, task.round, task.site, task.kind.value, status, task.bytes_sent, nbytes, digest,
                             seconds, reason)

