"""The consortium's CA and startup kits: provisioning, re-provisioning, reading a kit."""

import datetime as dt
import ipaddress
import json
import os
import stat
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from medfed.cli import app
from medfed.core.errors import ConfigError
from medfed.transport.pki import (
    common_name,
    create_ca,
    fingerprint,
    issue_certificate,
    load_consortium,
    load_kit,
    provision,
)

posix_only = pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")

KIT_FILES = {"ca.crt", "participant.crt", "participant.key", "kit.json", "start.sh", "README.txt"}


def _consortium(tmp_path: Path, file="cons.yaml", **overrides) -> Path:
    body = {
        "name": "prostate",
        "server": {"host": "fl.example.org", "port": 8443},
        "sites": ["hospital_a", "hospital_b"],
        **overrides,
    }
    path = tmp_path / file
    path.write_text(yaml.safe_dump(body))
    return path


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _cert(p: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(p.read_bytes())


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.fixture(scope="module")
def kits(tmp_path_factory) -> Path:
    """One provisioned folder shared by the read-only tests (provisioning costs key generation)."""
    tmp = tmp_path_factory.mktemp("pki")
    result = provision(_consortium(tmp), tmp / "out")
    assert result.created == ["server", "hospital_a", "hospital_b", "admin"]  # admins: [admin] by default
    return tmp / "out"


# --------------------------------------------------------------------------- provisioning


def test_layout_and_modes(kits):
    assert (kits / "ca" / "ca.crt").is_file() and (kits / "ca" / "ca.key").is_file()
    assert (kits / "consortium.json").is_file()
    for name in ("server", "hospital_a", "hospital_b"):
        assert {p.name for p in (kits / name).iterdir()} == KIT_FILES
    assert not [p for p in kits.iterdir() if p.name.startswith(".")]  # no temp files or partial kits left
    if os.name == "posix":
        assert _mode(kits / "ca") == 0o700
        assert _mode(kits / "ca" / "ca.key") == 0o600
        for name in ("server", "hospital_a", "hospital_b"):
            assert _mode(kits / name) == 0o700
            assert _mode(kits / name / "participant.key") == 0o600
            assert _mode(kits / name / "start.sh") == 0o755


def test_ca_certificate(kits):
    ca = _cert(kits / "ca" / "ca.crt")
    assert ca.subject == ca.issuer
    ca.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign


def test_certificates_names_and_usages(kits):
    ca = _cert(kits / "ca" / "ca.crt")
    server = _cert(kits / "server" / "participant.crt")
    server.verify_directly_issued_by(ca)
    assert common_name((kits / "server" / "participant.crt").read_bytes()) == "fl.example.org"
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org"]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]

    for site in ("hospital_a", "hospital_b"):
        cert = _cert(kits / site / "participant.crt")
        cert.verify_directly_issued_by(ca)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == site
        assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "prostate"
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"urn:medfed:site:{site}"]
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert (kits / site / "ca.crt").read_bytes() == (kits / "ca" / "ca.crt").read_bytes()
        days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
        assert 364 <= days <= 366


def test_kit_json_start_script_and_ledger(kits):
    info = json.loads((kits / "hospital_a" / "kit.json").read_text())
    assert info == {
        "consortium": "prostate", "name": "hospital_a", "role": "site",
        "server_host": "fl.example.org", "server_port": 8443, "medfed_kit_version": 1,
    }
    assert 'medfed site --kit "$(dirname "$0")" --data "${1:?usage: start.sh SITE_DATA.yaml}"' in (
        kits / "hospital_a" / "start.sh"
    ).read_text()
    assert 'medfed server --kit "$(dirname "$0")" --job "${1:?usage: start.sh JOB.yaml}"' in (
        kits / "server" / "start.sh"
    ).read_text()
    assert "private" in (kits / "server" / "README.txt").read_text().lower()

    ledger = json.loads((kits / "consortium.json").read_text())
    assert ledger["consortium"] == "prostate"
    assert ledger["server"] == {"host": "fl.example.org", "port": 8443}
    rows = {p["name"]: p for p in ledger["participants"]}
    assert set(rows) == {"server", "hospital_a", "hospital_b", "admin"}
    pem = (kits / "hospital_b" / "participant.crt").read_bytes()
    assert rows["hospital_b"]["sha256"] == fingerprint(pem)
    assert int(rows["hospital_b"]["serial"], 16) == x509.load_pem_x509_certificate(pem).serial_number
    assert rows["server"]["role"] == "server"


