"""One authenticated site cannot stop the federation by holding the server's calls: streams
that open and send nothing, answers trickled a byte at a time and downloads it does not
read are cut off at bounded times, named in the log and the audit, while an honest site's
rounds go on. A real mutual-TLS server on 127.0.0.1; the guard's bounds are shortened."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from medfed.core.types import FitRequest, SiteFailure, Update
from medfed.transport.grpc import guard, wire
from transport.test_grpc_checks import PARAMS, Consortium, _plan, _reply, _update

HOSTILE, HONEST = "hospital_b", "hospital_a"


@pytest.fixture()
def cons(tmp_path, monkeypatch):
    monkeypatch.setattr(guard, "FIRST_MESSAGE", 0.6)
    monkeypatch.setattr(guard, "NEXT_MESSAGE", 0.6)
    monkeypatch.setattr(guard, "TRANSFER_GRACE", 1.5)
    monkeypatch.setattr(guard, "TICK", 0.05)
    c = Consortium(tmp_path)
    c.hostile = ThreadPoolExecutor(16)
    c.release = threading.Event()
    yield c
    c.release.set()
    c.hostile.shutdown(wait=False, cancel_futures=True)
    c.close()


def _silent(cons):
    """Messages that never come (until the test ends)."""
    cons.release.wait(30)
    yield from ()


def _open_submit(cons, conn, messages):
    call = conn.channel.stream_unary(wire.SUBMIT)
    return cons.hostile.submit(lambda: call(messages, timeout=30))


def _code(fut) -> grpc.StatusCode | None:
    try:
        fut.result(timeout=20)
    except grpc.RpcError as e:
        return e.code()
    return None


def _honest_round(cons, rnd: int) -> None:
    conn = cons.ready(HONEST)
    fut, hdr, _ = cons.open_fit(conn, rnd=rnd)
    body = _update(HONEST, rnd=rnd)
    conn.submit(_reply(hdr, body, round=rnd), body, 60)
    (answer,) = fut.result(timeout=20)
    assert isinstance(answer, Update), answer


def test_empty_streams_are_refused_or_cut_and_honest_rounds_go_on(cons):
    bad = cons.ready(HOSTILE)
    futs = [_open_submit(cons, bad, _silent(cons)) for _ in range(8)]
    futs += [cons.hostile.submit(lambda: list(bad.channel.stream_stream(wire.POLL)(_silent(cons), timeout=30)))
             for _ in range(2)]
    for rnd in (1, 2, 3):  # the honest site is served all along
        _honest_round(cons, rnd)
    codes = [_code(f) for f in futs]
    # at most MAX_CALLS of them were let in, and those were cut when their first message did not come
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= len(futs) - guard.MAX_CALLS
    assert set(codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED,
                          grpc.StatusCode.DEADLINE_EXCEEDED}
    cut = [r for r in cons.store.audit_rows() if r["kind"] == "call"]
    assert cut and all(r["site"] == HOSTILE and r["status"] == "refused" for r in cut)
    assert any("within 0.6 s of opening the call" in r["reason"] for r in cut)


def test_a_trickled_update_is_cut_and_blamed(cons):
    bad = cons.ready(HOSTILE)
    fut, hdr, _ = cons.open_fit(bad)
    body = _update(HOSTILE)

    def trickle():
        yield wire.encode_header({**_reply(hdr, body), "site": HOSTILE, "size": len(body)})
        for i in range(len(body)):  # one byte every 0.2 s: each message in time, the whole far too slow
            if cons.release.wait(0.2):
                return
            yield body[i:i + 1]

    t0 = time.monotonic()
    code = _code(_open_submit(cons, bad, trickle()))
    assert code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
    (answer,) = fut.result(timeout=20)
    assert isinstance(answer, SiteFailure) and "upload of" in answer.cause and "not done within" in answer.cause
    assert time.monotonic() - t0 < 15  # cut at its bound (a few s), not at the 20 s round timeout
    row = [r for r in cons.store.audit_rows() if r["site"] == HOSTILE][-1]
    assert row["kind"] == "fit" and row["status"] == "refused" and "cut off" in row["reason"]


def test_a_site_gets_one_upload_at_a_time(cons):
    bad = cons.ready(HOSTILE)
    fut, hdr, _ = cons.open_fit(bad)
    body = _update(HOSTILE)
    first = _open_submit(cons, bad, _stall_after_header(cons, hdr, body))
    time.sleep(0.3)
    others = [_open_submit(cons, bad, _stall_after_header(cons, hdr, body)) for _ in range(3)]
    assert [_code(f) for f in others] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3
    assert _code(first) in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
    assert isinstance(fut.result(timeout=20)[0], SiteFailure)
    _honest_round(cons, 2)  # the upload slots are free again


def _stall_after_header(cons, hdr, body):
    yield wire.encode_header({**_reply(hdr, body), "site": HOSTILE, "size": len(body)})
    cons.release.wait(30)


def test_a_download_the_site_does_not_read_is_cut_and_its_task_fails(cons, monkeypatch):
    big = {"w": PARAMS["w"].new_zeros(4 << 20)}  # 16 MiB: more than gRPC's windows hold
    bad = cons.ready(HOSTILE)
    fut = cons.pool.submit(cons.transport.fit, [FitRequest(HOSTILE, big, _plan(cons.job_id, 1))], 20.0)
    stream = bad.channel.unary_stream(wire.POLL)(
        wire.encode_header({"site": HOSTILE, "job_id": cons.job_id, "have": None}), timeout=30)
    assert wire.decode_header(next(stream), "poll reply")["kind"] == "fit"  # then it reads no more
    t0 = time.monotonic()
    (answer,) = fut.result(timeout=20)
    assert isinstance(answer, SiteFailure) and "cut off" in answer.cause and "download" in answer.cause
    assert time.monotonic() - t0 < 15
    stream.cancel()
    _honest_round(cons, 2)


def test_a_flood_of_refused_calls_is_logged_and_audited_once_per_window(cons, caplog):
    import logging

    bad = cons.ready(HOSTILE)
    fut, hdr, _ = cons.open_fit(bad)
    body = _update(HOSTILE)
    holder = _open_submit(cons, bad, _stall_after_header(cons, hdr, body))
    time.sleep(0.3)
    with caplog.at_level(logging.WARNING, logger="medfed"):
        flood = [_open_submit(cons, bad, _stall_after_header(cons, hdr, body)) for _ in range(40)]
        codes = [_code(f) for f in flood]
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 40
    lines = [r.getMessage() for r in caplog.records if "upload in progress already" in r.getMessage()]
    assert len(lines) == 1  # the other 39 are held back and counted in the next line logged
    rows = [r for r in cons.store.audit_rows() if "upload in progress already" in (r["reason"] or "")]
    assert len(rows) == 1 and rows[0]["site"] == HOSTILE
    cons.release.set()
    _code(holder)
    fut.result(timeout=20)


def test_a_cut_after_the_task_expired_is_audited_with_its_reason(cons, monkeypatch):
    monkeypatch.setattr(guard, "NEXT_MESSAGE", 30.0)  # the round's timeout comes first
    monkeypatch.setattr(guard, "TRANSFER_GRACE", 30.0)
    bad = cons.ready(HOSTILE)
    fut = cons.pool.submit(cons.transport.fit, [FitRequest(HOSTILE, PARAMS, _plan(cons.job_id, 1))], 1.0)
    hdr, _ = bad.poll(cons.job_id, 30)
    body = _update(HOSTILE)
    stalled = _open_submit(cons, bad, _stall_after_header(cons, hdr, body))
    (answer,) = fut.result(timeout=20)  # the round timed out (1 s) before the upload came
    assert isinstance(answer, SiteFailure)
    assert _code(stalled) in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
    # the site sees the cancellation before the server's handler writes its row
    rows = _rows_when(cons, lambda rows: len(rows) >= 2 and rows[-1]["kind"] == "call")
    assert rows[-2]["status"] == "timeout"  # the task's row
    assert "cut off" in rows[-1]["reason"] and "task closed" in rows[-1]["reason"]


def _rows_when(cons, ready, site=HOSTILE, within=10.0):
    """The audit rows of ``site`` once ``ready(rows)`` holds (the server writes a refused
    call's row after the caller has its answer)."""
    deadline = time.monotonic() + within
    while True:
        rows = [r for r in cons.store.audit_rows() if r["site"] == site]
        if ready(rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def test_an_answer_sent_again_to_its_task_is_audited(cons):
    conn = cons.ready(HONEST)
    fut, hdr, _ = cons.open_fit(conn)
    body = _update(HONEST)
    conn.submit(_reply(hdr, body), body, 60)
    fut.result(timeout=20)
    with pytest.raises(grpc.RpcError) as info:
        conn.submit(_reply(hdr, body), body, 60)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    row = cons.store.audit_rows()[-1]
    assert (row["arm"], row["round"], row["kind"], row["status"]) == ("federated", 1, "fit", "refused")
    assert "already answered" in row["reason"]
