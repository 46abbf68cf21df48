"""What a model is made of, without its values: the entries of its state dict (name, shape,
dtype) and their fingerprint. A deployed site sends the description of the model it built
with its ready message; the server compares it with its own before round 1 and leaves out
a site that built another one, naming the first difference.

Code never travels: a job names a network (``model: {import: "pkg.mod:factory"}``, a MONAI
class, one of medfed's), and each site builds it from the code installed there. Two sites
with different versions of that code can build models of other shapes, or the same shapes
that mean other things; the fingerprint catches the first case before any round is spent.

The fingerprint is the SHA-256 of one line per entry, ``"<name> <shape> <dtype>"`` with the
shape as a Python tuple and the dtype as torch prints it (``"head.weight (2, 64)
torch.float32"``), in state-dict order: the same as :func:`medfed.models.model_fingerprint`.
This module does not import torch: :meth:`ModelSpec.of` reads ``.shape`` and ``.dtype`` of
whatever the state dict holds.

On the wire (JSON)::

    {"fingerprint": "<64 hex>", "entries": [["features.0.weight", [16, 1, 3, 3], "float32"], ...]}

``entries`` is null when the list would pass :data:`WIRE_BUDGET` bytes (a model of many
thousands of entries): the fingerprints are compared, the first difference cannot be named.
What a site sends is untrusted: :meth:`ModelSpec.from_wire` checks every field and bound.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from medfed.core.errors import CodecError

MAX_ENTRIES = 100_000  # entries a description may list (a large transformer has a few thousand)
MAX_NAME = 512  # characters of an entry's name
MAX_DIMS = 8  # dimensions of an entry's shape
MAX_DIM = (1 << 31) - 1  # the largest size of one dimension
WIRE_BUDGET = 512 << 10  # bytes of JSON the entries may take: half the 1 MiB a ready message may hold
DTYPES = frozenset({
    "float64", "float32", "float16", "bfloat16", "complex128", "complex64", "complex32",
    "int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8", "bool",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
    "qint8", "quint8", "qint32", "quint4x2", "quint2x4",
})  # torch's dtypes by name (without "torch.")
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class SpecEntry:
    """One entry of a state dict: its ``name``, ``shape`` and ``dtype`` (torch's name
    without ``torch.``: ``float32``)."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def line(self) -> str:
        """The entry's line of the fingerprint: ``"head.weight (2, 64) torch.float32"``."""
        return f"{self.name} {self.shape} torch.{self.dtype}"


def fingerprint_of(entries: Sequence[SpecEntry]) -> str:
    """SHA-256 (hex) of the entries' lines, in order (see the module's docstring)."""
    return hashlib.sha256("\n".join(e.line() for e in entries).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ModelSpec:
    """A model's description: its ``fingerprint`` and its ``entries`` in state-dict order
    (None when a site sent only the fingerprint, its list being too long to send)."""

    fingerprint: str
    entries: tuple[SpecEntry, ...] | None

    @classmethod
    def of(cls, state: Mapping[str, Any]) -> ModelSpec:
        """The description of a state dict (``model.state_dict()``): its values need a
        ``.shape`` and a ``.dtype`` only."""
        entries = tuple(SpecEntry(str(k), tuple(int(d) for d in v.shape), str(v.dtype).removeprefix("torch."))
                        for k, v in state.items())
        return cls(fingerprint_of(entries), entries)

    def to_wire(self, budget: int = WIRE_BUDGET) -> dict[str, Any]:
        """The JSON object a site sends; without its entries (null) when they would take more
        than ``budget`` bytes."""
        listed = None if self.entries is None else [[e.name, list(e.shape), e.dtype] for e in self.entries]
        if listed is not None and len(json.dumps(listed, separators=(",", ":"))) > budget:
            listed = None
        return {"fingerprint": self.fingerprint, "entries": listed}

    @classmethod
    def from_wire(cls, obj: Any) -> ModelSpec:
        """A description a site sent, checked: the fields and only those, a fingerprint of
        64 hex digits that matches the entries, at most ``MAX_ENTRIES`` entries of distinct
        printable names of at most ``MAX_NAME`` characters, shapes of at most ``MAX_DIMS``
        integers in [0, ``MAX_DIM``], dtypes of :data:`DTYPES`. CodecError naming the field
        and what is wrong."""
        if not isinstance(obj, dict):
            raise CodecError(f"model: must be an object, got {_kind(obj)}")
        unknown = sorted(str(k) for k in obj if k not in ("fingerprint", "entries"))
        if unknown:
            raise CodecError(f"model: unknown field {unknown[0][:40]!r} (fields: fingerprint, entries)")
        fp = obj.get("fingerprint")
        if not isinstance(fp, str) or not _HEX64.fullmatch(fp):
            raise CodecError(f"model.fingerprint: must be 64 lower-case hex digits (SHA-256), got {_short(fp)}")
        raw = obj.get("entries")
        if raw is None:
            return cls(fp, None)
        if not isinstance(raw, list):
            raise CodecError(f"model.entries: must be a list or null, got {_kind(raw)}")
        if len(raw) > MAX_ENTRIES:
            raise CodecError(f"model.entries: {len(raw)} entries, at most {MAX_ENTRIES} are accepted")
        entries = tuple(_entry(x, i) for i, x in enumerate(raw))
        names = {e.name for e in entries}
        if len(names) < len(entries):
            seen: set[str] = set()
            twice = next(e.name for e in entries if e.name in seen or seen.add(e.name))
            raise CodecError(f"model.entries: entry {twice!r} is listed twice")
        if fingerprint_of(entries) != fp:
            raise CodecError("model.fingerprint: does not match the entries listed (they hash to "
                             f"{fingerprint_of(entries)[:12]}..., the fingerprint is {fp[:12]}...)")
        return cls(fp, entries)


def _entry(x: Any, i: int) -> SpecEntry:
    where = f"model.entries[{i}]"
    if not isinstance(x, list) or len(x) != 3:
        raise CodecError(f"{where}: must be [name, shape, dtype], got {_short(x)}")
    name, shape, dtype = x
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or not name.isprintable():
        raise CodecError(f"{where}: the name must be printable text of 1 to {MAX_NAME} characters, got {_short(name)}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise CodecError(f"{where} ({name!r}): the shape must be a list of at most {MAX_DIMS} sizes, "
                         f"got {_short(shape)}")
    if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in shape):
        raise CodecError(f"{where} ({name!r}): the shape's sizes must be integers in [0, {MAX_DIM}], "
                         f"got {_short(shape)}")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CodecError(f"{where} ({name!r}): dtype must be one of torch's ({', '.join(sorted(DTYPES))}), "
                         f"got {_short(dtype)}")
    return SpecEntry(name, tuple(shape), dtype)