def test_the_admin_kit_carries_the_admin_role_and_no_site_name(kits):
    admin = load_kit(kits / "admin", role="admin")
    assert (admin.name, admin.role) == ("admin", "admin")
    cert = _cert(kits / "admin" / "participant.crt")
    uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier)
    assert uris == ["urn:medfed:admin:admin"]  # no urn:medfed:site: URI: never taken for a site
    assert ExtendedKeyUsageOID.CLIENT_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    with pytest.raises(ConfigError, match=r"kit of site 'hospital_a'.*needs an admin kit"):
        load_kit(kits / "hospital_a", role="admin")
    with pytest.raises(ConfigError, match=r"kit of admin 'admin'.*`medfed site` needs a site kit"):
        load_kit(kits / "admin", role="site")


def test_admin_names_in_the_consortium_file(tmp_path):
    cons = load_consortium(_consortium(tmp_path, admins=["ops", "lead"]))
    assert cons.admin_kits == ["ops", "lead"]
    assert load_consortium(_consortium(tmp_path, admins=[])).admin_kits == []
    # a file from before admins existed, with a site named admin, provisions as it did
    assert load_consortium(_consortium(tmp_path, sites=["admin", "b"])).admin_kits == []
    with pytest.raises(ConfigError, match=r"admins.*'hospital_a' names a site too"):
        load_consortium(_consortium(tmp_path, admins=["hospital_a"]))


def test_load_kit_round_trip(kits):
    kit = load_kit(kits / "hospital_b", role="site")
    assert (kit.name, kit.role, kit.consortium) == ("hospital_b", "site", "prostate")
    assert (kit.server_host, kit.server_port) == ("fl.example.org", 8443)
    assert kit.cert_pem == (kits / "hospital_b" / "participant.crt").read_bytes()
    assert kit.key_pem == (kits / "hospital_b" / "participant.key").read_bytes()
    assert kit.ca_pem == (kits / "ca" / "ca.crt").read_bytes()
    server = load_kit(kits / "server", role="server")
    assert server.name == "server" and server.role == "server"
    assert load_kit(kits / "server").role == "server"  # role None accepts either


def test_server_san_is_ip_for_an_ip_host(tmp_path):
    provision(_consortium(tmp_path, server={"host": "127.0.0.1", "port": 50051}, sites=["a"]), tmp_path / "out")
    cert = _cert(tmp_path / "out" / "server" / "participant.crt")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == []
    assert load_kit(tmp_path / "out" / "server", role="server").server_host == "127.0.0.1"


def test_default_output_folder(tmp_path):
    result = provision(_consortium(tmp_path, sites=["a"]))
    assert result.out_dir == tmp_path / "prostate-kits"
    assert (tmp_path / "prostate-kits" / "a" / "kit.json").is_file()


def test_reprovision_adds_only_the_new_site(tmp_path):
    out = tmp_path / "out"
    provision(_consortium(tmp_path, sites=["a", "b"]), out)
    before = {name: _snapshot(out / name) for name in ("ca", "server", "a", "b")}

    result = provision(_consortium(tmp_path, sites=["a", "b", "c"]), out)
    assert result.created == ["c"]
    assert result.kept == ["server", "a", "b", "admin"]
    assert not result.ca_created
    for name, files in before.items():
        assert _snapshot(out / name) == files, name
    load_kit(out / "c", role="site")
    _cert(out / "c" / "participant.crt").verify_directly_issued_by(_cert(out / "ca" / "ca.crt"))
    ledger = json.loads((out / "consortium.json").read_text())
    assert [p["name"] for p in ledger["participants"]] == ["server", "a", "b", "c", "admin"]


