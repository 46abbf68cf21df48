"""Signed key advertisements (privacy/secagg/signing.py) with real kits from
``medfed provision``: a server that substitutes, strips, renames or replays keys, or signs
with a certificate of another CA, of another site or of its own, makes every honest site
refuse the round, naming the site and why; the substituted key is never used."""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from deploy_kits import make_kits
from medfed.config import builtin_job_path, load_job, parse_job
from medfed.core.errors import ConfigError
from medfed.core.types import Message, SiteFailure
from medfed.privacy.secagg import RING, SecAggError, ServerSession, SiteSession, run_round
from medfed.privacy.secagg.integration import SecAggClient, SecureSum
from medfed.privacy.secagg.messages import b64
from medfed.privacy.secagg.signing import Credentials, signed_message
from medfed.site.remote import RemoteSite
from medfed.transport.base import Transport
from medfed.transport.grpc.hub import site_view
from medfed.transport.pki import issue_certificate, load_kit

SITES = ("hospital_a", "hospital_b", "hospital_c")
A, B, C = SITES


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    """This consortium's kits, and a second consortium's with the same site names."""
    ours, _ = make_kits(tmp_path_factory.mktemp("ours"))
    theirs, _ = make_kits(tmp_path_factory.mktemp("theirs"))
    return ours, theirs


@pytest.fixture(scope="module")
def creds(kits):
    ours, _ = kits
    return {s: Credentials.from_kit(load_kit(ours / s, role="site")) for s in SITES}


def _wire(msg):
    return json.loads(json.dumps(msg))


def _advertised(creds, rnd=1, job_id="job"):
    """Round ``rnd``'s site sessions and the roster an honest server would send."""
    server = ServerSession(job_id, rnd, 2, 4)
    sites = {s: SiteSession(s, job_id, rnd, creds[s]) for s in SITES}
    for s, session in sites.items():
        server.receive_advertisement(s, _wire(session.advertise()))
    return sites, _wire(server.roster())


def _forge(roster, site, key_pem, cert_pem, job_id="job", rnd=1):
    """``roster`` with ``site``'s keys replaced by fresh ones, signed in ``site``'s name
    with ``key_pem`` and sent with ``cert_pem``: what a server holding that kit could send."""
    c_pk, s_pk = (X25519PrivateKey.generate().public_key().public_bytes_raw() for _ in range(2))
    key = serialization.load_pem_private_key(key_pem, password=None)
    sig = key.sign(signed_message(job_id, rnd, site, c_pk, s_pk), ec.ECDSA(hashes.SHA256()))
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    forged = copy.deepcopy(roster)
    forged[site] = {"c_pk": b64(c_pk), "s_pk": b64(s_pk),
                    "signed": {"job_id": job_id, "round": rnd, "cert": b64(der), "sig": b64(sig)}}
    return forged


def _refused(session, roster, victim, why):
    """``session`` refuses ``roster`` naming ``victim`` and ``why``, and shares nothing."""
    pattern = rf"site '{session.site}', field 'roster.{victim}': refused the key advertisement of site '{victim}': {why}"
    with pytest.raises(SecAggError, match=pattern) as err:
        session.share_keys(roster, 2)
    assert err.value.site == victim
    with pytest.raises(SecAggError, match=r"mask\(\) called out of order"):  # the session goes no further
        session.mask(torch.zeros(4, dtype=torch.int64), {})


# --- honest rounds ---------------------------------------------------------------------------


def test_a_signed_round_sums_and_its_advertisements_carry_the_signature(creds):
    inputs = {s: torch.randint(0, RING, (50,), generator=torch.Generator().manual_seed(i)) for i, s in enumerate(SITES)}
    expected = sum(inputs.values()) % RING
    assert torch.equal(run_round(inputs, 2, credentials=creds), expected)
    assert torch.equal(run_round(inputs, 2, drop_after_masking=[C], credentials=creds), expected)
    sites, roster = _advertised(creds)
    assert set(roster[A]) == {"c_pk", "s_pk", "signed"} and roster[A]["signed"]["round"] == 1
    assert all(set(sites[s].share_keys(roster, 2)["shares"]) == set(SITES) - {s} for s in SITES)


def test_a_simulation_signs_nothing_and_ignores_signatures(creds):
    plain = SiteSession(A, "job", 1)
    assert set(plain.advertise()) == {"c_pk", "s_pk"}
    _, roster = _advertised(creds)
    other = SiteSession(B, "job", 1)
    roster[B] = _wire(other.advertise())
    assert set(other.share_keys(roster, 2)["shares"]) == {A, C}


# --- what an active server may try -----------------------------------------------------------


def test_a_substituted_key_is_refused(creds):
    for field in ("c_pk", "s_pk"):
        sites, roster = _advertised(creds)
        roster[A][field] = b64(X25519PrivateKey.generate().public_key().public_bytes_raw())
        _refused(sites[B], roster, A, r"its signature does not verify against its certificate")


def test_an_unsigned_advertisement_is_refused(creds):
    sites, roster = _advertised(creds)
    del roster[A]["signed"]
    _refused(sites[C], roster, A, r"it is not signed")


