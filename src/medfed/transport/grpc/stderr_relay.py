"""The server process's stderr, relayed: every byte forwarded unchanged and in order to the
real stderr, and gRPC's log lines about failed TLS handshakes turned into refusal events.

A refused TLS handshake (a certificate of another CA, an expired one, none, plain TCP or
HTTP) fails inside gRPC's C core before any medfed code runs; gRPC only writes it to
stderr. :mod:`medfed.transport.grpc.handshakes` points the server's fd 2 through this
relay, run as its own process (``python -I -S stderr_relay.py``: the standard library
only, so it starts fast and imports nothing of medfed): it outlives a crash of the server
long enough to forward what the server wrote before it (a fault handler's dump, gRPC's
fatal message), since it reads until every writer has closed the pipe.

What gRPC writes (grpcio 1.85, absl logging; one record is one write, a header line and
possibly continuation lines):

* by default, ``I... ssl_transport_security.cc:2563] Handshake failed with error SSL_ERROR_SSL:
  error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: unable to get
  local issuer certificate``: the reason, not the peer;
* with the ``handshaker`` tracer (``GRPC_TRACE=handshaker``), per connection a few records of
  ``handshaker.cc``, one of which, on failure, is ``CallNextHandshakerLocked: error=<the
  failure> ... args={... grpc.internal.endpoint_peer_address=ipv4:10.0.0.7:51234 ...}``:
  the reason and the peer. When medfed turned that tracer on (the operator had not), its
  records are medfed's instrument, not the server's output: they are not forwarded.

The records of one failure each repeat its reason; the parser (:class:`Parser`) merges
them into one :class:`Refusal`, so a change of gRPC's wording gives at worst an
unrecognized reason, told raw (or one refusal told twice, once without the peer), never a
lost event. Events travel to the server as JSON lines on a non-blocking pipe: when the
server does not read them, they are dropped (and counted), and the relay never stops
forwarding stderr.
"""

from __future__ import annotations

import argparse
import enum
import errno
import json
import os
import re
import select
import signal
import sys
import time
from dataclasses import asdict, dataclass, field

READ_SIZE = 1 << 16
MAX_PARSED_LINE = 16 << 10  # characters of one line the parser looks at (the line is forwarded whole)
MAX_RECORD_LINES = 8  # continuation lines of one gRPC record the parser keeps
PARTIAL_WAIT = 0.1  # s: an unfinished line (a prompt, a progress bar) is forwarded after this
# a failure's records are written microseconds apart; the bound leaves room for a loaded
# machine, while the handshake manager's last record ends a failure at once (with the tracer)
BURST_GAP = 1.0  # s without a record of a failure: all of its records have come
RECORD_WAIT = 0.05  # s: a record's continuation lines come with its first line
MAX_OPEN = 256  # failures followed at once (a flood); past that, the oldest is told as it stands

# an absl / gpr log record's first line: severity, MMDD, time, thread id, file:line
HEADER = re.compile(r"^(?P<sev>[DIWEF])\d{4} \d\d:\d\d:\d\d\.\d+\s+(?P<tid>\d+) (?P<src>[^\s\]]+:\d+)\] (?P<msg>.*)$")
# the message of a record about a failed handshake (any wording that says so)
FAILED = re.compile(r"handshak\w*\b.*?(fail|refus|error=(?!OK\b)|timed out|timeout|deadline)", re.I | re.S)
PEER = re.compile(r"(?:endpoint_peer_address=|\bpeer=)((?:ipv4|ipv6|unix|unix-abstract|vsock):[^\s,}\]]+)")
SSL_CODE = re.compile(r"OPENSSL_internal:([A-Z0-9_]+)(?::[ \t]*([^\n]*?))?(?:: OK)?[ \t]*$", re.M)
# the handshake manager's last word on a failure: all of its records have come
TERMINAL = re.compile(r"^handshake manager \S+: Failed with error")
# the handshaker tracer's records, and what follows their header line
TRACE_MESSAGES = ("handshake_manager ", "handshake manager ", "CallNextHandshakerLocked:")
TRACE_BANNER = "gRPC Tracers: handshaker"
CONTINUATION = re.compile(r"^(=== Source Location Trace: ===\s*|\S+\.(?:cc|h|c|cpp):\d+| shutdown=.*)$")