def test_reprovision_keeps_a_removed_site_and_says_it_is_not_revoked(tmp_path):
    out = tmp_path / "out"
    provision(_consortium(tmp_path, sites=["a", "b"]), out)
    before = _snapshot(out / "b")
    result = provision(_consortium(tmp_path, sites=["a"]), out)
    assert result.created == [] and result.removed == ["b"]
    assert _snapshot(out / "b") == before
    assert any("'b'" in n and "not revoked" in n.lower() for n in result.notes)


def test_changed_server_host_is_refused(tmp_path):
    out = tmp_path / "out"
    provision(_consortium(tmp_path), out)
    with pytest.raises(ConfigError, match=r"server\.host.*other\.example\.org.*fl\.example\.org.*new output folder"):
        provision(_consortium(tmp_path, server={"host": "other.example.org", "port": 8443}), out)
    with pytest.raises(ConfigError, match=r"server\.port"):
        provision(_consortium(tmp_path, server={"host": "fl.example.org", "port": 9000}), out)
    with pytest.raises(ConfigError, match=r"name is 'other'.*'prostate'"):
        provision(_consortium(tmp_path, name="other"), out)
    assert json.loads((out / "consortium.json").read_text())["server"]["host"] == "fl.example.org"


def test_a_folder_that_is_not_a_kit_is_not_overwritten(tmp_path):
    out = tmp_path / "out"
    (out / "a").mkdir(parents=True)
    (out / "a" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"not a medfed kit.*move it away"):
        provision(_consortium(tmp_path, sites=["a"]), out)
    assert (out / "a" / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------- load_kit errors


@pytest.fixture
def kit_copy(kits, tmp_path) -> Path:
    """A private copy of the site kit of hospital_a, to damage."""
    dst = tmp_path / "hospital_a"
    dst.mkdir(mode=0o700)
    for p in (kits / "hospital_a").iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    os.chmod(dst / "participant.key", 0o600)
    return dst


def test_load_kit_wrong_role(kits):
    with pytest.raises(ConfigError, match=r"site kit.*`medfed server` needs the server kit"):
        load_kit(kits / "hospital_a", role="server")
    with pytest.raises(ConfigError, match=r"server kit.*`medfed site` needs a site kit"):
        load_kit(kits / "server", role="site")


@posix_only
def test_load_kit_key_readable_by_others(kit_copy):
    os.chmod(kit_copy / "participant.key", 0o644)
    with pytest.raises(ConfigError, match=r"participant\.key.*0644.*chmod 600"):
        load_kit(kit_copy, role="site")


def test_load_kit_certificate_from_another_ca(kit_copy):
    other_ca, other_key = create_ca("other", 30)
    cert, key = issue_certificate(other_ca, other_key, "hospital_a", "site", consortium="prostate")
    (kit_copy / "participant.crt").write_bytes(cert)
    with pytest.raises(ConfigError, match=r"participant\.crt was not signed by the kit's CA"):
        load_kit(kit_copy, role="site")


def test_load_kit_expired_certificate(kits, kit_copy):
    now = dt.datetime.now(dt.timezone.utc)
    cert, key = issue_certificate(
        (kits / "ca" / "ca.crt").read_bytes(), (kits / "ca" / "ca.key").read_bytes(), "hospital_a", "site",
        not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1), consortium="prostate",
    )
    (kit_copy / "participant.crt").write_bytes(cert)
    (kit_copy / "participant.key").write_bytes(key)
    expected = (now - dt.timedelta(days=1)).strftime("%Y-%m-%d")
    with pytest.raises(ConfigError, match=rf"expired on {expected}"):
        load_kit(kit_copy, role="site")


def test_load_kit_not_yet_valid(kits, kit_copy):
    now = dt.datetime.now(dt.timezone.utc)
    cert, key = issue_certificate(
        (kits / "ca" / "ca.crt").read_bytes(), (kits / "ca" / "ca.key").read_bytes(), "hospital_a", "site",
        not_before=now + dt.timedelta(days=2), not_after=now + dt.timedelta(days=10),
    )
    (kit_copy / "participant.crt").write_bytes(cert)
    (kit_copy / "participant.key").write_bytes(key)
    with pytest.raises(ConfigError, match=r"not valid yet.*clock"):
        load_kit(kit_copy, role="site")