def _kind(x: Any) -> str:
    return "null" if x is None else type(x).__name__


def _short(x: Any) -> str:
    """``x`` for an error message: its repr, cut to 60 characters."""
    text = repr(x)
    return text if len(text) <= 60 else text[:57] + "..."


# ------------------------------------------------------------------------------ comparing


def first_difference(theirs: ModelSpec, ours: ModelSpec) -> str | None:
    """How the model ``theirs`` (a site's) first differs from ``ours`` (the server's), in
    state-dict order, with the count of further differences; None when the fingerprints
    are equal. "There" is the site, "here" the server."""
    if theirs.fingerprint == ours.fingerprint:
        return None
    if theirs.entries is None or ours.entries is None:
        return "its fingerprint differs (its entries were too many to send, so the first difference is unknown)"
    a, b = theirs.entries, ours.entries
    by_name_a, by_name_b = {e.name: e for e in a}, {e.name: e for e in b}
    differences = ([_changed(by_name_a[n], by_name_b[n]) for n in by_name_b if n in by_name_a and
                    by_name_a[n] != by_name_b[n]]
                   + [f"entry '{n}' is missing there" for n in by_name_b if n not in by_name_a]
                   + [f"entry '{n}' is there but not here" for n in by_name_a if n not in by_name_b])
    first = None
    for i in range(max(len(a), len(b))):  # the first position at which they differ names it
        x, y = (a[i] if i < len(a) else None), (b[i] if i < len(b) else None)
        if x == y:
            continue
        if x is not None and y is not None and x.name == y.name:
            first = _changed(x, y)
        elif y is not None and y.name not in by_name_a:
            first = f"entry '{y.name}' is missing there"
        elif x is not None and x.name not in by_name_b:
            first = f"entry '{x.name}' is there but not here"
        else:
            first = (f"the entries come in another order (at position {i}: "
                     f"'{x.name if x else '-'}' there, '{y.name if y else '-'}' here)")
            differences.append(first)
        break
    if first is None:  # the same entries, yet not the same fingerprint: not produced by an honest site
        return "its fingerprint differs, with the same entries"
    more = len(differences) - 1
    return first + (f" ({more} more difference{'s' if more > 1 else ''})" if more > 0 else "")


def _changed(x: SpecEntry, y: SpecEntry) -> str:
    if x.shape != y.shape:
        return f"entry '{y.name}' has shape {x.shape} there and {y.shape} here"
    return f"entry '{y.name}' is {x.dtype} there and {y.dtype} here"


def model_mismatch(theirs: ModelSpec | None, ours: ModelSpec, hint: str) -> str | None:
    """Why a site whose model is described by ``theirs`` (None: it sent no description)
    cannot take part in a run of the model ``ours``, or None when it can. ``hint`` says
    what to do about a different model (which code to install where)."""
    if theirs is None:
        return ("it sent no description of the model it built (it runs an older medfed?): run the same medfed "
                "version at every site and the server")
    diff = first_difference(theirs, ours)
    if diff is None:
        return None
    return (f"it built a different model: {diff} (fingerprints {theirs.fingerprint[:12]}... there, "
            f"{ours.fingerprint[:12]}... here); {hint}")