class Outcome(str, enum.Enum):
    REFUSED = "refused"  # the server refused the peer: logged, audited
    CLOSED = "closed"  # the peer went away during the handshake: logged at INFO only
    UNRECOGNIZED = "unrecognized"  # a failure in words this table does not know: logged raw, audited


@dataclass(frozen=True)
class Refusal:
    """One failed TLS handshake: the peer (gRPC's form, ``ipv4:10.0.0.7:51234``; None when
    gRPC did not say), the reason in words, gRPC's own words (``detail``), and how many
    events before it the relay had to drop."""

    peer: str | None
    outcome: Outcome
    reason: str
    detail: str
    dropped: int = 0

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self) | {"outcome": self.outcome.value}) + "\n").encode()

    @classmethod
    def from_json(cls, line: bytes) -> Refusal:
        """A Refusal from one event line; ValueError when it is not one."""
        d = json.loads(line)
        if not isinstance(d, dict):
            raise ValueError("an event must be a JSON object")
        peer = d.get("peer")
        return cls(peer if isinstance(peer, str) else None, Outcome(d.get("outcome")), str(d.get("reason", "")),
                   str(d.get("detail", "")), int(d.get("dropped", 0)))


# (pattern in gRPC's words, outcome, reason): the first that matches wins
KNOWN: tuple[tuple[re.Pattern[str], Outcome, str], ...] = tuple(
    (re.compile(p, re.I), o, r) for p, o, r in (
        (r"certificate has expired", Outcome.REFUSED, "certificate expired"),
        (r"certificate is not yet valid", Outcome.REFUSED, "certificate not yet valid"),
        (r"certificate revoked", Outcome.REFUSED, "certificate revoked"),
        (r"unable to get (local )?issuer certificate|self[- ]signed certificate|certificate signature failure",
         Outcome.REFUSED, "certificate signed by an unknown CA"),
        (r"PEER_DID_NOT_RETURN_A_CERTIFICATE", Outcome.REFUSED, "no client certificate"),
        (r"\bHTTPS?(_PROXY)?_REQUEST\b", Outcome.REFUSED, "not TLS: a plain HTTP request"),
        (r"WRONG_VERSION_NUMBER", Outcome.REFUSED, "not TLS (plain TCP, or plain-text gRPC)"),
        (r"UNSUPPORTED_PROTOCOL|TLSV1_ALERT_PROTOCOL_VERSION", Outcome.REFUSED, "a TLS version the server does not accept"),
        (r"NO_SHARED_CIPHER", Outcome.REFUSED, "no cipher in common with the server"),
        (r"(TLSV1|SSLV3)_ALERT_\w+", Outcome.REFUSED, "the client aborted the handshake with an alert"),
        (r"timed out|deadline", Outcome.REFUSED, "the TLS handshake timed out"),
        (r"socket closed|connection reset|end of file|\bEOF\b", Outcome.CLOSED,
         "the peer closed the connection during the TLS handshake"),
    )
)


def _head(message: str) -> str:
    """The first line of a record, without the tracer's dump of a connection's arguments
    (whose names could say anything)."""
    return message.split("\n", 1)[0].split(" shutdown=", 1)[0].split(" args=", 1)[0]


def _raw(message: str) -> str:
    """gRPC's words of a failure record, without its tracer's wrapping."""
    return _head(message).removeprefix("CallNextHandshakerLocked: error=").removesuffix(": OK").strip()[:500]


def classify(messages: list[str], peer: str | None) -> Refusal:
    """The refusal that the failure records ``messages`` of one handshake describe."""
    text = "\n".join(messages)
    m = SSL_CODE.search(text)
    if m:
        said = (m.group(2) or "").strip()
        detail = m.group(1) + (f": {said}" if said and said != "Invalid certificate verification context" else "")
    else:
        detail = _raw(messages[0])
    for pattern, outcome, reason in KNOWN:
        if pattern.search(text):
            return Refusal(peer, outcome, reason, detail)
    return Refusal(peer, Outcome.UNRECOGNIZED, _raw(messages[0]), detail)


