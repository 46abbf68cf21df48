"""Refused TLS handshakes, logged by medfed with the peer and the reason.

A client with a certificate of another CA, an expired one, none, or plain TCP or HTTP is
refused by gRPC's C core during the TLS handshake, before any medfed code runs, and gRPC
says so only in its own log on stderr. gRPC Python has no hook that sees a handshake fail
(its dynamic server credentials ask for certificates at each handshake, without the peer or
the outcome), so the server process watches that log: :func:`watch_refused_handshakes`,
called by ``medfed server`` before anything imports gRPC,

* turns on gRPC's ``handshaker`` tracer (its records name the peer's address; gRPC reads
  ``GRPC_TRACE`` once, when it is imported) unless the operator's ``GRPC_TRACE`` has it;
* points the process's fd 2 through :mod:`~medfed.transport.grpc.stderr_relay`, a small
  process that forwards every byte unchanged and in order to the real stderr (a
  pseudo-terminal when stderr is one, so that colours and widths stay), leaves out the
  tracer's records when medfed turned it on, and sends each failed handshake back as an
  event;
* logs each event (logger ``medfed``: the terminal and run.log) and, once
  :func:`attach` gave it the hub's audit (``start_server`` does), audits it: arm
  ``connection``, kind ``call``, status ``refused``, the peer's host as the site (its
  address with the port in the reason).

The same refusal from one host (any port) is logged and audited once per ``WINDOW`` s,
then once more with the count of those held back (:class:`RepeatLimiter`), so that a
scanner cannot flood run.log or the audit trail. A peer that closes the connection during
the handshake (a site that does not trust the server's certificate, a port probe) is
logged at INFO, not audited. Simulations never start the watch.
"""

from __future__ import annotations

import atexit
import fcntl
import logging
import math
import os
import select
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from medfed.transport.grpc import stderr_relay
from medfed.transport.grpc.stderr_relay import Outcome, Refusal

if TYPE_CHECKING:
    from medfed.transport.grpc.audit import Audit

log = logging.getLogger("medfed")

WINDOW = 60.0  # s: the same refusal from one host is told once per window, with a count
MAX_KEYS = 4096  # (host, reason) pairs followed at once; more fall into one shared count
STOP_WAIT = 5.0  # s: waited for the relay to forward what is left when the watch stops
MAX_EVENT = 1 << 16  # bytes of one event line; a longer one is not an event of the relay's
TRACER = "handshaker"
UNKNOWN_PEER = "an unknown peer"
CROWD = ("many hosts", "")  # the shared key once MAX_KEYS pairs are followed


def peer_host(peer: str | None) -> str:
    """The host of gRPC's peer address (``ipv4:10.0.0.7:51234`` -> ``ipv4:10.0.0.7``): a
    scanner opens every connection from a new port."""
    if peer is None:
        return UNKNOWN_PEER
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() and ":" in host else peer


@dataclass
class _Window:
    start: float
    first: Refusal  # the one told when the window opened
    held: int = 0


class RepeatLimiter:
    """The first refusal of a (host, reason) pair is told; the same within ``window`` s of
    it are held back and counted, and :meth:`expired` gives the count once the window has
    passed. At most ``max_keys`` pairs are followed: past that, refusals share one count."""

    def __init__(self, window: float = WINDOW, max_keys: int = MAX_KEYS):
        self.window, self.max_keys = window, max_keys
        self._open: dict[tuple[str, str], _Window] = {}

    def admit(self, r: Refusal, now: float) -> bool:
        """Whether ``r`` is told now (else it is counted)."""
        key = (peer_host(r.peer), r.reason)
        w = self._open.get(key)
        if w is None and len(self._open) >= self.max_keys:
            key = CROWD
            w = self._open.get(key)
        if w is not None and now - w.start < self.window:
            w.held += 1
            return False
        self._open[key] = _Window(now, r)
        return True

    def expired(self, now: float = math.inf) -> list[tuple[str, Refusal, int]]:
        """(host, the refusal that opened the window, how many were held back) for every
        window that has passed with refusals held back; all of them when ``now`` is inf."""
        out = []
        for key, w in list(self._open.items()):
            if now - w.start >= self.window:
                del self._open[key]
                if w.held:
                    out.append((key[0], w.first, w.held))
        return out


