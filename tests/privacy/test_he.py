"""Homomorphic aggregation (CKKS, the he extra): the sites' sum decrypted by a site is the
weighted mean the server would compute in the clear, within CKKS's precision; the server
never holds the secret key; bad ciphertexts, strangers' keys and lying decryptors are refused."""

import copy
import json
import logging
import os

import numpy as np
import pytest
import torch

pytest.importorskip("tenseal", reason='homomorphic aggregation is an optional extra: pip install -e ".[he]"')

from medfed.algorithms.fedavg import FedAvg
from medfed.config import parse_job
from medfed.core.errors import ConfigError, SiteError
from medfed.core.types import EvalResult, SiteFailure, Update
from medfed.privacy.he import ckks
from medfed.privacy.he.ckks import HEError
from medfed.privacy.he.integration import CIPHERTEXTS, EncryptedSum, HEClient
from medfed.server.federation import Federation
from medfed.server.loop import run_federated
from medfed.server.sampling import SiteSampler
from medfed.server.update_path import incoming_for
from medfed.transport.base import Transport

# CKKS precision stated: at scale 2^32 a fresh ciphertext's error is ~1e-6 per value; the
# weighted mean of these small sites is within 1e-4 of the plain one (the bound asserted).
PRECISION = 1e-4
SIZES = {"a": 10, "b": 30, "c": 60}
JOB = {
    "name": "t", "output": "o", "rounds": 1,
    "data": {"source": "synthetic", "sites": [{"name": s, "n_train": n, "n_test": 5} for s, n in SIZES.items()]},
    "model": {"name": "small_cnn", "norm": "group"}, "task": {"labels": "binary"},
    "privacy": {"he": {}},
}
SHIFT = {"a": 0.1, "b": -0.2, "c": 0.3}
# 5000 + 3 float values: two ciphertexts of 4096 at N = 8192; the integer counter stays out
INIT = {"w": torch.linspace(-1, 1, 5000), "b": torch.zeros(3), "n": torch.tensor(7)}


def _job(**he):
    raw = copy.deepcopy(JOB)
    raw["privacy"]["he"].update(he)
    return parse_job(raw)


class HESites(Transport):
    """Each site adds SHIFT[site] (times a ramp) to every float entry and encrypts with a real
    HEClient; messages go through JSON as on a network. ``tamper`` replaces a site's update."""

    def __init__(self, job, contexts, tamper=None, fail_fit=()):
        self.clients = {s: HEClient(job, s, contexts[s]) for s in SIZES}
        self.tamper, self.fail_fit = tamper or {}, set(fail_fit)
        self.decrypt_requests: list[str] = []

    def fit(self, requests, timeout):
        out = []
        for r in requests:
            if r.site in self.fail_fit:
                out.append(SiteFailure(r.site, "ConnectionError: lost"))
                continue
            params = {k: v + SHIFT[r.site] * torch.linspace(0, 1, v.numel()).reshape(v.shape)
                      if v.is_floating_point() else v + 1 for k, v in r.params.items()}
            update = self.clients[r.site].apply(Update(r.site, r.plan.round, params, SIZES[r.site], 1, {"loss": 1.0}),
                                                r.params, r.plan)
            out.append(self.tamper.get(r.site, lambda u: u)(update))
        return out

    def exchange(self, messages, timeout):
        out = []
        for m in messages:
            if m.topic == "he/decrypt":
                self.decrypt_requests.append(m.site)
            try:
                reply = self.clients[m.site].answer(m.topic, m.round, json.loads(json.dumps(m.body)))
                out.append(json.loads(json.dumps(reply)))
            except Exception as e:
                out.append(SiteFailure(m.site, f"{type(e).__name__}: {e}"))
        return out

    def evaluate(self, requests, timeout):
        return [[EvalResult(r.site, s, 5, {"auc": 0.5}) for s in r.splits] for r in requests]


def _run(job, transport, public):
    server = EncryptedSum(job, transport, public)
    algo = FedAvg(combiner=server)
    final = run_federated(Federation(job, algo, incoming_for(job), SiteSampler(job)), transport, INIT, lambda *r: None)
    return final, server


def _plain_mean(sites=SIZES):
    total = sum(sites.values())
    out = {}
    for k, v in INIT.items():
        if v.is_floating_point():
            ramp = torch.linspace(0, 1, v.numel(), dtype=torch.float64).reshape(v.shape)
            out[k] = v.double() + sum(SHIFT[s] * n for s, n in sites.items()) / total * ramp
    return out


@pytest.fixture(scope="module")
def key():
    ctx = ckks.new_context(_job().privacy.he)
    return ctx, ckks.public_copy(ctx)


def test_decrypted_aggregate_is_the_plain_weighted_mean(key):
    job = _job()
    ctx, public = key
    transport = HESites(job, {s: ctx for s in SIZES})
    final, server = _run(job, transport, public)
    expected = _plain_mean()
    err = max(float((final[k].double() - expected[k]).abs().max()) for k in expected)
    assert err < PRECISION
    assert torch.equal(final["n"], INIT["n"])  # integer buffers stay out of the sum
    assert server.round_metrics() == {"he_contributors": 3.0}
    assert transport.decrypt_requests == ["b"]  # one decryptor, rotating with the round (1 % 3)


def test_server_never_holds_the_secret_key(key):
    ctx, public = key
    job = _job()
    server = EncryptedSum(job, None, public)
    assert server.context.is_private() is False
    with pytest.raises(HEError, match="secret key"):
        EncryptedSum(job, None, ctx)


