"""Certificate revocation (transport/pki/revocation.py): ``medfed provision --revoke`` writes
a CA-signed list into the CA folder and the server kit; the hub refuses a revoked site at
its next call, reading the list again when it changes, and keeps the last good list when a
later one is damaged."""

from __future__ import annotations

import grpc
import pytest
import yaml
from cryptography import x509
from typer.testing import CliRunner

from medfed.cli import app
from medfed.core.errors import ConfigError
from medfed.transport.grpc.auth import Callers
from medfed.transport.grpc.guard import Refused
from medfed.transport.pki import provision
from medfed.transport.pki.revocation import CRL_FILE, Revocations, read_list, revoke

SITES = ["hospital_a", "hospital_b"]


def _kits(tmp_path, name="c1"):
    cons = tmp_path / f"{name}.yaml"
    cons.write_text(yaml.safe_dump({"name": name, "server": {"host": "127.0.0.1", "port": 50051}, "sites": SITES}))
    out = tmp_path / f"{name}-kits"
    provision(cons, out)
    return cons, out


class _Context:
    """What the hub reads of a call: the peer's certificate, as gRPC's auth context gives it."""

    def __init__(self, pem: bytes, name: str):
        self.pem, self.name = pem, name

    def auth_context(self):
        return {"x509_pem_cert": [self.pem], "x509_common_name": [self.name.encode()]}


def test_a_revoked_site_is_refused_at_its_next_call_without_a_restart(tmp_path, caplog):
    _, out = _kits(tmp_path)
    ca_pem = (out / "server" / "ca.crt").read_bytes()
    callers = Callers(frozenset(SITES), "job", Revocations(out / "server" / CRL_FILE, ca_pem))
    a = _Context((out / "hospital_a" / "participant.crt").read_bytes(), "hospital_a")
    b = _Context((out / "hospital_b" / "participant.crt").read_bytes(), "hospital_b")
    assert callers.identify(a)[0] == "hospital_a"  # no list yet: everyone of the job

    mine, listed, server_copy = revoke(out, "hospital_a")
    assert server_copy == out / "server" / CRL_FILE and (out / "ca" / CRL_FILE).is_file()
    assert [r.name for r in listed] == ["hospital_a"] and mine.serial == x509.load_pem_x509_certificate(a.pem).serial_number
    with pytest.raises(Refused) as e:
        callers.identify(a)
    assert e.value.code is grpc.StatusCode.PERMISSION_DENIED and "was revoked on" in str(e.value)
    assert callers.identify(b)[0] == "hospital_b"

    again, listed, _ = revoke(out, "hospital_a")  # idempotent: one entry, its first date
    assert again == mine and len(listed) == 1
    _, listed, _ = revoke(out, "hospital_b")
    assert {r.name for r in listed} == {"hospital_a", "hospital_b"}
    with pytest.raises(Refused, match="hospital_b"):
        callers.identify(b)

    # a damaged list later: logged, and the revocations read before stay in force
    (out / "server" / CRL_FILE).write_bytes(b"-----BEGIN X509 CRL-----\nbroken\n-----END X509 CRL-----\n")
    with caplog.at_level("ERROR", logger="medfed"), pytest.raises(Refused, match="revoked"):
        callers.identify(a)
    assert "stay in force" in caplog.text


def test_a_list_not_signed_by_the_consortium_ca_is_refused(tmp_path):
    _, out = _kits(tmp_path, "c1")
    _, other = _kits(tmp_path, "c2")
    revoke(other, "hospital_a")
    foreign = other / "ca" / CRL_FILE
    ca = x509.load_pem_x509_certificate((out / "ca" / "ca.crt").read_bytes())
    with pytest.raises(ValueError, match="not signed by the consortium's CA"):
        read_list(foreign, ca)
    (out / "server" / CRL_FILE).write_bytes(foreign.read_bytes())
    with pytest.raises(ConfigError, match="not signed by the consortium's CA"):
        Revocations(out / "server" / CRL_FILE, (out / "server" / "ca.crt").read_bytes())


def test_revoke_refuses_unknown_names_the_server_and_a_folder_without_ca(tmp_path):
    _, out = _kits(tmp_path)
    with pytest.raises(ConfigError, match="no kit named 'hospital_z'.*hospital_a, hospital_b"):
        revoke(out, "hospital_z")
    with pytest.raises(ConfigError, match="--revoke server"):
        revoke(out, "server")
    with pytest.raises(ConfigError, match="has no CA"):
        revoke(tmp_path / "nowhere", "hospital_a")


def test_medfed_provision_revoke(tmp_path):
    cons, out = _kits(tmp_path)
    res = CliRunner().invoke(app, ["provision", str(cons), "--revoke", "hospital_b"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "revoked: site hospital_b" in text and "revoked.crl.pem" in "".join(res.output.split())
    assert [r.name for r in read_list(out / "server" / CRL_FILE,
                                      x509.load_pem_x509_certificate((out / "ca" / "ca.crt").read_bytes()))] == [
        "hospital_b"]
    res = CliRunner().invoke(app, ["provision", str(cons), "--revoke", "nobody"])
    assert res.exit_code == 2 and "no kit named 'nobody'" in res.output