def _describe(r: Refusal) -> str:
    return r.reason if r.outcome is Outcome.UNRECOGNIZED or r.detail == r.reason else f"{r.reason} ({r.detail})"


class HandshakeWatch:
    """The relay process, the thread that reads its events, and what they are told to.
    ``own_trace``: medfed turned gRPC's handshaker tracer on (the relay leaves its records
    out of stderr)."""

    def __init__(self, own_trace: bool, clock: Callable[[], float] = time.monotonic):
        self.own_trace = own_trace
        self.clock = clock
        self.limiter = RepeatLimiter()
        self.audit: Audit | None = None
        self._lock = threading.Lock()
        self._stderr: int | None = None  # the real stderr, while fd 2 is the relay's
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._events = -1

    # ------------------------------------------------------------------ telling
    def handle(self, r: Refusal) -> None:
        """Log (and audit) refusal ``r`` unless a like one was told within the window."""
        with self._lock:
            if r.dropped:
                log.warning("%d failed TLS handshake(s) were not logged: the server did not read them in time",
                            r.dropped)
            if self.limiter.admit(r, self.clock()):
                self._tell(r.peer or UNKNOWN_PEER, r, "")

    def flush(self, now: float = math.inf) -> None:
        """Tell the counts of the windows that have passed (all of them when ``now`` is inf)."""
        with self._lock:
            for host, r, held in self.limiter.expired(now):
                self._tell(host, r, f" {held} more time(s) in the {self.limiter.window:g} s after the first")

    def _tell(self, who: str, r: Refusal, more: str) -> None:
        what = _describe(r)
        if r.outcome is Outcome.CLOSED:
            log.info("TLS handshake from %s not completed%s: %s (a site that does not trust the server's "
                     "certificate does this, and so does a port probe)", who, more, what)
            return
        log.warning("handshake refused from %s%s: %s", who, more, what)
        if self.audit is not None:
            # the host as the site (one row per host in the dashboard), the port in the reason
            try:
                self.audit.refused("connection", 0, peer_host(r.peer), "call", f"TLS handshake from {who}{more}: {what}")
            except ValueError as e:  # the run store is closed: the server has stopped
                log.debug("refused handshake not audited: %s", e)

    # ------------------------------------------------------------------ the relay
    def start(self) -> None:
        """Point fd 2 through the relay and read its events."""
        real = os.dup(2)
        try:
            read_end, write_end = _terminal_like(real) if os.isatty(real) else os.pipe()
        except OSError:  # no pseudo-terminal to be had: a pipe
            read_end, write_end = os.pipe()
        events, events_w = os.pipe()
        cmd = [sys.executable, "-I", "-S", stderr_relay.__file__, "--events-fd", str(events_w)]
        try:
            self._proc = subprocess.Popen([*cmd, *(["--own-trace"] if self.own_trace else [])], stdin=read_end,
                                          stdout=real, stderr=real, pass_fds=(events_w,))
        except BaseException:
            for fd in (real, read_end, write_end, events, events_w):
                os.close(fd)
            raise
        os.close(read_end)
        os.close(events_w)
        if sys.stderr is not None:
            sys.stderr.flush()  # what Python holds goes out the old way, before what follows
        os.dup2(write_end, 2)
        os.close(write_end)
        self._stderr, self._events = real, events
        self._thread = threading.Thread(target=self._read_events, name="medfed-handshakes", daemon=True)
        self._thread.start()
        atexit.register(self.stop)

    def _restore(self) -> bool:
        """fd 2 back to the real stderr; False when it was already."""
        with self._lock:
            real, self._stderr = self._stderr, None
        if real is None:
            return False
        try:
            if sys.stderr is not None:
                sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(real, 2)  # the relay's end closes in this process: it forwards the rest and ends
        os.close(real)
        return True

    def stop(self) -> None:
        """fd 2 back to the real stderr, once the relay has forwarded what it holds."""
        if not self._restore():
            return
        atexit.unregister(self.stop)
        if self._proc is not None:
            try:
                self._proc.wait(STOP_WAIT)
            except subprocess.TimeoutExpired:  # a child of the server still holds the pipe
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(STOP_WAIT)

    def _read_events(self) -> None:
        buf = bytearray()
        while True:
            ready, _, _ = select.select([self._events], [], [], 1.0)
            data = os.read(self._events, 1 << 16) if ready else None
            if data == b"":
                break
            if data:
                buf += data
                while (i := buf.find(b"\n")) >= 0:
                    line = bytes(buf[:i])
                    del buf[: i + 1]
                    try:
                        self.handle(Refusal.from_json(line))
                    except (ValueError, TypeError) as e:
                        log.debug("not an event of the stderr relay: %s", e)
                if len(buf) > MAX_EVENT:
                    buf.clear()
            self.flush(self.clock())
        os.close(self._events)
        self.flush()
        if self._restore():  # the relay ended before the server stopped it
            log.warning("the stderr relay ended (exit status %s): refused TLS handshakes are no longer logged",
                        self._proc.poll() if self._proc is not None else None)

    def attach(self, audit: Audit | None) -> None:
        self.audit = audit


