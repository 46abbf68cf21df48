"""Refused TLS handshakes logged by medfed (transport/grpc/handshakes.py, stderr_relay.py):
gRPC's log lines parsed into refusals with the peer and the reason, the server's stderr
forwarded unchanged, repeats held back, and a real server in its own process that logs and
audits a client of another CA, one without a certificate and one speaking plain HTTP.

handshake_log.txt: what grpcio 1.85's server wrote with GRPC_TRACE=handshaker for a
connection that succeeded (peer port 38556), a certificate of another CA (38564), no
certificate (54592) and a peer that closed the connection (54618); the connections'
arguments shortened."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import socket
import struct
import subprocess
import sys
import termios
from pathlib import Path

import grpc
import pytest

from deploy_kits import make_kits, wait_for
from medfed.server.store import RunStore
from medfed.transport.grpc import stderr_relay
from medfed.transport.grpc.handshakes import (
    HandshakeWatch,
    RepeatLimiter,
    peer_host,
    stop_watching,
    watch_refused_handshakes,
)
from medfed.transport.grpc.stderr_relay import Outcome, Parser, Refusal, TraceFilter

HERE = Path(__file__).parent
LOG = (HERE / "handshake_log.txt").read_text().splitlines()


def _parse(lines: list[str]) -> list[Refusal]:
    p = Parser()
    out = [r for line in lines for r in p.feed(line, 0.0)]
    return out + p.close()


def test_grpc_log_lines_give_each_failed_handshake_once_with_its_peer_and_reason():
    got = [(r.peer, r.outcome, r.reason, r.detail) for r in _parse(LOG)]
    assert got == [
        ("ipv4:127.0.0.1:38564", Outcome.REFUSED, "certificate signed by an unknown CA",
         "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate"),
        ("ipv4:127.0.0.1:54592", Outcome.REFUSED, "no client certificate", "PEER_DID_NOT_RETURN_A_CERTIFICATE"),
        ("ipv4:127.0.0.1:54618", Outcome.CLOSED, "the peer closed the connection during the TLS handshake",
         "UNAVAILABLE: Handshake read failed (Socket closed)"),
    ]
    # without the tracer (gRPC's default lines only): the reason, no peer
    ssl_only = [line for line in LOG if "ssl_transport_security" in line]
    assert [(r.peer, r.reason) for r in _parse(ssl_only)] == [
        (None, "certificate signed by an unknown CA"), (None, "no client certificate")]


def test_a_failure_in_words_not_known_is_told_raw():
    lines = ["I1205 03:52:21.703962   12161 tls_x.cc:9] Handshake refused: the frobnicator said no",
             "I1205 03:52:21.703999   12161 other.cc:1] something else entirely"]
    (r,) = _parse(lines)
    assert (r.outcome, r.reason, r.peer) == (Outcome.UNRECOGNIZED, "Handshake refused: the frobnicator said no", None)
    assert _parse(["I1205 03:52:21.703962   12161 x.cc:9] handshake complete with peer=ipv4:1.2.3.4:5"]) == []


def test_the_relay_forwards_everything_but_its_own_trace_unchanged_and_in_order():
    ordinary = [b"Traceback (most recent call last):\n", b"  File \"x.py\", line 1\n", b"\n",
                "caf\u00e9 \xff\n".encode("utf-8", "surrogateescape"), b"\x1b[31mred\x1b[0m\r\n"]
    log = "\n".join(LOG).encode() + b"\n"
    stream = ordinary[0] + log + b"".join(ordinary[1:]) + b"an unfinished line"
    for own_trace in (True, False):
        events_r, events_w = os.pipe()
        p = subprocess.Popen([sys.executable, "-I", "-S", stderr_relay.__file__, "--events-fd", str(events_w),
                              *(["--own-trace"] if own_trace else [])], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, pass_fds=(events_w,))
        os.close(events_w)
        out, _ = p.communicate(stream, timeout=20)
        with os.fdopen(events_r, "rb") as f:
            events = [Refusal.from_json(line) for line in f.read().splitlines()]
        assert p.returncode == 0
        assert [e.peer for e in events] == ["ipv4:127.0.0.1:38564", "ipv4:127.0.0.1:54592", "ipv4:127.0.0.1:54618"]
        if not own_trace:  # the operator's own GRPC_TRACE: all of it is theirs
            assert out == stream
            continue
        kept = [line + "\n" for line in LOG if "ssl_transport_security" in line]  # gRPC's own line stays
        assert out == ordinary[0] + "".join(kept).encode() + b"".join(ordinary[1:]) + b"an unfinished line"


def test_the_trace_filter_never_drops_a_line_that_is_not_the_tracer_s():
    f = TraceFilter(own_trace=True)
    record = "I1205 03:52:25.847264   12161 handshaker.cc:155] CallNextHandshakerLocked: error=UNAVAILABLE: x"
    assert not f.keep(record) and not f.keep("=== Source Location Trace: === ")
    assert f.keep("print('hello') from the server")  # not a continuation: the record has ended
    assert not f.keep(record) and f.keep("src/core/util/status_helper.cc is not a location line")


class _Audit:
    def __init__(self) -> None:
        self.rows: list[tuple] = []

    def refused(self, arm: str, rnd: int, site: str, kind: str, reason: str) -> None:
        self.rows.append((arm, rnd, site, kind, reason))


def test_repeated_refusals_from_one_host_are_told_once_a_minute_with_a_count(caplog):
    now = [1000.0]
    watch = HandshakeWatch(own_trace=False, clock=lambda: now[0])
    audit = _Audit()
    watch.attach(audit)
    bad = Refusal("ipv4:10.0.0.7:40001", Outcome.REFUSED, "no client certificate", "PEER_DID_NOT_RETURN_A_CERTIFICATE")
    with caplog.at_level("INFO", logger="medfed"):
        for port in range(40001, 40051):  # a scanner: a new port each time
            watch.handle(Refusal(f"ipv4:10.0.0.7:{port}", bad.outcome, bad.reason, bad.detail))
            now[0] += 0.5
        watch.handle(Refusal("ipv4:10.0.0.8:1", Outcome.REFUSED, "certificate expired", "x"))
        watch.handle(Refusal("ipv4:10.0.0.7:2", Outcome.CLOSED, "the peer closed the connection", "y"))
        watch.flush(now[0])  # 25 s after the first: nothing to tell yet
        lines = [r.getMessage() for r in caplog.records]
        assert lines == [
            "handshake refused from ipv4:10.0.0.7:40001: no client certificate (PEER_DID_NOT_RETURN_A_CERTIFICATE)",
            "handshake refused from ipv4:10.0.0.8:1: certificate expired (x)",
            "TLS handshake from ipv4:10.0.0.7:2 not completed: the peer closed the connection (y) (a site that does "
            "not trust the server's certificate does this, and so does a port probe)",
        ]
        now[0] += 40.0
        watch.flush(now[0])
        assert caplog.records[-1].getMessage() == (
            "handshake refused from ipv4:10.0.0.7 49 more time(s) in the 60 s after the first: no client certificate "
            "(PEER_DID_NOT_RETURN_A_CERTIFICATE)")
        assert caplog.records[-1].levelname == "WARNING" and len(caplog.records) == 4
        watch.handle(bad)  # a new window: told at once again
        assert len(caplog.records) == 5
    # the host as the site: one row per host in the dashboard; the port in the reason
    assert [r[2] for r in audit.rows] == ["ipv4:10.0.0.7", "ipv4:10.0.0.8", "ipv4:10.0.0.7", "ipv4:10.0.0.7"]
    assert audit.rows[0][4] == "TLS handshake from ipv4:10.0.0.7:40001: no client certificate " \
                               "(PEER_DID_NOT_RETURN_A_CERTIFICATE)"
    assert audit.rows[2][:2] == ("connection", 0) and audit.rows[2][3] == "call"
    assert "49 more time(s)" in audit.rows[2][4] and "no client certificate" in audit.rows[2][4]


def test_the_limiter_follows_a_bounded_number_of_hosts():
    lim = RepeatLimiter(window=60.0, max_keys=3)
    told = [lim.admit(Refusal(f"ipv4:10.0.{i}.1:5", Outcome.REFUSED, "r", "d"), 0.0) for i in range(10)]
    assert told == [True] * 4 + [False] * 6  # three hosts, then one shared count
    assert [(host, held) for host, _, held in lim.expired(60.0)] == [("many hosts", 6)]
    assert peer_host("ipv6:[::1]:443") == "ipv6:[::1]" and peer_host(None) == "an unknown peer"


def test_with_grpc_told_to_hide_its_messages_nothing_is_watched(monkeypatch, caplog):
    monkeypatch.setenv("GRPC_VERBOSITY", "error")
    try:
        with caplog.at_level("WARNING", logger="medfed"):
            assert watch_refused_handshakes() is None
    finally:
        stop_watching()  # were it started, fd 2 goes back
    assert "GRPC_VERBOSITY=ERROR hides gRPC's messages about TLS handshakes" in caplog.text


def test_a_terminal_stays_a_terminal_of_its_size_and_its_bytes_pass_unchanged():
    main, term = pty.openpty()
    fcntl.ioctl(term, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 132, 0, 0))
    code = ("import os, sys\n"
            "from medfed.transport.grpc.handshakes import watch_refused_handshakes\n"
            "assert watch_refused_handshakes() is not None\n"
            "print(os.isatty(2), tuple(os.get_terminal_size(2)))\n"
            "sys.stderr.write('\\x1b[31mred\\x1b[0m\\n'); sys.stderr.flush()\n"
            "os.write(2, b'unfinished')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("GRPC_TRACE", "GRPC_VERBOSITY")}
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=term, env=env)
    os.close(term)
    out, _ = p.communicate(timeout=30)
    seen = b""
    while True:
        try:
            data = os.read(main, 4096)
        except OSError:  # EIO: every writer has closed the terminal
            break
        if not data:
            break
        seen += data
    os.close(main)
    assert p.returncode == 0 and out == b"True (132, 50)\n", seen
    assert seen == b"\x1b[31mred\x1b[0m\r\nunfinished"  # \r: the outer terminal's own doing


# ---------------------------------------------------------------- a real server, its own process

def _call(port: int, ca: bytes, cert: bytes | None, key: bytes | None) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    with grpc.secure_channel(f"127.0.0.1:{port}", creds) as ch:
        with pytest.raises(grpc.RpcError) as e:
            ch.unary_unary("/medfed.Federation/Join")(b"{}", timeout=5)
        assert e.value.code() is grpc.StatusCode.UNAVAILABLE


def test_a_server_logs_and_audits_refused_handshakes_with_the_peer_and_the_reason(tmp_path):
    (tmp_path / "c1").mkdir()
    (tmp_path / "c2").mkdir()
    kits, port = make_kits(tmp_path / "c1")
    other, _ = make_kits(tmp_path / "c2")
    folder = tmp_path / "server"
    folder.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("GRPC_TRACE", "GRPC_VERBOSITY")}
    with open(tmp_path / "stderr", "wb") as err:
        proc = subprocess.Popen([sys.executable, str(HERE / "handshake_server.py"), str(kits), str(port), str(folder)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env)
    try:
        assert proc.stdout.readline() == b"READY\n", (tmp_path / "stderr").read_text()
        site = kits / "hospital_a"
        ca = (site / "ca.crt").read_bytes()
        _call(port, ca, (other / "hospital_a" / "participant.crt").read_bytes(),
              (other / "hospital_a" / "participant.key").read_bytes())
        _call(port, ca, None, None)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            http_port = s.getsockname()[1]
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(100) == b""  # closed without an answer

        run_log = folder / "run.log"
        wanted = [r"handshake refused from ipv4:127\.0\.0\.1:\d+: certificate signed by an unknown CA \(CERTIFICATE_V",
                  r"handshake refused from ipv4:127\.0\.0\.1:\d+: no client certificate",
                  rf"handshake refused from ipv4:127\.0\.0\.1:{http_port}: not TLS: a plain HTTP request"]
        wait_for(lambda: all(re.search(w, run_log.read_text()) for w in wanted), 20, "the refusals in run.log")
        proc.stdin.close()
        assert proc.wait(30) == 0, (tmp_path / "stderr").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    with RunStore(folder / "state.sqlite") as store:
        rows = [r for r in store.audit_rows() if r["arm"] == "connection"]
    assert {(r["site"], r["status"]) for r in rows} == {("ipv4:127.0.0.1", "refused")}, rows
    reasons = " | ".join(r["reason"] for r in rows)
    for port, what in ((r"\d+", "certificate signed by an unknown CA"), (r"\d+", "no client certificate"),
                       (http_port, "not TLS: a plain HTTP request")):
        assert re.search(rf"TLS handshake from ipv4:127\.0\.0\.1:{port}: {what}", reasons), reasons

    stderr = (tmp_path / "stderr").read_text()
    ordinary = ["ordinary output before", "written to fd 2 directly", "ordinary output after"]
    assert [stderr.index(line) for line in ordinary] == sorted(stderr.index(line) for line in ordinary)
    assert stderr.endswith("an unfinished line")
    assert "Handshake failed with error" in stderr  # gRPC's own line, forwarded
    assert "CallNextHandshakerLocked" not in stderr and "handshake_manager" not in stderr  # medfed's tracer: not
