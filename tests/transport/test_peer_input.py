"""What a hostile site says cannot forge the consortium's figures or its logs: evaluation
answers are held to the site's declared split sizes and the task's metrics, and text from
a site reaches the log and the audit as one printable line."""

from __future__ import annotations

import logging
import time

import grpc
import pytest

from medfed.core import codec
from medfed.core.types import EvalRequest, EvalResult, SiteFailure, Split
from medfed.server.validate import eval_problem
from medfed.tasks import metric_bounds
from medfed.config import SegmentationTaskConfig, TaskConfig
from transport.test_grpc_checks import Consortium, _refused, _reply
from transport.test_grpc_checks import _update as _update_bytes

BINARY = metric_bounds(TaskConfig(labels="binary"))
SIZES = {Split.VAL: 2, Split.TEST: 2}  # what every site of the Consortium declares


@pytest.fixture(scope="module")
def cons(tmp_path_factory):
    c = Consortium(tmp_path_factory.mktemp("peer"))
    yield c
    c.close()


def _answer(cons, conn, body: bytes):
    """Ask ``conn``'s site to evaluate, answer with ``body``: (submit call, future of the result)."""
    req = EvalRequest(conn.site, {"w": __import__("torch").zeros(1)}, (Split.VAL, Split.TEST), cons.job_id, 1)
    fut = cons.pool.submit(cons.transport.evaluate, [req], 20)
    hdr, _ = conn.poll(cons.job_id, 30)
    assert hdr["kind"] == "evaluate"
    reply = {"task_id": hdr["task_id"], "job_id": cons.job_id, "round": 1, "kind": "evaluate"}
    return (lambda: conn.submit(reply, body, 60)), fut


def _rows(val: dict, test: dict, n_val: int = 2, n_test: int = 2) -> bytes:
    return codec.encode_eval_results([
        EvalResult("x", Split.VAL, n_val, val), EvalResult("x", Split.TEST, n_test, test)])


@pytest.mark.parametrize("body, reason", [
    (_rows({"auc": 1.0}, {"auc": 1.0}, n_val=1_000_000_000), "1000000000 examples evaluated, the site declared 2"),
    (_rows({"auc": 0.5}, {"auc": 0.5}, n_test=0), "0 examples evaluated, the site declared 2"),
    (_rows({"auc": 0.5, "sensitivity_forged": 1.0}, {}), "metric 'sensitivity_forged' is not one the task reports"),
    (_rows({"auc": 1.5}, {}), "metric 'auc' is 1.5, outside [0, 1]"),
    (_rows({"accuracy": -0.1}, {}), "metric 'accuracy' is -0.1, outside [0, 1]"),
])
def test_a_forged_evaluation_is_refused_and_audited(cons, body, reason):
    conn = cons.ready("hospital_b")
    submit, fut = _answer(cons, conn, body)
    _refused(submit, grpc.StatusCode.INVALID_ARGUMENT, reason)
    (answer,) = fut.result(timeout=20)
    assert isinstance(answer, SiteFailure) and reason in answer.cause
    row = cons.store.audit_rows()[-1]
    assert (row["site"], row["kind"], row["status"]) == ("hospital_b", "evaluate", "refused")
    assert reason in row["reason"]


def test_an_honest_evaluation_is_accepted(cons):
    conn = cons.ready("hospital_b")
    submit, fut = _answer(cons, conn, _rows({"auc": 0.5, "accuracy": 1.0}, {"auc": None, "accuracy": 0.0}))
    submit()
    (res,) = fut.result(timeout=20)
    assert [(r.split, r.num_examples, r.metrics["accuracy"]) for r in res] == [(Split.VAL, 2, 1.0), (Split.TEST, 2, 0.0)]