def _terminal_like(real: int) -> tuple[int, int]:
    """A pseudo-terminal as wide as the real one, which passes bytes unchanged: what the
    server writes to it looks as it did (colours, widths) once the relay forwards it."""
    read_end, write_end = os.openpty()
    attrs = termios.tcgetattr(write_end)
    attrs[1] &= ~termios.OPOST  # no output processing (\n stays \n)
    termios.tcsetattr(write_end, termios.TCSANOW, attrs)
    try:
        fcntl.ioctl(write_end, termios.TIOCSWINSZ, fcntl.ioctl(real, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        pass
    return read_end, write_end


_watch: HandshakeWatch | None = None


def watch_refused_handshakes() -> HandshakeWatch | None:
    """Start watching this process's stderr for refused TLS handshakes (once per process;
    the server process only). None when gRPC is told to hide them (``GRPC_VERBOSITY``
    ERROR or NONE)."""
    global _watch
    if _watch is not None:
        return _watch
    verbosity = os.environ.get("GRPC_VERBOSITY", "").strip().upper()
    if verbosity in ("ERROR", "NONE"):
        log.warning("GRPC_VERBOSITY=%s hides gRPC's messages about TLS handshakes: medfed cannot log refused "
                    "handshakes; unset it (or set INFO) to have them in run.log", verbosity)
        return None
    given = os.environ.get("GRPC_TRACE", "")
    theirs = bool({t.strip().lower() for t in given.split(",")} & {TRACER, "all"})
    loaded = "grpc._cython.cygrpc" in sys.modules  # gRPC read GRPC_TRACE when it was imported
    own = not theirs and not loaded
    if own:
        os.environ["GRPC_TRACE"] = f"{given},{TRACER}" if given.strip() else TRACER
    elif not theirs:
        log.info("gRPC was loaded before medfed could turn on its %s tracer: refused TLS handshakes are logged "
                 "without the peer's address", TRACER)
    watch = HandshakeWatch(own_trace=own)
    try:
        watch.start()
    except OSError as e:  # no stderr to take (fd 2 closed), no process to start
        log.warning("cannot watch stderr for refused TLS handshakes (%s): they are in gRPC's log only", e)
        return None
    _watch = watch
    return watch


def attach(audit: Audit | None) -> None:
    """Audit refused handshakes in ``audit`` (the hub's) from now on; nothing when the
    process does not watch them."""
    if _watch is not None:
        _watch.attach(audit)


def stop_watching() -> None:
    """Stop the watch (fd 2 back to the real stderr); for tests, and at exit."""
    global _watch
    watch, _watch = _watch, None
    if watch is not None:
        watch.stop()