@dataclass
class _Failure:
    """The records of one failed handshake so far."""

    core: str  # the reason as gRPC words it, which every record of this failure repeats
    last: float  # when the relay read its last record
    sources: set[str] = field(default_factory=set)
    messages: list[str] = field(default_factory=list)
    peer: str | None = None

    def takes(self, core: str, src: str, peer: str | None) -> bool:
        return (src not in self.sources and bool(core) and (core in self.core or self.core in core)
                and (peer is None or self.peer is None or peer == self.peer))


def _core(message: str) -> str:
    """What every record of one failure says of it: OpenSSL's reason when there is one."""
    m = SSL_CODE.search(message)
    return f"{m.group(1)}: {(m.group(2) or '').strip()}" if m else _raw(message)


class Parser:
    """Lines of stderr in, refusals out. A record is a header line and the continuation
    lines after it. gRPC writes a few records about one failed handshake (OpenSSL's
    reason, then, with the tracer, the handshaker's with the peer, then the handshake
    manager's last word), not always from one thread, and each repeats the reason: the
    failure records that repeat one reason, each from another source line, are one
    refusal, told once the handshake manager's last record is in, or ``BURST_GAP`` s after
    the last of them, or at the end. At most ``MAX_OPEN`` are followed at once."""

    def __init__(self) -> None:
        self._record: tuple[str, list[str]] | None = None  # (source, lines)
        self._record_at = 0.0
        self._open: list[_Failure] = []  # oldest first

    def feed(self, line: str, now: float) -> list[Refusal]:
        out: list[Refusal] = []
        m = HEADER.match(line)
        if m:
            out += self._end_record(now)
            self._record, self._record_at = (m["src"], [m["msg"]]), now
        elif self._record is not None and len(self._record[1]) <= MAX_RECORD_LINES:
            self._record[1].append(line)
        return out

    @property
    def busy(self) -> bool:
        """Whether :meth:`tick` has anything to do."""
        return self._record is not None or bool(self._open)

    def tick(self, now: float) -> list[Refusal]:
        """The refusals whose records have all come by ``now``."""
        out: list[Refusal] = []
        if self._record is not None and now - self._record_at > RECORD_WAIT:
            out += self._end_record(now)
        done = [f for f in self._open if now - f.last > BURST_GAP]
        self._open = [f for f in self._open if now - f.last <= BURST_GAP]
        return out + [classify(f.messages, f.peer) for f in done]

    def close(self) -> list[Refusal]:
        out = self._end_record(time.monotonic())
        done, self._open = self._open, []
        return out + [classify(f.messages, f.peer) for f in done]

    def _end_record(self, now: float) -> list[Refusal]:
        if self._record is None:
            return []
        (src, lines), self._record = self._record, None
        message = "\n".join(lines)
        if not FAILED.search(_head(message)):
            return []
        core, found = _core(message), PEER.search(message)
        peer = found.group(1) if found else None
        failure = next((f for f in self._open if f.takes(core, src, peer)), None)
        out = []
        if failure is None:
            failure = _Failure(core, now)
            self._open.append(failure)
            if len(self._open) > MAX_OPEN:
                oldest = self._open.pop(0)
                out.append(classify(oldest.messages, oldest.peer))
        failure.last = now
        failure.sources.add(src)
        failure.messages.append(message)
        failure.peer = failure.peer or peer
        if TERMINAL.match(message):
            self._open.remove(failure)
            out.append(classify(failure.messages, failure.peer))
        return out