@pytest.mark.parametrize("bad,message", [
    (lambda rows: rows[:, :-1], "expected uint8"),  # too short
    (lambda rows: torch.cat([rows, rows[:1]]), "expected uint8"),  # one ciphertext too many
    (lambda rows: torch.randint(0, 256, rows.shape, dtype=torch.uint8), "does not deserialize"),
])
def test_wrong_size_or_garbage_is_refused_and_the_others_aggregate(key, caplog, bad, message):
    job = _job()
    ctx, public = key

    def tamper(u):
        return Update(u.site, u.round, {CIPHERTEXTS: bad(u.params[CIPHERTEXTS])}, u.num_examples, 1, u.metrics,
                      encoding=u.encoding)

    transport = HESites(job, {s: ctx for s in SIZES}, tamper={"a": tamper})
    server = EncryptedSum(job, transport, public)
    server.prepare(1, list(SIZES), INIT)
    updates = transport.fit([_request(s, job) for s in SIZES], 1)
    with caplog.at_level(logging.WARNING, logger="medfed"):
        out = server.combine(INIT, updates, 1)
    assert "site 'a' left homomorphic aggregation" in caplog.text and message in caplog.text
    expected = _plain_mean({"b": 30, "c": 60})
    assert max(float((out[k].double() - expected[k]).abs().max()) for k in expected) < PRECISION


def test_ciphertext_shape_is_checked_before_parsing(key):
    ctx, _ = key
    he = _job().privacy.he
    with pytest.raises(HEError, match=r"ciphertexts are uint8 \(1, 10\), expected uint8 \(1, \d+\)"):
        ckks.read_ciphertexts(ctx, np.zeros((1, 10), np.uint8), 1, he)


def test_a_site_with_another_key_is_refused_naming_both_fingerprints(key, caplog):
    job = _job()
    ctx, public = key
    other = ckks.new_context(job.privacy.he)
    transport = HESites(job, {"a": ctx, "b": ctx, "c": other})
    with caplog.at_level(logging.WARNING, logger="medfed"):
        final, _ = _run(job, transport, public)
    ours, theirs = ckks.fingerprint(ctx), ckks.fingerprint(other)
    assert ours != theirs
    assert f"the server's context has fingerprint '{ours}', this site's '{theirs}'" in caplog.text
    expected = _plain_mean({"a": 10, "b": 30})  # c's ciphertexts are not added
    assert max(float((final[k].double() - expected[k]).abs().max()) for k in expected) < PRECISION


def test_decryptor_refuses_a_sum_of_one_site(key):
    job = _job()
    ctx, _ = key
    client = HEClient(job, "a", ctx)
    client.apply(Update("a", 1, {k: v + 0.1 for k, v in INIT.items()}, 10, 1), INIT, _request("a", job).plan)
    with pytest.raises(HEError, match="at least 2"):
        client.answer("he/decrypt", 1, {"sites": ["a"], "sum": []})
    with pytest.raises(HEError, match="must be 2 ciphertexts"):
        client.answer("he/decrypt", 1, {"sites": ["a", "b"], "sum": ["AAAA"]})
    with pytest.raises(HEError, match="base64 text of at most"):
        client.answer("he/decrypt", 1, {"sites": ["a", "b"], "sum": ["A" * 10**7, "AAAA"]})


def test_decryptors_that_disagree_abort_the_round(key):
    job = _job(decryptors=2)
    ctx, public = key
    transport = HESites(job, {s: ctx for s in SIZES})
    honest = transport.clients["c"]._decrypt

    def lying(rnd, body):
        reply = honest(rnd, body)
        raw = bytearray(__import__("base64").b64decode(reply["sum"]))
        raw[0] ^= 1
        return {"sum": __import__("base64").b64encode(bytes(raw)).decode()}

    transport.clients["c"]._decrypt = lying
    with pytest.raises(HEError, match="returned different sums"):
        _run(job, transport, public)


def test_headroom_refuses_a_change_that_could_overflow_the_sum(key):
    job = _job(scale_bits=45)  # room for sums up to 2^12 = 4096 over 3 sites
    ctx = ckks.new_context(job.privacy.he)
    client = HEClient(job, "a", ctx)
    with pytest.raises(SiteError, match="privacy.he.scale_bits: .* lower scale_bits"):
        client.apply(Update("a", 1, {k: v + 1000 for k, v in INIT.items()}, 10, 1), INIT, _request("a", job).plan)


def test_key_files_are_private_and_checked(tmp_path):
    he = _job().privacy.he
    secret, public, fp = ckks.write_keys(tmp_path / "keys", he)
    for p in (secret, public):
        assert os.stat(p).st_mode & 0o777 == 0o600
    site = ckks.read_key_file(secret, he, private=True)
    server = ckks.read_key_file(public, he, private=False)
    assert site.is_private() and not server.is_private()
    assert ckks.fingerprint(site) == ckks.fingerprint(server) == fp
    with pytest.raises(ConfigError, match="must hold no secret key"):
        ckks.read_key_file(secret, he, private=False)
    with pytest.raises(ConfigError, match="not the job's privacy.he"):
        ckks.read_key_file(secret, _job(scale_bits=40).privacy.he, private=True)
    with pytest.raises(ConfigError, match="exists"):
        ckks.write_keys(tmp_path / "keys", he)


def _request(site, job):
    from medfed.core.types import Arm, FitRequest
    from medfed.server.loop import make_plan

    return FitRequest(site=site, params=INIT, plan=make_plan(job, job.job_id, Arm.FEDERATED, 1, 0, {}, None))