def test_eval_problem_knows_each_task_s_metrics():
    ok = [EvalResult("a", Split.VAL, 2, {"auc": 0.2, "accuracy": None})]
    assert eval_problem(ok, BINARY, SIZES) is None
    multi = metric_bounds(TaskConfig(labels="multiclass", num_classes=3))
    assert eval_problem([EvalResult("a", Split.VAL, 2, {"auc_class_2": 0.3})], multi, SIZES) is None
    assert "auc_class_3" in eval_problem([EvalResult("a", Split.VAL, 2, {"auc_class_3": 0.3})], multi, SIZES)
    seg = metric_bounds(SegmentationTaskConfig(kind="segmentation", num_classes=3))
    assert eval_problem([EvalResult("a", Split.TEST, 2, {"dice_class_2": 0.9, "hd95": 41.5})], seg, SIZES) is None
    assert "outside [0, inf]" in eval_problem([EvalResult("a", Split.TEST, 2, {"hd95": -1.0})], seg, SIZES)
    no_hd = metric_bounds(SegmentationTaskConfig(kind="segmentation", num_classes=2, hd95=False))
    assert "'hd95' is not one" in eval_problem([EvalResult("a", Split.TEST, 2, {"hd95": 3.0})], no_hd, SIZES)


FORGED = "boom\n2026-12-04T10:00:00.000 INFO federated round 99/99 done\x1b[2J\x1b]0;owned\x07"


def test_text_from_a_site_reaches_log_and_audit_as_one_printable_line(cons, caplog):
    conn = cons.ready("hospital_a")
    fut, hdr, _ = cons.open_fit(conn)
    with caplog.at_level(logging.INFO, logger="medfed"):
        conn.submit({**_reply(hdr, b""), "kind": "error", "cause": FORGED}, b"", 60)
        (answer,) = fut.result(timeout=20)
        conn.refuse_job(cons.job_id, FORGED)  # the other place a site's own words reach the log
    assert isinstance(answer, SiteFailure) and "\n" not in answer.cause and "\x1b" not in answer.cause
    messages = [r.getMessage() for r in caplog.records]
    assert any("round 99/99 done" in m for m in messages)  # the text is there, escaped
    for m in messages:
        assert "\n" not in m and "\x1b" not in m and "\x07" not in m
    row = cons.store.audit_rows()[-1]
    assert row["site"] == "hospital_a" and "\\n2026-12-04" in row["reason"] and "\x1b" not in row["reason"]


def test_a_message_over_the_size_limit_is_named_as_such(cons):
    import torch

    from medfed.transport.grpc import wire
    from transport.test_grpc_checks import _raw_submit

    conn = cons.ready("hospital_a")
    before = len(cons.store.audit_rows())
    fut, hdr, _ = cons.open_fit(conn, timeout=8, params={"w": torch.zeros(4_000_000)})
    big = b"\0" * (wire.MAX_MESSAGE + 1)
    with pytest.raises(grpc.RpcError):
        _raw_submit(conn, _reply(hdr, big, size=len(big)), [big])
    # gRPC ends the whole call on the oversized message, often before the header is read:
    # then the task is not known (it times out) and the call has a row of its own; when the
    # header was read first, the task's row says it
    # the site has its answer (from gRPC) before the server's handler writes the row; gRPC
    # also marks the call ended only a moment after the handler sees its stream end, so the
    # row names the limit, or says the stream broke or came short
    (answer,) = fut.result(timeout=20)
    assert isinstance(answer, SiteFailure)
    deadline = time.monotonic() + 10
    while not (rows := [r for r in cons.store.audit_rows()[before:] if r["status"] == "refused"]):
        assert time.monotonic() < deadline, "no audit row for the refused call"
        time.sleep(0.05)
    assert rows[-1]["site"] == "hospital_a"
    assert any(why in rows[-1]["reason"] for why in (f"over the {wire.MAX_MESSAGE}-byte limit", "stream broke",
                                                     "truncated", "empty submission header"))
    fut, hdr, _ = cons.open_fit(conn)  # the server still serves
    body = _update_bytes()
    conn.submit(_reply(hdr, body), body, 60)
    assert not isinstance(fut.result(timeout=20)[0], SiteFailure)


def test_a_summary_that_names_files_is_refused(cons):
    from transport.test_grpc_checks import _summary

    conn = cons.connect("hospital_b")
    conn.join()
    leaky = {**_summary("hospital_b"), "skipped": 1, "skipped_files": [{"file": "patient_0042.dcm", "reason": "bad"}]}
    _refused(lambda: conn.ready(cons.job_id, leaky), grpc.StatusCode.INVALID_ARGUMENT, "file names stay at the site")
