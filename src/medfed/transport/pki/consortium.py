"""The consortium file (``medfed provision``'s input): its schema and its loader, and the
names the output folder reserves beside the kits."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, ValidationError, field_validator

from medfed.config import SiteName, describe_error, read_yaml, unique_names
from medfed.core.errors import ConfigError
from medfed.core.schema import Count, Frozen
from medfed.transport.pki.certificates import is_ip

SERVER_NAME = "server"  # the server kit's name and folder
ADMIN_NAME = "admin"  # the admin kit a consortium file without ``admins`` gets
CA_DIR = "ca"
LEDGER = "consortium.json"
# Kit folders sit next to these in the output folder, so no site may take their names.
RESERVED_NAMES = {SERVER_NAME, CA_DIR, LEDGER}

_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class ServerAddress(Frozen):
    """Where the sites reach the server: a DNS name or an IP address, and a TCP port."""

    host: str
    port: Count = Field(ge=1, le=65535)

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        if is_ip(v):
            return v
        labels = v.split(".")
        if len(v) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
            raise ValueError(f"must be a DNS name (e.g. fl.example.org) or an IP address, got {v!r}")
        return v


class Consortium(Frozen):
    """A consortium file: its name, the server's address, the sites, the admins, and how
    long kits last.

    ``admins`` name the admin kits: who submits and manages the jobs of a queue server
    (``medfed submit``, ``medfed jobs``); ``[]`` issues none. Left out, it is ``[admin]``
    (none when a site is named ``admin``: a file written before admins existed still
    provisions as it did, plus the admin kit). An admin's certificate carries the admin
    role, never a site's, and its name is no site's.
    ``validity_days`` (default 365, 1..3650) is the lifetime of the kits' certificates.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")
    server: ServerAddress
    sites: list[SiteName] = Field(min_length=1)
    admins: list[SiteName] | None = None
    validity_days: Count = Field(365, ge=1, le=3650)

    @field_validator("sites")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        unique_names(v, "site names")
        folded: dict[str, str] = {}
        for n in v:
            if n in RESERVED_NAMES:
                raise ValueError(f"'{n}' is reserved (a file or folder of the output) and cannot name a site")
            # Each site gets a folder: on case-insensitive file systems (macOS, Windows)
            # 'A' and 'a' would be one folder.
            if n.lower() in folded:
                raise ValueError(f"site names must differ by more than case, '{folded[n.lower()]}' and '{n}'")
            folded[n.lower()] = n
        return v

    @field_validator("admins")
    @classmethod
    def _admins(cls, v: list[str] | None, info) -> list[str] | None:
        if v is None:
            return v
        unique_names(v, "admin names")
        sites = {s.lower() for s in info.data.get("sites") or []}
        for n in v:
            if n in RESERVED_NAMES:
                raise ValueError(f"'{n}' is reserved (a file or folder of the output) and cannot name an admin")
            if n.lower() in sites:  # one folder per kit, and an admin is never a site
                raise ValueError(f"'{n}' names a site too; an admin's name must be no site's")
        return v

    @property
    def admin_kits(self) -> list[str]:
        """The admins that get a kit: ``admins``, or by default ``admin`` unless a site has that name."""
        if self.admins is not None:
            return list(self.admins)
        return [] if ADMIN_NAME.lower() in {s.lower() for s in self.sites} else [ADMIN_NAME]


def load_consortium(path: str | Path) -> Consortium:
    """Read and validate a YAML consortium file. Raises ConfigError naming the file and field."""
    path = Path(path)
    raw = read_yaml(path, "consortium file")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a consortium file must be a mapping of fields, got {type(raw).__name__}")
    try:
        return Consortium.model_validate(raw)
    except ValidationError as e:
        lines = [describe_error(err) for err in e.errors()]
        raise ConfigError(f"{path}: invalid consortium file\n  " + "\n  ".join(lines)) from None
