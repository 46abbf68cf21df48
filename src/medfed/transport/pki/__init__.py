"""The consortium's certificate authority and its startup kits (``medfed provision``).

One person, the consortium's coordinator, runs ``medfed provision`` on a consortium file.
It creates a certificate authority (CA) and one *kit* per participant: the server and each
site. A kit is a folder holding the CA certificate, the participant's certificate and
private key, a ``kit.json`` that says who it is and where the server is, and a
``start.sh``. The kits are copied to the participants; ``medfed server --kit`` and
``medfed site --kit`` read them with :func:`load_kit` and talk over mutual TLS, where each
side checks that the other's certificate was issued by the consortium's CA.

Keys are ECDSA P-256, signatures SHA-256. Private keys are written unencrypted (PKCS#8
PEM) with mode 0600, in folders with mode 0700: a kit is protected by where it is kept.

Layout of the output folder::

    ca/ca.crt  ca/ca.key        the CA (keep ca/ offline: it can issue new kits)
    consortium.json             what was issued: per participant name, role, serial, expiry
    server/                     the server's kit
    <site>/                     one kit per site
    admin/                      the admin kit (``admins`` in the consortium file): submits
                                and manages the jobs of a queue server (``medfed server --queue``)

Re-running on the same folder reuses the CA and only creates the kits that are missing;
existing kits are never rewritten. To reissue a kit (lost, expired), delete its folder and
re-run.

The package, one module per concern (every public name is importable from here):

* ``consortium.py``   the consortium file: its schema and :func:`load_consortium`
* ``certificates.py`` the CA and the certificates it issues; fingerprints
* ``kits.py``         a kit's files, and :func:`load_kit`, which reads and checks a kit folder
* ``provisioning.py`` :func:`provision`: the output folder's CA, the kits, ``consortium.json``
* ``revocation.py``   ``medfed provision --revoke``: the CA-signed revocation list, and the
  server's :class:`~.revocation.Revocations`, read again when the file changes
"""

from __future__ import annotations

from medfed.transport.pki.certificates import (
    ADMIN_URI_PREFIX,
    CA_DAYS,
    CLOCK_SKEW,
    SITE_URI_PREFIX,
    common_name,
    create_ca,
    fingerprint,
    issue_certificate,
)
from medfed.transport.pki.consortium import (
    ADMIN_NAME,
    CA_DIR,
    LEDGER,
    RESERVED_NAMES,
    SERVER_NAME,
    Consortium,
    ServerAddress,
    load_consortium,
)
from medfed.transport.pki.kits import KIT_FILES, KIT_VERSION, Kit, Role, load_kit
from medfed.transport.pki.provisioning import (
    IssuedKit,
    ProvisionResult,
    default_out_dir,
    provision,
)

__all__ = [
    "ADMIN_NAME",
    "ADMIN_URI_PREFIX",
    "CA_DAYS",
    "CA_DIR",
    "CLOCK_SKEW",
    "KIT_FILES",
    "KIT_VERSION",
    "LEDGER",
    "RESERVED_NAMES",
    "SERVER_NAME",
    "SITE_URI_PREFIX",
    "Consortium",
    "IssuedKit",
    "Kit",
    "ProvisionResult",
    "Role",
    "ServerAddress",
    "common_name",
    "create_ca",
    "default_out_dir",
    "fingerprint",
    "issue_certificate",
    "load_consortium",
    "load_kit",
    "provision",
]