def test_load_kit_key_does_not_match(kits, kit_copy):
    (kit_copy / "participant.key").write_bytes((kits / "hospital_b" / "participant.key").read_bytes())
    with pytest.raises(ConfigError, match=r"participant\.key is not the key of participant\.crt"):
        load_kit(kit_copy, role="site")


def test_load_kit_name_differs_from_certificate(kits, kit_copy):
    info = json.loads((kit_copy / "kit.json").read_text())
    (kit_copy / "kit.json").write_text(json.dumps({**info, "name": "hospital_z"}))
    with pytest.raises(ConfigError, match=r"issued to 'hospital_a'.*'hospital_z'"):
        load_kit(kit_copy, role="site")


def test_load_kit_missing_file_and_folder(kit_copy, tmp_path):
    (kit_copy / "participant.key").unlink()
    with pytest.raises(ConfigError, match=rf"{kit_copy.name}.*has no participant\.key"):
        load_kit(kit_copy)
    with pytest.raises(ConfigError, match=r"not found"):
        load_kit(tmp_path / "nowhere")


def test_load_kit_malformed_kit_json(kit_copy):
    (kit_copy / "kit.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"kit\.json is not valid JSON"):
        load_kit(kit_copy)
    (kit_copy / "kit.json").write_text(json.dumps({"name": "x", "role": "boss"}))
    with pytest.raises(ConfigError, match=r"kit\.json is invalid[\s\S]*role"):
        load_kit(kit_copy)


# --------------------------------------------------------------------------- consortium file


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        ({"sites": ["a", "b", "a"]}, r"sites: site names must be unique, 'a' appears twice"),
        ({"sites": ["a", "A"]}, r"differ by more than case"),
        ({"sites": []}, r"sites: must have at least 1"),
        ({"sites": ["server"]}, r"'server' is reserved"),
        ({"sites": ["bad name"]}, r"sites\[0\]"),
        ({"server": {"host": "fl.example.org", "port": 70000}}, r"server\.port: must be <= 65535, got 70000"),
        ({"server": {"host": "fl.example.org", "port": 0}}, r"server\.port: must be >= 1"),
        ({"server": {"host": "bad host!", "port": 8443}}, r"server\.host: .*DNS name"),
        ({"name": "no spaces please"}, r"name: must match"),
        ({"validity_days": 0}, r"validity_days: must be >= 1"),
        ({"colour": "red"}, r"colour: is not a known field"),
    ],
)
def test_consortium_validation(tmp_path, overrides, pattern):
    path = _consortium(tmp_path, **overrides)
    with pytest.raises(ConfigError, match=pattern) as info:
        load_consortium(path)
    assert str(path) in str(info.value)


def test_consortium_file_missing_or_not_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"not found"):
        load_consortium(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match=r"not valid YAML"):
        load_consortium(bad)


def test_consortium_accepts_ipv6_and_defaults(tmp_path):
    cons = load_consortium(_consortium(tmp_path, server={"host": "::1", "port": 1}))
    assert cons.server.host == "::1" and cons.validity_days == 365


# --------------------------------------------------------------------------- CLI


def test_cli_provision(tmp_path):
    runner = CliRunner()
    path = _consortium(tmp_path, sites=["a"])
    res = runner.invoke(app, ["provision", str(path), "--out", str(tmp_path / "kits")])
    assert res.exit_code == 0, res.output
    assert "created" in res.output and "secure channel" in res.output and "offline" in res.output
    assert (tmp_path / "kits" / "a" / "participant.key").is_file()

    res = runner.invoke(app, ["provision", str(path), "--out", str(tmp_path / "kits")])
    assert res.exit_code == 0, res.output
    assert "kept" in res.output


def test_cli_provision_bad_file(tmp_path):
    runner = CliRunner()
    path = _consortium(tmp_path, sites=["a", "a"])
    res = runner.invoke(app, ["provision", str(path)])
    assert res.exit_code == 2
    assert "appears twice" in res.output
    assert "Traceback" not in res.output
