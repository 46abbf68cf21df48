"""Everything a site sends is checked: a real mutual-TLS server on 127.0.0.1, clients that
break one rule each. Each refusal names its reason, is logged, and leaves the server
serving and its state intact."""

from __future__ import annotations

import datetime as dt
import itertools
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from deploy_kits import make_kits
from medfed.config import builtin_job_path, load_job
from medfed.core import codec
from medfed.core.types import Arm, EvalRequest, FitRequest, RoundPlan, SiteFailure, Split, TrainSettings, Update
from medfed.server.store import RunStore
from medfed.transport.grpc import wire
from medfed.transport.grpc.client import Connection
from medfed.transport.grpc.hub import Hub
from medfed.transport.grpc.transport import GrpcTransport, start_server
from medfed.transport.pki import create_ca, issue_certificate, load_kit

PARAMS = {"w": torch.zeros(4, 3), "b": torch.zeros(3)}
N_TRAIN = 10


def _summary(site: str) -> dict:
    return {"name": site, "train": N_TRAIN, "val": 2, "test": 2, "class_counts": {"train": [5, 5]}, "shape": [1, 8, 8]}


def _plan(job_id: str, rnd: int) -> RoundPlan:
    return RoundPlan(job_id, rnd, Arm.FEDERATED, TrainSettings(1, 4, 0.1, "sgd", 0.0, 0.0, rnd))


class Consortium:
    def __init__(self, tmp: Path):
        self.kits, self.port = make_kits(tmp)
        job = load_job(builtin_job_path("quickstart")).model_copy(update={"output": tmp / "run"})
        self.job_id = "job-under-test"
        self.store = RunStore(tmp / "state.sqlite")
        self.hub = Hub(job, self.job_id, self.store)
        server_kit = load_kit(self.kits / "server", role="server")
        creds = wire.server_credentials(server_kit.ca_pem, server_kit.cert_pem, server_kit.key_pem)
        self.server = start_server(self.hub, f"127.0.0.1:{self.port}", creds, 3)
        self.transport = GrpcTransport(self.hub)
        self.pool = ThreadPoolExecutor(2)
        self.conns: list[Connection] = []

    def connect(self, site: str, cert_pem: bytes | None = None, key_pem: bytes | None = None,
                ca_pem: bytes | None = None) -> Connection:
        kit = load_kit(self.kits / site, role="site") if (self.kits / site).exists() else load_kit(
            self.kits / "hospital_a", role="site")
        conn = Connection(f"127.0.0.1:{self.port}", ca_pem or kit.ca_pem, cert_pem or kit.cert_pem,
                          key_pem or kit.key_pem, site)
        self.conns.append(conn)
        return conn

    def ready(self, site: str) -> Connection:
        conn = self.connect(site)
        conn.join()
        conn.ready(self.job_id, _summary(site))
        return conn

    def open_fit(self, conn: Connection, rnd: int = 1, timeout: float = 20.0, params=None):
        """A fit task for ``conn``'s site, taken by it: (future of the transport's answers, header)."""
        req = FitRequest(conn.site, params or PARAMS, _plan(self.job_id, rnd))
        fut = self.pool.submit(self.transport.fit, [req], timeout)
        hdr, blob = conn.poll(self.job_id, 30.0)
        assert hdr["kind"] == "fit", fut.result()
        return fut, hdr, blob

    def close(self):
        for c in self.conns:
            c.close()
        self.server.stop(0).wait(5)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.store.close()


@pytest.fixture(scope="module")
def cons(tmp_path_factory):
    c = Consortium(tmp_path_factory.mktemp("grpc"))
    yield c
    c.close()


_fresh = itertools.count(1)


def _update(site="hospital_a", rnd=1, n=N_TRAIN, **params) -> bytes:
    """An update's bytes; without ``params``, new values each call (the same bytes twice are a replay)."""
    if not params:
        params = {k: v + next(_fresh) for k, v in PARAMS.items()}
    return bytes(codec.encode_update(Update(site, rnd, params, n, 3)))


