"""Sealed messages (transport/pki/sealing.py): a model one site sends others through the
server, which can neither read nor alter it."""

from __future__ import annotations

import base64
import dataclasses

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from deploy_kits import make_kits
from medfed.core.errors import ConfigError
from medfed.transport.pki import load_kit
from medfed.transport.pki.sealing import Envelope, Label, SealError, Sealer, plain


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    folder, _ = make_kits(tmp_path_factory.mktemp("kits"))
    other, _ = make_kits(tmp_path_factory.mktemp("other"))  # another consortium, another CA
    return folder, other


def _sealer(folder, name):
    k = load_kit(folder / name, role="site")
    return Sealer(k.name, k.key_pem, k.cert_pem, k.ca_pem)


def _der(folder, name):
    pem = load_kit(folder / name, role="site").cert_pem
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


LABEL = Label("job1", 3, "trained", "hospital_a", 120)
PAYLOAD = b"model bytes " * 1000


@pytest.fixture(scope="module")
def sealed(kits):
    folder, _ = kits
    a = _sealer(folder, "hospital_a")
    env = a.seal(PAYLOAD, LABEL, {"hospital_b": _der(folder, "hospital_b"), "hospital_c": _der(folder, "hospital_c")})
    return env


def test_each_recipient_opens_what_was_sealed_for_it(kits, sealed):
    folder, _ = kits
    for name in ("hospital_b", "hospital_c"):
        assert _sealer(folder, name).open(sealed, LABEL) == PAYLOAD
    assert PAYLOAD[:32] not in sealed.ciphertext  # the relay sees no plain text
    with pytest.raises(SealError, match="not sealed for this site"):
        _sealer(folder, "hospital_a").open(sealed, LABEL)


def test_the_wire_form_round_trips(kits, sealed):
    folder, _ = kits
    back = Envelope.parse(sealed.to_wire(), "test", 1 << 20)
    assert back == sealed
    assert _sealer(folder, "hospital_b").open(back, LABEL) == PAYLOAD


def _flip(b: bytes, i: int = 0) -> bytes:
    return b[:i] + bytes([b[i] ^ 1]) + b[i + 1:]


@pytest.mark.parametrize("change,why", [
    (lambda e: dataclasses.replace(e, ciphertext=_flip(e.ciphertext, 100)), "signature does not verify"),
    (lambda e: dataclasses.replace(e, nonce=_flip(e.nonce)), "signature does not verify"),
    (lambda e: dataclasses.replace(e, ephemeral=_flip(e.ephemeral, 30)), "signature does not verify"),
    (lambda e: dataclasses.replace(e, keys={**e.keys, "hospital_b": _flip(e.keys["hospital_b"])}),
     "signature does not verify"),
    (lambda e: dataclasses.replace(e, signature=_flip(e.signature, 10)), "signature does not verify"),
    (lambda e: dataclasses.replace(e, label=dataclasses.replace(e.label, num_examples=10_000)),
     "signature does not verify"),
    (lambda e: dataclasses.replace(e, label=dataclasses.replace(e.label, round=4)), "replayed or redirected"),
    (lambda e: dataclasses.replace(e, recipients=("hospital_b",), keys={"hospital_b": e.keys["hospital_b"]}),
     "signature does not verify"),
], ids=["ciphertext", "nonce", "ephemeral", "wrapped-key", "signature", "examples", "round", "recipients"])
def test_any_change_on_the_way_is_refused(kits, sealed, change, why):
    folder, _ = kits
    with pytest.raises(SealError, match=why):
        _sealer(folder, "hospital_b").open(change(sealed), dataclasses.replace(LABEL, round=sealed.label.round))


def test_a_message_for_another_round_purpose_or_sender_is_refused(kits, sealed):
    b = _sealer(kits[0], "hospital_b")
    for expect in (dataclasses.replace(LABEL, round=4), dataclasses.replace(LABEL, purpose="merged"),
                   dataclasses.replace(LABEL, sender="hospital_c"), dataclasses.replace(LABEL, job_id="job2")):
        with pytest.raises(SealError, match="replayed or redirected"):
            b.open(sealed, expect)


def test_a_certificate_swapped_for_another_sites_is_refused(kits, sealed):
    folder, _ = kits
    swapped = dataclasses.replace(sealed, cert=_der(folder, "hospital_c"))
    with pytest.raises(SealError, match="names 'hospital_c', not 'hospital_a'"):
        _sealer(folder, "hospital_b").open(swapped, LABEL)


def test_another_consortiums_site_can_neither_be_sealed_for_nor_send(kits, sealed):
    folder, other = kits
    a = _sealer(folder, "hospital_a")
    with pytest.raises(SealError, match="not issued by this consortium's CA"):
        a.seal(PAYLOAD, LABEL, {"hospital_b": _der(other, "hospital_b")})
    foreign = _sealer(other, "hospital_a").seal(PAYLOAD, LABEL, {"hospital_b": _der(other, "hospital_b")})
    with pytest.raises(SealError, match="not issued by this consortium's CA"):
        _sealer(folder, "hospital_b").open(foreign, LABEL)


def test_an_unsealed_message_is_refused_where_sites_have_kits(kits):
    with pytest.raises(SealError, match="not sealed"):
        _sealer(kits[0], "hospital_b").open(plain(PAYLOAD, LABEL, ["hospital_b"]), LABEL)


def test_a_site_seals_only_under_its_own_name_and_for_named_recipients(kits):
    a = _sealer(kits[0], "hospital_a")
    with pytest.raises(SealError, match="as site 'hospital_b'"):
        a.seal(PAYLOAD, dataclasses.replace(LABEL, sender="hospital_b"), {"hospital_c": _der(kits[0], "hospital_c")})
    with pytest.raises(SealError, match="names 'hospital_c', not 'hospital_b'"):  # a certificate under a wrong name
        a.seal(PAYLOAD, LABEL, {"hospital_b": _der(kits[0], "hospital_c")})
    with pytest.raises(SealError, match="at least one recipient"):
        a.seal(PAYLOAD, LABEL, {})


def test_a_kit_whose_certificate_names_another_site_is_refused(kits):
    k = load_kit(kits[0] / "hospital_a", role="site")
    with pytest.raises(ConfigError, match="names"):
        Sealer("hospital_b", k.key_pem, k.cert_pem, k.ca_pem)


def test_malformed_wire_forms_are_refused_naming_the_field(sealed):
    wire = sealed.to_wire()
    with pytest.raises(SealError, match="larger than 10 bytes"):
        Envelope.parse(wire, "test", 10)
    with pytest.raises(SealError, match="'label'"):
        Envelope.parse({**wire, "label": ["job1", -1, "x", "a", 0]}, "test", 1 << 20)
    with pytest.raises(SealError, match="'keys'"):
        Envelope.parse({**wire, "keys": {}}, "test", 1 << 20)
    with pytest.raises(SealError, match="'nonce'"):
        Envelope.parse({**wire, "nonce": base64.b64encode(b"x" * 64).decode()}, "test", 1 << 20)
    with pytest.raises(SealError, match="not a sealed message"):
        Envelope.parse({"v": "other"}, "test", 1 << 20)
