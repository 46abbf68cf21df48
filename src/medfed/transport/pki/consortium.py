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
    """A consortium file: its name, the server's address, the sites, and how long kits last.

    ``validity_days`` (default 365, 1..3650) is the lifetime of the kits' certificates.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")
    server: ServerAddress
    sites: list[SiteName] = Field(min_length=1)
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