def _reply(hdr: dict, payload: bytes, **over) -> dict:
    return {"task_id": hdr["task_id"], "job_id": over.pop("job_id", "job-under-test"), "round": hdr["round"],
            "kind": "fit", **over}


def _refused(call, code: grpc.StatusCode, reason: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    assert reason in info.value.details()


def test_a_good_update_is_accepted_and_audited(cons):
    conn = cons.ready("hospital_a")
    fut, hdr, blob = cons.open_fit(conn)
    params, extras = codec.decode_model(blob)
    assert torch.equal(params["w"], PARAMS["w"]) and extras == {}
    assert codec.plan_from_dict(hdr["plan"], {}).round == 1
    payload = _update(w=PARAMS["w"] + 0.5, b=PARAMS["b"])
    conn.submit(_reply(hdr, payload), payload, 60)
    (answer,) = fut.result(timeout=20)
    assert isinstance(answer, Update) and torch.equal(answer.params["w"], PARAMS["w"] + 0.5)
    row = cons.store.audit_rows()[-1]
    assert (row["site"], row["status"], row["bytes_received"]) == ("hospital_a", "accepted", len(payload))
    assert row["sha256"] == wire.sha256(payload) and row["bytes_sent"] == len(blob)


@pytest.mark.parametrize(
    "params, reason",
    [
        ({"w": torch.full((4, 3), float("nan")), "b": torch.zeros(3)}, "holds NaN or Inf"),
        ({"w": torch.zeros(4, 3), "b": torch.tensor([0.0, float("inf"), 0.0])}, "holds NaN or Inf"),
        ({"w": torch.zeros(4, 3), "bias": torch.zeros(3)}, "tensor names differ"),
        ({"w": torch.zeros(3, 4), "b": torch.zeros(3)}, "expected torch.float32 (4, 3)"),
        ({"w": torch.zeros(4, 3, dtype=torch.float64), "b": torch.zeros(3)}, "is torch.float64"),
    ],
    ids=["nan", "inf", "names", "shape", "dtype"],
)
def test_a_bad_update_is_refused_and_leaves_the_round(cons, caplog, params, reason):
    conn = cons.ready("hospital_a")
    fut, hdr, _ = cons.open_fit(conn)
    payload = _update(**params)
    with caplog.at_level(logging.WARNING, logger="medfed"):
        _refused(lambda: conn.submit(_reply(hdr, payload), payload, 60), grpc.StatusCode.INVALID_ARGUMENT, reason)
    (answer,) = fut.result(timeout=20)
    assert isinstance(answer, SiteFailure) and reason in answer.cause
    assert any(reason in r.getMessage() and "hospital_a" in r.getMessage() for r in caplog.records)
    assert cons.store.audit_rows()[-1]["status"] == "refused"


def _raw_submit(conn: Connection, header: dict, pieces: list[bytes]):
    def messages():
        yield wire.encode_header({**header, "site": conn.site})
        yield from pieces

    return conn._submit(messages(), timeout=30)


def test_truncated_oversized_and_corrupt_payloads(cons):
    conn = cons.ready("hospital_a")
    payload = _update()
    digest = wire.sha256(payload)
    cases = [
        (dict(size=len(payload) + 10, sha256=digest), [payload], grpc.StatusCode.INVALID_ARGUMENT, "truncated"),
        (dict(size=len(payload), sha256=digest), [payload, b"x"], grpc.StatusCode.INVALID_ARGUMENT, "more than"),
        (dict(size=10**12, sha256=digest), [payload], grpc.StatusCode.INVALID_ARGUMENT, "declared size"),
        (dict(size=len(payload), sha256="0" * 64), [payload], grpc.StatusCode.INVALID_ARGUMENT, "SHA-256"),
        (dict(size=7, sha256=wire.sha256(b"garbage")), [b"garbage"], grpc.StatusCode.INVALID_ARGUMENT, "malformed"),
    ]
    for over, pieces, code, reason in cases:
        fut, hdr, _ = cons.open_fit(conn)
        _refused(lambda: _raw_submit(conn, _reply(hdr, payload, **over), pieces), code, reason)
        (answer,) = fut.result(timeout=20)
        assert isinstance(answer, SiteFailure) and reason in answer.cause


def test_a_message_over_the_grpc_limit_is_refused(cons):
    conn = cons.ready("hospital_a")
    # a model large enough that one oversized message stays within the answer's size limit
    fut, hdr, _ = cons.open_fit(conn, timeout=8, params={"w": torch.zeros(4_000_000)})
    big = b"\0" * (wire.MAX_MESSAGE + 1)
    with pytest.raises(grpc.RpcError) as info:
        _raw_submit(conn, _reply(hdr, big, size=len(big), sha256=wire.sha256(big)), [big])
    assert info.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT)
    (answer,) = fut.result(timeout=20)
    assert isinstance(answer, SiteFailure)
    # the server still serves
    fut, hdr, _ = cons.open_fit(conn)
    payload = _update()
    conn.submit(_reply(hdr, payload), payload, 60)
    assert isinstance(fut.result(timeout=20)[0], Update)


