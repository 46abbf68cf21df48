"""Who may call a queue server's admin service, and who may take part as a site
(transport/grpc/auth.py): the role a certificate carries decides, and revocation applies to
an admin kit as to a site's."""

from __future__ import annotations

import grpc
import pytest

from deploy_kits import make_kits
from medfed.transport.grpc.auth import Callers, identify_admin
from medfed.transport.grpc.guard import Refused
from medfed.transport.pki.certificates import common_name
from medfed.transport.pki.revocation import CRL_FILE, Revocations, revoke


class _Context:
    """What the hub reads of a gRPC call: the client certificate TLS verified."""

    def __init__(self, pem: bytes):
        self._auth = {"x509_pem_cert": [pem], "x509_common_name": [common_name(pem).encode()]}

    def auth_context(self):
        return self._auth


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    folder, _ = make_kits(tmp_path_factory.mktemp("admin"), sites=("hospital_a",))
    return folder


def _pem(kits, name: str) -> bytes:
    return (kits / name / "participant.crt").read_bytes()


def test_only_an_admin_certificate_may_manage_jobs(kits):
    name, fingerprint = identify_admin(_Context(_pem(kits, "admin")), None)
    assert name == "admin" and len(fingerprint) == 64
    with pytest.raises(Refused, match=r"'hospital_a' has the site role, not the admin role") as e:
        identify_admin(_Context(_pem(kits, "hospital_a")), None)
    assert e.value.code is grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(Refused, match=r"has the unknown role"):  # the server's own certificate is no admin's
        identify_admin(_Context(_pem(kits, "server")), None)


def test_an_admin_certificate_never_takes_part_as_a_site(kits):
    callers = Callers(frozenset({"hospital_a", "admin"}), "job")  # even a job naming a site 'admin'
    with pytest.raises(Refused, match=r"'admin' is an admin certificate \(role admin\), not a site certificate"):
        callers.identify(_Context(_pem(kits, "admin")))
    assert callers.identify(_Context(_pem(kits, "hospital_a")))[0] == "hospital_a"


def test_a_revoked_admin_kit_is_refused(tmp_path):
    kits, _ = make_kits(tmp_path, sites=("hospital_a",))
    revoke(kits, "admin")
    revocations = Revocations(kits / "server" / CRL_FILE, (kits / "ca" / "ca.crt").read_bytes())
    with pytest.raises(Refused, match=r"the certificate of admin 'admin' \(serial [0-9a-f]+\) was revoked on"):
        identify_admin(_Context(_pem(kits, "admin")), revocations)