def test_a_certificate_of_another_consortium_is_refused(kits, creds):
    _, theirs = kits
    sites, roster = _advertised(creds)
    key, cert = ((theirs / A / f).read_bytes() for f in ("participant.key", "participant.crt"))
    _refused(sites[B], _forge(roster, A, key, cert), A, r"its certificate was not issued by this consortium's CA")


def test_a_certificate_naming_another_site_is_refused(kits, creds):
    ours, _ = kits
    sites, roster = _advertised(creds)
    key, cert = ((ours / C / f).read_bytes() for f in ("participant.key", "participant.crt"))
    # a colluding site's kit signs a key in another site's name
    _refused(sites[B], _forge(roster, A, key, cert), A, r"its certificate names 'hospital_c', not 'hospital_a'")
    # or a genuine advertisement of one site is listed under another's name
    sites, roster = _advertised(creds)
    _refused(sites[B], {**roster, A: roster[C]}, A, r"its certificate names 'hospital_c', not 'hospital_a'")


def test_the_server_certificate_cannot_sign_for_a_site(kits, creds):
    ours, _ = kits
    sites, roster = _advertised(creds)
    key, cert = ((ours / "server" / f).read_bytes() for f in ("participant.key", "participant.crt"))
    _refused(sites[B], _forge(roster, A, key, cert), A, r"its certificate is not a site certificate \(no clientAuth")