def test_wrong_job_round_task_and_replay(cons):
    a, b = cons.ready("hospital_a"), cons.ready("hospital_b")
    fut, hdr, _ = cons.open_fit(a)
    payload = _update()
    # another job's id: refused, and the task stays open for the right answer
    _refused(lambda: a.submit(_reply(hdr, payload, job_id="other-job"), payload, 60),
             grpc.StatusCode.FAILED_PRECONDITION, "this server runs job job-under-test")
    # a site that was not given the task
    pb = _update(site="hospital_b")
    _refused(lambda: b.submit(_reply(hdr, pb), pb, 60), grpc.StatusCode.PERMISSION_DENIED,
             "was given to site 'hospital_a'")
    # an unknown task id: the site was not selected
    _refused(lambda: b.submit({**_reply(hdr, pb), "task_id": "f" * 32}, pb, 60), grpc.StatusCode.PERMISSION_DENIED,
             "was not selected")
    # the right answer still goes through
    a.submit(_reply(hdr, payload), payload, 60)
    assert isinstance(fut.result(timeout=20)[0], Update)
    # the same submission again: the task is closed
    _refused(lambda: a.submit(_reply(hdr, payload), payload, 60), grpc.StatusCode.ALREADY_EXISTS, "already answered")
    # the same update bytes for a new task of the same round: a replay
    fut, hdr, _ = cons.open_fit(a)
    _refused(lambda: a.submit(_reply(hdr, payload), payload, 60), grpc.StatusCode.ALREADY_EXISTS, "replay")
    assert isinstance(fut.result(timeout=20)[0], SiteFailure)
    # an answer for another round than the task's
    fut, hdr, _ = cons.open_fit(a, rnd=2)
    _refused(lambda: a.submit({**_reply(hdr, payload), "round": 1}, payload, 60), grpc.StatusCode.INVALID_ARGUMENT,
             "the task is round 2")
    assert isinstance(fut.result(timeout=20)[0], SiteFailure)
    # an update whose own round differs, and one claiming more examples than the site has
    for body, reason in ((_update(rnd=1), "update is for round 1"), (_update(rnd=2, n=10_000), "10000 training")):
        fut, hdr, _ = cons.open_fit(a, rnd=2)
        _refused(lambda: a.submit(_reply(hdr, body), body, 60), grpc.StatusCode.INVALID_ARGUMENT, reason)
        assert isinstance(fut.result(timeout=20)[0], SiteFailure)


def test_a_site_error_reaches_the_server_log(cons, caplog):
    conn = cons.ready("hospital_a")
    fut, hdr, _ = cons.open_fit(conn)
    with caplog.at_level(logging.WARNING, logger="medfed"):
        conn.submit({**_reply(hdr, b""), "kind": "error", "cause": "DataError: image 'x.png' is corrupt"}, b"", 60)
        (answer,) = fut.result(timeout=20)
    assert isinstance(answer, SiteFailure) and "x.png' is corrupt" in answer.cause
    assert any("hospital_a" in r.getMessage() and "is corrupt" in r.getMessage() for r in caplog.records)


