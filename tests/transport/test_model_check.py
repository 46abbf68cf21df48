"""The hub compares the model each site built with the server's: a real mutual-TLS server on
127.0.0.1. A description that breaks a bound is refused at Ready; once the server knows its
own model, a site that built another (or described none) is left out, before or after,
with the first difference named; a site that declines the job is not waited for."""

from __future__ import annotations

import time

import grpc
import pytest
import torch

from medfed.core.modelspec import ModelSpec
from transport.test_grpc_checks import Consortium, _summary

OURS = ModelSpec.of({"w": torch.zeros(4, 3), "b": torch.zeros(3)})
OTHER = ModelSpec.of({"w": torch.zeros(4, 5), "b": torch.zeros(5)})
HINT = "install the same code at every site"


def _ready(cons: Consortium, site: str, model: dict | None):
    conn = cons.connect(site)
    conn.join()
    summary = _summary(site) | ({"model": model} if model is not None else {})
    return conn, lambda: conn.ready(cons.job_id, summary)


def _refused(call, code: grpc.StatusCode, reason: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    assert reason in info.value.details()


@pytest.fixture
def cons(tmp_path):
    c = Consortium(tmp_path)
    yield c
    c.close()


def test_a_description_that_breaks_a_bound_is_refused_at_ready(cons):
    for model, reason in [
        ({"fingerprint": "not-hex", "entries": None}, "bad model description: model.fingerprint: must be 64"),
        ({**OURS.to_wire(), "entries": [["w", [4, 3], "float32"]] * 3}, "entry 'w' is listed twice"),
        ("a string", "bad model description: model: must be an object, got str"),
    ]:
        _, ready = _ready(cons, "hospital_a", model)
        _refused(ready, grpc.StatusCode.INVALID_ARGUMENT, reason)
    assert "hospital_a" not in cons.hub.summaries()
    assert any("bad model description" in (r["reason"] or "") for r in cons.store.audit_rows())


def test_sites_with_another_model_or_none_are_left_out_before_and_after_the_check(cons):
    _, same = _ready(cons, "hospital_a", OURS.to_wire())
    same()
    _, other = _ready(cons, "hospital_b", OTHER.to_wire())
    other()  # before the server knows its model, any description is taken
    odd = cons.hub.expect_model(OURS, HINT)
    assert list(odd) == ["hospital_b"]
    assert odd["hospital_b"].startswith("it built a different model: entry 'w' has shape (4, 5) there and (4, 3) here")
    assert odd["hospital_b"].endswith(HINT)
    assert set(cons.hub.summaries()) == {"hospital_a"}
    conn_b = cons.conns[-1]
    _refused(conn_b.join, grpc.StatusCode.PERMISSION_DENIED, "left out of the run: it built a different model")
    # a site that becomes ready after the check is compared at once
    _, silent = _ready(cons, "hospital_c", None)
    _refused(silent, grpc.StatusCode.PERMISSION_DENIED,
             "this site is left out of the run: it sent no description of the model it built")
    assert set(cons.hub.summaries()) == {"hospital_a"}
    rows = [r for r in cons.store.audit_rows() if r["site"] in ("hospital_b", "hospital_c")]
    assert any(r["site"] == "hospital_b" and "left out of the run: it built a different model" in r["reason"]
               for r in rows)
    assert any(r["site"] == "hospital_c" and "sent no description" in r["reason"] for r in rows)


def test_a_site_that_declines_the_job_is_not_waited_for(cons):
    _, ready_a = _ready(cons, "hospital_a", OURS.to_wire())
    ready_a()
    conn = cons.connect("hospital_b")
    conn.join()
    conn.refuse_job(cons.job_id, "model.import: no module named 'mfpkg.nets' here (missing: 'mfpkg')")
    t0 = time.monotonic()
    assert cons.hub.wait_ready(["hospital_a", "hospital_b"], 30.0) == ["hospital_a"]
    assert time.monotonic() - t0 < 5.0
    assert cons.hub.declined() == {"hospital_b": "model.import: no module named 'mfpkg.nets' here (missing: 'mfpkg')"}
    row = cons.store.audit_rows()[-1]
    assert (row["site"], row["status"]) == ("hospital_b", "failed")
    assert "cannot take part in the job: model.import: no module named 'mfpkg.nets'" in row["reason"]
    conn.join()  # it may come back (its operator installed the package): waited for again
    assert cons.hub.declined() == {}