def test_the_ca_certificate_or_one_without_signing_usage_cannot_sign_for_a_site(kits, creds):
    ours, _ = kits
    ca_cert, ca_key = ((ours / "ca" / f).read_bytes() for f in ("ca.crt", "ca.key"))
    sites, roster = _advertised(creds)
    _refused(sites[B], _forge(roster, A, ca_key, ca_cert), A, r"its certificate is a CA certificate")
    # a site certificate of this CA for hospital_a whose key usage forbids signatures
    site_cert = x509.load_pem_x509_certificate((ours / A / "participant.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateBuilder().subject_name(site_cert.subject).issuer_name(site_cert.issuer)
    builder = builder.public_key(key.public_key()).serial_number(x509.random_serial_number())
    builder = builder.not_valid_before(site_cert.not_valid_before_utc).not_valid_after(site_cert.not_valid_after_utc)
    for ext in site_cert.extensions:
        value = ext.value
        if isinstance(value, x509.KeyUsage):
            value = x509.KeyUsage(False, False, True, False, False, False, False, False, False)
        if not isinstance(value, (x509.SubjectKeyIdentifier, x509.AuthorityKeyIdentifier)):
            builder = builder.add_extension(value, ext.critical)
    cert = builder.sign(serialization.load_pem_private_key(ca_key, password=None), hashes.SHA256())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    sites, roster = _advertised(creds)
    _refused(sites[B], _forge(roster, A, key_pem, cert.public_bytes(serialization.Encoding.PEM)), A,
             r"its certificate does not allow digital signatures")


def test_an_expired_certificate_is_refused(kits, creds):
    ours, _ = kits
    now = dt.datetime.now(dt.timezone.utc)
    ca_cert, ca_key = ((ours / "ca" / f).read_bytes() for f in ("ca.crt", "ca.key"))
    cert, key = issue_certificate(ca_cert, ca_key, A, "site", not_before=now - dt.timedelta(days=3),
                                  not_after=now - dt.timedelta(days=1), consortium="test")
    sites, roster = _advertised(creds)
    _refused(sites[B], _forge(roster, A, key, cert), A, r"its certificate is not valid now \(valid from ")


def test_an_advertisement_replayed_from_another_round_or_job_is_refused(creds):
    _, old_roster = _advertised(creds, rnd=1)
    sites, roster = _advertised(creds, rnd=2)
    _refused(sites[B], {**roster, A: old_roster[A]}, A,
             r"it was signed for job 'job' round 1, this is job 'job' round 2 \(replayed\)")
    _, other_job = _advertised(creds, rnd=2, job_id="other")
    sites, roster = _advertised(creds, rnd=2)
    _refused(sites[C], {**roster, A: other_job[A]}, A, r"it was signed for job 'other' round 2, this is job 'job' round 2")
    # rewriting the round it names breaks the signature
    rewritten = copy.deepcopy(old_roster[A])
    rewritten["signed"]["round"] = 2
    sites, roster = _advertised(creds, rnd=2)
    _refused(sites[B], {**roster, A: rewritten}, A, r"its signature does not verify")


def test_a_garbled_certificate_is_refused_and_an_oversized_one_never_routed(creds):
    sites, roster = _advertised(creds)
    roster[A]["signed"]["cert"] = b64(b"not a certificate")
    _refused(sites[B], roster, A, r"its certificate is not a valid X.509 certificate")
    ad = _wire(SiteSession(A, "job", 1, creds[A]).advertise())
    ad["signed"]["cert"] = b64(bytes(5000))
    with pytest.raises(SecAggError, match=r"field 'advertisement.signed.cert': longer than 4096 bytes"):
        ServerSession("job", 1, 2, 4).receive_advertisement(A, ad)
    ad["signed"] = {"job_id": "job", "round": True, "cert": "AA==", "sig": "AA=="}
    with pytest.raises(SecAggError, match=r"field 'advertisement.signed.round': expected a round number"):
        ServerSession("job", 1, 2, 4).receive_advertisement(A, ad)


def test_credentials_refuse_a_mixed_up_kit(kits):
    ours, theirs = kits
    a = load_kit(ours / A, role="site")
    with pytest.raises(ConfigError, match=r"the kit's key is not the key of its certificate"):
        Credentials(A, (ours / B / "participant.key").read_bytes(), a.cert_pem, a.ca_pem)
    with pytest.raises(ConfigError, match=r"the kit's certificate names \['hospital_a'\], not 'hospital_b'"):
        Credentials(B, a.key_pem, a.cert_pem, a.ca_pem)
    with pytest.raises(ConfigError, match=r"not issued by the kit's CA"):
        Credentials(A, a.key_pem, a.cert_pem, (theirs / A / "ca.crt").read_bytes())
    assert "PRIVATE" not in repr(Credentials.from_kit(a))


# --- on the update path ----------------------------------------------------------------------

JOB = {
    "name": "t", "output": "o", "rounds": 1,
    "data": {"source": "synthetic", "sites": [{"name": s, "n_train": 10, "n_test": 5} for s in SITES]},
    "model": {"name": "small_cnn", "norm": "group"}, "task": {"labels": "binary"},
    "privacy": {"secure_aggregation": {"threshold": 2}},
}


class SubstitutingServer(Transport):
    """Routes secure aggregation's messages to real SecAggClients with kits, swapping site
    a's c_pk for its own in the roster it sends the other sites."""

    def __init__(self, job, creds):
        self.clients = {s: SecAggClient(job, s, creds[s]) for s in SITES}
        self.shared: set[str] = set()

    def exchange(self, messages: list[Message], timeout):
        out = []
        for m in messages:
            body = _wire(m.body)
            if m.topic == "secagg/share" and m.site != A:
                body["roster"][A]["c_pk"] = b64(X25519PrivateKey.generate().public_key().public_bytes_raw())
            try:
                reply = self.clients[m.site].answer(m.topic, m.round, body)
            except SecAggError as e:  # what a deployed site sends back: an error naming the cause
                out.append(SiteFailure(m.site, f"SecAggError: {e}"))
                continue
            if m.topic == "secagg/share":
                self.shared.add(m.site)
            out.append(_wire(reply))
        return out

    def fit(self, requests, timeout):
        raise AssertionError("no site trains in a round whose key exchange failed")

    def evaluate(self, requests, timeout):
        raise AssertionError("not reached")


def test_sites_refuse_a_substituted_key_on_the_update_path_and_the_round_aborts(creds, caplog):
    job = parse_job(JOB)
    server = SubstitutingServer(job, creds)
    combiner = SecureSum(job, server, {s: 10 for s in SITES})
    with caplog.at_level(logging.WARNING, logger="medfed"), pytest.raises(SecAggError, match="only 1 sites shared"):
        combiner.prepare(1, list(SITES), {"w": torch.zeros(4)})
    assert server.shared == {A}  # b and c encrypted nothing under the server's key
    for victim in (B, C):
        assert (f"site '{victim}' left secure aggregation at secagg/share: SecAggError: site '{victim}', field "
                f"'roster.{A}': refused the key advertisement of site '{A}': its signature does not verify") in caplog.text


def test_a_roster_naming_a_site_outside_the_job_is_refused(creds):
    client = SecAggClient(parse_job(JOB), B, creds[B])
    client.answer("secagg/advertise", 1, {"job_id": "job"})
    with pytest.raises(SecAggError, match=r"field 'roster': sites \['mallory'\] are not sites of this job"):
        client.answer("secagg/share", 1, {"roster": {"mallory": {}, B: {}}, "threshold": 2})


def test_a_deployed_site_gets_its_kit_credentials_and_refuses_another_jobs_messages(kits, tmp_path):
    ours, _ = kits
    job = load_job(builtin_job_path("quickstart")).model_copy(update={"output": tmp_path / "run"})
    view = site_view(job)
    view["privacy"] = {"secure_aggregation": {"clip_range": 0.5}}
    site = RemoteSite(B, None, kit=load_kit(ours / B, role="site"))
    site.setup(view, "job1")
    (client,) = [f for f in site.app.filters if isinstance(f, SecAggClient)]
    assert client.credentials is not None and client.credentials.site == B
    hdr = {"kind": "exchange", "topic": "secagg/advertise", "round": 1}
    kind, reply = site.answer(hdr, json.dumps({"job_id": "job1"}).encode())
    assert kind == "exchange" and "signed" in json.loads(reply)
    kind, reply = site.answer(hdr, json.dumps({"job_id": "another"}).encode())
    assert kind == "error" and b"a protocol message for job 'another', this site runs job job1" in reply