def test_evaluation_answers_are_checked(cons):
    conn = cons.ready("hospital_a")
    req = EvalRequest("hospital_a", PARAMS, (Split.VAL, Split.TEST), cons.job_id, 1)
    for body, ok in (
        (codec.encode_eval_results([]), False),  # not the splits asked for
        (b'[{"split": "val", "n": 2, "metrics": {"auc": NaN}}, {"split": "test", "n": 2, "metrics": {}}]', False),
        (b'[{"split": "val", "n": 2, "metrics": {"auc": 0.5}}, {"split": "test", "n": 2, "metrics": {"auc": null}}]',
         True),
    ):
        fut = cons.pool.submit(cons.transport.evaluate, [req], 20)
        hdr, _ = conn.poll(cons.job_id, 30)
        assert hdr["kind"] == "evaluate" and hdr["splits"] == ["val", "test"]
        reply = {"task_id": hdr["task_id"], "job_id": cons.job_id, "round": 1, "kind": "evaluate"}
        if ok:
            conn.submit(reply, body, 60)
            (res,) = fut.result(timeout=20)
            assert [r.metrics["auc"] for r in res] == [0.5, None]
        else:
            _refused(lambda: conn.submit(reply, body, 60), grpc.StatusCode.INVALID_ARGUMENT, "evaluation results")
            assert isinstance(fut.result(timeout=20)[0], SiteFailure)


def test_a_task_for_a_site_that_is_not_connected_fails_at_once(cons):
    # hospital_c never joined: the round does not wait the whole timeout for it
    (answer,) = cons.transport.fit([FitRequest("hospital_c", PARAMS, _plan(cons.job_id, 1))], timeout=60)
    assert isinstance(answer, SiteFailure) and "not connected" in answer.cause


# ---------------------------------------------------------------------- who may connect


def _ca_key(cons) -> tuple[bytes, bytes]:
    return (cons.kits / "ca" / "ca.crt").read_bytes(), (cons.kits / "ca" / "ca.key").read_bytes()


def test_a_site_not_in_the_job_is_refused(cons, caplog):
    cert, key = issue_certificate(*_ca_key(cons), "intruder", "site", consortium="test")
    conn = cons.connect("intruder", cert_pem=cert, key_pem=key)
    with caplog.at_level(logging.WARNING, logger="medfed"):
        _refused(conn.join, grpc.StatusCode.PERMISSION_DENIED, "not part of this job")
    assert any("intruder" in r.getMessage() for r in caplog.records)


def test_the_server_certificate_cannot_act_as_a_site(cons):
    kit = load_kit(cons.kits / "server", role="server")
    conn = cons.connect("127.0.0.1", cert_pem=kit.cert_pem, key_pem=kit.key_pem)
    with pytest.raises(grpc.RpcError):  # refused in the handshake (no client-auth usage) or by name
        conn.join()