class TraceFilter:
    """Whether a line is forwarded: all are, except, when medfed turned the handshaker
    tracer on (``own_trace``), that tracer's records (header and continuation lines)."""

    def __init__(self, own_trace: bool):
        self.own_trace = own_trace
        self._dropping = False

    def keep(self, line: str) -> bool:
        m = HEADER.match(line)
        if m:
            msg = m["msg"]
            self._dropping = self.own_trace and (msg.startswith(TRACE_MESSAGES) or msg.rstrip() == TRACE_BANNER)
            return not self._dropping
        if self._dropping and CONTINUATION.match(line):
            return False
        if self._dropping and line == "":  # a record ending in a line break leaves one empty line
            self._dropping = False
            return False
        self._dropping = False
        return True


class _Events:
    """Refusals out on a non-blocking pipe: dropped (and counted) rather than waited for."""

    def __init__(self, fd: int):
        self.fd, self.dropped = fd, 0
        os.set_blocking(fd, False)

    def send(self, refusals: list[Refusal]) -> None:
        for r in refusals:
            data = Refusal(r.peer, r.outcome, r.reason, r.detail, self.dropped).to_json()
            try:
                n = os.write(self.fd, data) if self.fd >= 0 else 0
            except BlockingIOError:
                n = 0
            except OSError:  # the server stopped reading for good
                self.fd, n = -1, 0
            if n == len(data):
                self.dropped = 0
            else:  # a line is at most a few hundred bytes: a pipe takes it whole or not at all
                self.dropped += 1


def _write_all(fd: int, data: bytes) -> bool:
    """False when ``fd`` cannot be written any more (the terminal went away)."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except InterruptedError:
            continue
        except OSError:
            return False
        view = view[n:]
    return True


def relay(src: int, dst: int, events_fd: int, own_trace: bool) -> None:
    """Forward ``src`` to ``dst`` until every writer of ``src`` has closed it; refusals to
    ``events_fd``. Holds at most one unfinished line (forwarded after ``PARTIAL_WAIT`` s or
    once it reaches ``READ_SIZE`` bytes)."""
    parser, keep, events = Parser(), TraceFilter(own_trace), _Events(events_fd)
    pending = bytearray()  # the unfinished last line
    pending_since = 0.0
    sent = 0  # bytes of the pending line already forwarded
    writable = True
    while True:
        wait = PARTIAL_WAIT if pending else RECORD_WAIT if parser.busy else None
        try:
            ready, _, _ = select.select([src], [], [], wait)
        except InterruptedError:
            continue
        now = time.monotonic()
        data = b""
        if ready:
            try:
                data = os.read(src, READ_SIZE)
            except OSError as e:  # a pty's reading side says EIO once its writers are gone
                if e.errno != errno.EIO:
                    raise
            if not data:
                break
            if not pending:
                pending_since = now
            pending += data
        while (i := pending.find(b"\n")) >= 0:
            line = bytes(pending[: i + 1])
            del pending[: i + 1]
            text = line[:MAX_PARSED_LINE].decode("utf-8", "replace").rstrip("\r\n")
            if (keep.keep(text) or sent) and writable:
                writable = _write_all(dst, line[sent:])
            sent = 0
            events.send(parser.feed(text, now))
            pending_since = now
        if pending and (len(pending) - sent >= READ_SIZE or now - pending_since >= PARTIAL_WAIT):
            if writable:
                writable = _write_all(dst, bytes(pending[sent:]))
            if len(pending) > MAX_PARSED_LINE:  # the parser needs no more of this line
                del pending[MAX_PARSED_LINE:]
            sent = len(pending)
        events.send(parser.tick(now))
    if pending and writable:
        _write_all(dst, bytes(pending[sent:]))
    events.send(parser.close())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="relay stdin to stdout; failed TLS handshakes to --events-fd")
    ap.add_argument("--events-fd", type=int, required=True)
    ap.add_argument("--own-trace", action="store_true", help="medfed turned on gRPC's handshaker tracer")
    args = ap.parse_args(argv)
    # Ctrl-C or a stop signal to the server's process group: the relay goes on until the
    # server has closed its stderr, so that what the server writes while stopping is shown
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    relay(sys.stdin.fileno(), sys.stdout.fileno(), args.events_fd, args.own_trace)


if __name__ == "__main__":
    main()