def _site_cert_without_usage(cons, name: str) -> tuple[bytes, bytes]:
    """A certificate the consortium CA signed for site ``name`` exactly as medfed issues
    them, less its extended key usage. TLS accepts a certificate with no usage listed for
    any purpose, so refusing it is the hub's own check."""
    ca_cert_pem, ca_key_pem = _ca_key(cons)
    cert_pem, key_pem = issue_certificate(ca_cert_pem, ca_key_pem, name, "site", consortium="test")
    issued = x509.load_pem_x509_certificate(cert_pem)
    builder = (x509.CertificateBuilder().subject_name(issued.subject).issuer_name(issued.issuer)
               .public_key(issued.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(issued.not_valid_before_utc).not_valid_after(issued.not_valid_after_utc))
    for ext in issued.extensions:
        if not isinstance(ext.value, x509.ExtendedKeyUsage):
            builder = builder.add_extension(ext.value, ext.critical)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    assert ExtendedKeyUsageOID.CLIENT_AUTH not in [e.oid for e in cert.extensions] and cert.issuer == issued.issuer
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def test_a_certificate_without_client_auth_usage_is_refused(cons, caplog):
    cert, key = _site_cert_without_usage(cons, "hospital_c")  # a site of the job, signed by its CA
    conn = cons.connect("hospital_c", cert_pem=cert, key_pem=key)
    with caplog.at_level(logging.WARNING, logger="medfed"):
        _refused(conn.join, grpc.StatusCode.PERMISSION_DENIED, "certificate 'hospital_c' is not a site certificate")
    assert "hospital_c" not in [p["name"] for p in cons.store.participants()]  # it never joined
    assert any("not a site certificate" in r.getMessage() for r in caplog.records)


def _handshake_refused(conn: Connection) -> None:
    with pytest.raises(grpc.RpcError) as info:
        conn.join()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_other_ca_expired_certificate_and_plain_text_are_refused(cons):
    other_ca = create_ca("other", 30)
    cert, key = issue_certificate(*other_ca, "hospital_a", "site")
    _handshake_refused(cons.connect("hospital_a", cert_pem=cert, key_pem=key))
    now = dt.datetime.now(dt.timezone.utc)
    cert, key = issue_certificate(*_ca_key(cons), "hospital_a", "site", not_before=now - dt.timedelta(days=10),
                                  not_after=now - dt.timedelta(days=1))
    _handshake_refused(cons.connect("hospital_a", cert_pem=cert, key_pem=key))
    # a site that trusts another CA does not accept the server
    _handshake_refused(cons.connect("hospital_a", ca_pem=other_ca[0]))
    # no TLS at all
    channel = grpc.insecure_channel(f"127.0.0.1:{cons.port}")
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(wire.JOIN)(wire.encode_header({"site": "hospital_a"}), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    channel.close()
    # and the server still serves a good site
    cons.ready("hospital_b")


def test_a_model_larger_than_a_message_streams_both_ways(cons):
    """A 300 MB model crosses in chunks to the site and back."""
    conn = cons.ready("hospital_b")
    big = {"w": torch.arange(75_000_000, dtype=torch.float32).reshape(75_000, 1000)}
    fut = cons.pool.submit(cons.transport.fit, [FitRequest("hospital_b", big, _plan(cons.job_id, 7))], 120)
    hdr, blob = conn.poll(cons.job_id, 120)
    assert hdr["size"] == len(blob) > 300_000_000
    params, _ = codec.decode_model(blob)
    del blob
    params["w"][0, 0] = -1.0
    payload = bytes(codec.encode_update(Update("hospital_b", 7, params, N_TRAIN, 1)))
    del params
    conn.submit({"task_id": hdr["task_id"], "job_id": cons.job_id, "round": 7, "kind": "fit"}, payload, 120)
    del payload
    (answer,) = fut.result(timeout=120)
    assert isinstance(answer, Update)
    assert answer.params["w"][0, 0] == -1.0 and torch.equal(answer.params["w"][1:], big["w"][1:])


# ---------------------------------------------------------------------- updates held in memory or spooled to files

from medfed.transport.grpc import hub as hub_module  # noqa: E402


def _distinct_params(seed: int, shapes=None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(tuple(v.shape), generator=g) for k, v in (shapes or PARAMS).items()}


@pytest.mark.parametrize("in_memory", [None, 0], ids=["default", "all-spooled"])
def test_an_accepted_update_has_the_params_the_site_sent(cons, monkeypatch, in_memory):
    if in_memory is not None:  # read by Hub._hold at each submission: the module's hub sees it
        monkeypatch.setattr(hub_module, "UPDATES_IN_MEMORY", in_memory)
    conn = cons.ready("hospital_a")
    kept = []
    for i in range(3):  # rounds in a row, each answer kept while the next arrives
        fut, hdr, _ = cons.open_fit(conn)
        sent = _distinct_params(1000 + 10 * i + (1 if in_memory is None else 5))
        payload = _update(**sent)
        conn.submit(_reply(hdr, payload), payload, 60)
        (answer,) = fut.result(timeout=20)
        assert isinstance(answer, Update), answer
        assert isinstance(answer.params, codec.FileTensors) == (in_memory == 0)
        assert sorted(answer.params) == sorted(sent)
        for k, t in sent.items():
            assert answer.params[k].dtype == t.dtype and torch.equal(answer.params[k], t), k
        assert (answer.site, answer.round, answer.num_examples) == ("hospital_a", 1, N_TRAIN)
        row = cons.store.audit_rows()[-1]
        assert (row["status"], row["bytes_received"], row["sha256"]) == ("accepted", len(payload), wire.sha256(payload))
        kept.append((answer, sent))
    for answer, sent in kept:  # an update in use is never overwritten by a later one
        assert all(torch.equal(answer.params[k], t) for k, t in sent.items())


def test_updates_beyond_the_memory_budget_are_spooled(cons, monkeypatch):
    """One update in memory per batch: of two sites' updates of a model of a few MiB, the
    first is held in memory, the second goes to a file; both arrive intact."""
    monkeypatch.setattr(hub_module, "UPDATES_IN_MEMORY", 1)
    model = {"w": torch.zeros(600_000)}  # 2.4 MB: two updates exceed one model plus a header
    a, b = cons.ready("hospital_a"), cons.ready("hospital_b")
    reqs = [FitRequest(c.site, model, _plan(cons.job_id, 3)) for c in (a, b)]
    fut = cons.pool.submit(cons.transport.fit, reqs, 30)
    hdrs = [c.poll(cons.job_id, 30)[0] for c in (a, b)]
    sent = [{"w": torch.randn(600_000, generator=torch.Generator().manual_seed(s))} for s in (1, 2)]
    for c, hdr, p in zip((a, b), hdrs, sent):
        payload = bytes(codec.encode_update(Update(c.site, 3, p, N_TRAIN, 1)))
        c.submit(_reply(hdr, payload), payload, 60)
        del payload
    answers = fut.result(timeout=30)
    assert [type(u.params) is codec.FileTensors for u in answers] == [False, True]
    for u, p in zip(answers, sent):
        assert torch.equal(u.params["w"], p["w"])


def test_a_refused_update_gives_its_memory_back(cons, monkeypatch):
    """One update in memory per batch: the first site's update is refused (NaN) after it
    was received in memory; the second site's update still gets the memory."""
    monkeypatch.setattr(hub_module, "UPDATES_IN_MEMORY", 1)
    model = {"w": torch.zeros(600_000)}
    a, b = cons.ready("hospital_a"), cons.ready("hospital_b")
    reqs = [FitRequest(c.site, model, _plan(cons.job_id, 3)) for c in (a, b)]
    fut = cons.pool.submit(cons.transport.fit, reqs, 30)
    hdrs = [c.poll(cons.job_id, 30)[0] for c in (a, b)]
    bad = torch.zeros(600_000)
    bad[7] = float("nan")
    for c, hdr, p in zip((a, b), hdrs, (bad, torch.ones(600_000))):
        payload = bytes(codec.encode_update(Update(c.site, 3, {"w": p}, N_TRAIN, 1)))
        if c is a:
            _refused(lambda: c.submit(_reply(hdr, payload), payload, 60), grpc.StatusCode.INVALID_ARGUMENT, "NaN")
        else:
            c.submit(_reply(hdr, payload), payload, 60)
    refused, accepted = fut.result(timeout=30)
    assert isinstance(refused, SiteFailure) and "NaN" in refused.cause
    assert type(accepted.params) is not codec.FileTensors and torch.equal(accepted.params["w"], torch.ones(600_000))


# ---------------------------------------------------------------------- the sha256 a site may declare


@pytest.mark.parametrize("in_memory", [None, 0], ids=["default", "all-spooled"])
def test_a_submission_without_a_sha256_is_accepted(cons, monkeypatch, in_memory):
    if in_memory is not None:
        monkeypatch.setattr(hub_module, "UPDATES_IN_MEMORY", in_memory)
    conn = cons.ready("hospital_a")
    for extra in ({}, {"sha256": None}, "right"):
        fut, hdr, _ = cons.open_fit(conn)
        payload = _update()
        over = {"sha256": wire.sha256(payload)} if extra == "right" else extra
        header = _reply(hdr, payload, size=len(payload), **over)
        assert ("sha256" in header) == bool(over)
        reply = wire.decode_header(_raw_submit(conn, header, list(wire.chunks(payload, 100))), "reply")
        assert reply == {"accepted": True}
        (answer,) = fut.result(timeout=20)
        assert isinstance(answer, Update) and torch.equal(answer.params["w"], codec.decode_update(payload).params["w"])
        row = cons.store.audit_rows()[-1]
        # the server's own hash is recorded whether or not the site declared one
        assert (row["status"], row["sha256"]) == ("accepted", wire.sha256(payload))


@pytest.mark.parametrize("in_memory", [None, 0], ids=["default", "all-spooled"])
def test_a_submission_with_a_wrong_sha256_is_refused(cons, monkeypatch, in_memory):
    if in_memory is not None:
        monkeypatch.setattr(hub_module, "UPDATES_IN_MEMORY", in_memory)
    conn = cons.ready("hospital_a")
    payload = _update()
    for bad in ("0" * 64, wire.sha256(payload).upper(), wire.sha256(payload + b"x"), 12345, ""):
        fut, hdr, _ = cons.open_fit(conn)
        header = _reply(hdr, payload, size=len(payload), sha256=bad)
        _refused(lambda: _raw_submit(conn, header, [payload]), grpc.StatusCode.INVALID_ARGUMENT, "SHA-256")
        (answer,) = fut.result(timeout=20)
        assert isinstance(answer, SiteFailure) and "SHA-256" in answer.cause
        assert cons.store.audit_rows()[-1]["status"] == "refused"
    # the payload itself was fine: not counted as accepted (no replay), it goes through now
    fut, hdr, _ = cons.open_fit(conn)
    conn.submit(_reply(hdr, payload), payload, 60)
    assert isinstance(fut.result(timeout=20)[0], Update)


# ---------------------------------------------------------------------- the model a site already holds


def _raw_poll(conn: Connection, job_id: str, have) -> tuple[dict, list[bytes]]:
    """One poll naming ``have``: (header, payload chunks), the stream read to its end."""
    stream = conn._poll(wire.encode_header({"site": conn.site, "job_id": job_id, "have": have}), timeout=30)
    messages = list(stream)
    return wire.decode_header(messages[0], "poll reply"), messages[1:]


def _answer_fit(conn: Connection, hdr: dict, fut, params: dict) -> Update:
    payload = _update(**params)
    conn.submit(_reply(hdr, payload), payload, 60)
    (answer,) = fut.result(timeout=20)
    assert isinstance(answer, Update), answer
    return answer


def test_a_model_the_site_holds_is_not_sent_again(cons):
    conn = cons.ready("hospital_a")
    model = _distinct_params(7)  # one object, sent in three rounds: one model id
    step = iter(range(1, 100))

    def open_task():
        return cons.pool.submit(cons.transport.fit, [FitRequest(conn.site, model, _plan(cons.job_id, 1))], 20)

    # a site that holds no model gets the payload
    fut = open_task()
    hdr, chunks = _raw_poll(conn, cons.job_id, None)
    assert hdr["kind"] == "fit" and "cached" not in hdr and isinstance(hdr["model_id"], str)
    model_id, blob = hdr["model_id"], b"".join(chunks)
    assert len(blob) == hdr["size"] > 0
    params, _ = codec.decode_model(blob)
    assert all(torch.equal(params[k], model[k]) for k in model)
    _answer_fit(conn, hdr, fut, {k: v + next(step) for k, v in model.items()})
    assert cons.store.audit_rows()[-1]["bytes_sent"] == len(blob)

    # a site that names it gets a header only
    fut = open_task()
    hdr, chunks = _raw_poll(conn, cons.job_id, model_id)
    assert hdr["kind"] == "fit" and hdr["cached"] is True and hdr["model_id"] == model_id
    assert chunks == [] and hdr["size"] == len(blob)
    _answer_fit(conn, hdr, fut, {k: v + next(step) for k, v in model.items()})
    row = cons.store.audit_rows()[-1]
    assert (row["kind"], row["status"], row["bytes_sent"]) == ("fit", "accepted", 0)

    # a site that names another model gets the payload again
    for other in ("f" * 32, "", 12, ["x"]):
        fut = open_task()
        hdr, chunks = _raw_poll(conn, cons.job_id, other)
        assert "cached" not in hdr and hdr["model_id"] == model_id
        assert b"".join(chunks) == blob
        _answer_fit(conn, hdr, fut, {k: v + next(step) for k, v in model.items()})
        assert cons.store.audit_rows()[-1]["bytes_sent"] == len(blob)


def test_a_model_evaluated_then_trained_is_sent_once(cons):
    """Connection.poll names the model it received last; the fit task of the model it just
    evaluated comes without a payload and the site uses its own copy."""
    conn = cons.ready("hospital_b")
    model = _distinct_params(8)
    fut = cons.pool.submit(cons.transport.evaluate, [EvalRequest(conn.site, model, (Split.VAL,), cons.job_id, 2)], 20)
    hdr, blob = conn.poll(cons.job_id, 30)
    assert hdr["kind"] == "evaluate" and "cached" not in hdr
    evaluated = bytes(blob)
    conn.submit({"task_id": hdr["task_id"], "job_id": cons.job_id, "round": 2, "kind": "evaluate"},
                b'[{"split": "val", "n": 2, "metrics": {"auc": 0.5}}]', 60)
    assert fut.result(timeout=20)[0][0].metrics == {"auc": 0.5}
    assert cons.store.audit_rows()[-1]["bytes_sent"] == len(evaluated)

    fut = cons.pool.submit(cons.transport.fit, [FitRequest(conn.site, model, _plan(cons.job_id, 3))], 20)
    fit_hdr, fit_blob = conn.poll(cons.job_id, 30)
    assert fit_hdr["kind"] == "fit" and fit_hdr["cached"] is True and fit_hdr["model_id"] == hdr["model_id"]
    assert bytes(fit_blob) == evaluated
    params, _ = codec.decode_model(fit_blob)
    assert all(torch.equal(params[k], model[k]) for k in model)
    payload = bytes(codec.encode_update(Update(conn.site, 3, {k: v + 1 for k, v in model.items()}, N_TRAIN, 1)))
    conn.submit(_reply(fit_hdr, payload), payload, 60)
    assert isinstance(fut.result(timeout=20)[0], Update)
    row = cons.store.audit_rows()[-1]
    assert (row["kind"], row["status"], row["bytes_sent"]) == ("fit", "accepted", 0)

    # a new model: sent in full, and the site holds that one from now on
    new = _distinct_params(9)
    fut = cons.pool.submit(cons.transport.fit, [FitRequest(conn.site, new, _plan(cons.job_id, 4))], 20)
    hdr2, blob2 = conn.poll(cons.job_id, 30)
    assert "cached" not in hdr2 and hdr2["model_id"] != hdr["model_id"]
    params, _ = codec.decode_model(blob2)
    assert all(torch.equal(params[k], new[k]) for k in new)
    payload = bytes(codec.encode_update(Update(conn.site, 4, {k: v + 1 for k, v in new.items()}, N_TRAIN, 1)))
    conn.submit(_reply(hdr2, payload), payload, 60)
    assert isinstance(fut.result(timeout=20)[0], Update)
    assert cons.store.audit_rows()[-1]["bytes_sent"] == len(blob2)
    assert conn._model is not None and conn._model[0] == hdr2["model_id"]
