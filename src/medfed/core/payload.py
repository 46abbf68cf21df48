"""The payload format: groups of tensors and a JSON object in one safetensors blob.

Tensor names are prefixed by their group (``params/``, ``extras/``); the JSON travels in
the header's metadata. A payload is written into one buffer in one pass, and read back
with the same strict checks of the header as safetensors' own loader: as tensors of their
own, as views of the buffer (no copy), or, from a file, as :class:`FileTensors` read part
by part when used. core/codec.py maps medfed's typed messages onto this format.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, BinaryIO

import numpy as np
import torch

from medfed.core.buffers import BufferPool
from medfed.core.errors import CodecError
from medfed.core.tensors import PartedTensors
from medfed.core.types import Params

_META_KEY = "medfed"


def pack(groups: dict[str, Params], meta: dict[str, Any], pool: BufferPool | None = None) -> bytearray | memoryview:
    """The safetensors bytes of ``groups`` (names prefixed by their role) with ``meta`` as
    JSON in the header's metadata, written once into one buffer (from ``pool`` when given;
    no intermediate copies)."""
    entries = []
    for prefix, params in groups.items():
        for name, t in params.items():
            entries.append((f"{prefix}/{name}", t.detach().to("cpu").contiguous()))
    # largest elements first: every tensor then starts at a multiple of its element size
    # (the header is padded to 8 bytes), so a receiver can use the tensors in place
    entries.sort(key=lambda e: (-e[1].element_size(), e[0]))
    header: dict[str, Any] = {"__metadata__": {_META_KEY: json.dumps(meta)}}
    at = 0
    for key, t in entries:
        if t.dtype not in _DTYPE_NAMES:
            raise CodecError(f"tensor '{key}': dtype {t.dtype} cannot be sent")
        n = t.numel() * t.element_size()
        header[key] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [at, at + n]}
        at += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # tensors start 8-byte aligned
    base = 8 + len(raw)
    buf = pool.take(base + at) if pool is not None else bytearray(base + at)
    buf[:8] = len(raw).to_bytes(8, "little")
    buf[8:base] = raw
    out = np.frombuffer(buf, dtype=np.uint8)
    for key, t in entries:
        begin, end = header[key]["data_offsets"]
        if end > begin:
            out[base + begin : base + end] = t.reshape(-1).view(torch.uint8).numpy()
    return buf


def layout(view: memoryview, what: str) -> tuple[int, dict[str, Any], dict[str, dict[str, tuple]]]:
    """(where the data starts, metadata, tensors by prefix) of a payload, or CodecError."""
    try:
        if len(view) < 8:
            raise ValueError(f"{len(view)} bytes cannot hold a header")
        n = int.from_bytes(view[:8], "little")
        if not 0 < n <= min(_MAX_FILE_HEADER, len(view) - 8):
            raise ValueError(f"header length {n} does not fit a {len(view)}-byte payload")
        meta, entries = _parse_header(bytes(view[8 : 8 + n]), len(view) - 8 - n)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise CodecError(f"{what}: malformed payload ({e})") from None
    return 8 + n, meta, entries


def bytes_view(blob: Any, what: str) -> memoryview:
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise CodecError(f"{what}: expected bytes, got {type(blob).__name__}")
    return memoryview(blob).cast("B")


def unpack(blob: bytes | bytearray | memoryview, what: str) -> tuple[dict[str, Params], dict[str, Any]]:
    """Tensors (copied out of ``blob``) and metadata of a payload made by :func:`pack`,
    checked as strictly as a file (see :func:`_parse_header`)."""
    view = bytes_view(blob, what)
    base, meta, entries = layout(view, what)
    groups = {prefix: {name: _copied(view, dtype, shape, base + begin, base + end)
                       for name, (dtype, shape, begin, end) in named.items()}
              for prefix, named in entries.items()}
    return groups, meta


def _copied(view: memoryview, dtype: torch.dtype, shape: tuple[int, ...], begin: int, end: int) -> torch.Tensor:
    """A tensor of its own holding bytes ``begin:end`` of ``view``."""
    t = torch.empty(shape, dtype=dtype)
    if end > begin:
        t.reshape(-1).view(torch.uint8).numpy()[:] = np.frombuffer(view, np.uint8, end - begin, begin)
    return t


def views(view: memoryview, base: int, entries: dict[str, dict[str, tuple]]) -> dict[str, Params]:
    """The tensors of a payload as views of ``view`` (copied only where misaligned)."""
    groups: dict[str, Params] = {}
    for prefix, named in entries.items():
        out = groups[prefix] = {}
        for name, (dtype, shape, begin, end) in named.items():
            size = torch.empty(0, dtype=dtype).element_size()
            if end > begin and (base + begin) % size == 0:  # aligned (always, for payloads made by _pack)
                out[name] = torch.frombuffer(view, dtype=dtype, count=(end - begin) // size,
                                             offset=base + begin).reshape(shape)
            else:  # empty, or misaligned
                out[name] = _copied(view, dtype, shape, base + begin, base + end)
    return groups


# --------------------------------------------------------------------------- updates on disk

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_FILE_HEADER = 100 << 20
_MAX_DIMS, _MAX_DIM = 16, 1 << 40  # beyond these a shape is garbage (torch could not even allocate it)


class FileTensors(PartedTensors):
    """Tensors of a safetensors file, each read from disk when it is looked up (a
    positioned read, not a memory map, so tensors not in use cost no memory).

    :meth:`flat_slice` reads part of a tensor, so a caller can go through a large tensor with
    a buffer of bounded size (the server's checks and its weighted mean do)."""

    def __init__(self, f: BinaryIO, base: int, entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]):
        self._f, self._base, self._entries = f, base, entries
        self.finite: dict[str, bool] = {}  # what a check found, per name (the file cannot change)

    def describe(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) of a tensor, without reading it."""
        dtype, shape, _, _ = self._entries[name]
        return shape, dtype

    def _read(self, name: str, offset: int, out: torch.Tensor) -> torch.Tensor:
        view, done = memoryview(out.reshape(-1).view(torch.uint8).numpy()), 0
        while done < len(view):
            n = os.preadv(self._f.fileno(), [view[done:]], self._base + offset + done)
            if n <= 0:
                raise CodecError(f"tensor '{name}': file ended early")
            done += n
        return out

    def __getitem__(self, name: str) -> torch.Tensor:
        dtype, shape, begin, _ = self._entries[name]
        return self._read(name, begin, torch.empty(shape, dtype=dtype))

    def flat_slice(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements ``start:stop`` of the flattened tensor ``name`` (into ``out`` when given,
        a 1-D tensor of the right dtype and length)."""
        dtype, _, begin, _ = self._entries[name]
        size = torch.empty(0, dtype=dtype).element_size()
        if out is None or out.dtype != dtype or out.numel() != stop - start:
            out = torch.empty(stop - start, dtype=dtype)
        return self._read(name, begin + start * size, out) if stop > start else out

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def _parse_header(raw: bytes, data_len: int) -> tuple[dict[str, Any], dict[str, dict[str, tuple]]]:
    """The medfed metadata and the tensors ``{prefix: {name: (dtype, shape, begin, end)}}``
    of a safetensors header followed by ``data_len`` bytes of data.

    As strict as safetensors' own loader: known dtypes, sizes that match the shapes, byte
    ranges that cover the data without gaps or overlaps, names with a role prefix. Raises
    ValueError (or KeyError, TypeError, RecursionError for absurdly nested JSON) naming the
    problem."""
    header = json.loads(raw)
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    meta = json.loads(header.pop("__metadata__", {}).get(_META_KEY, "{}"))
    if not isinstance(meta, dict):
        raise ValueError("medfed metadata is not a JSON object")
    spans, groups = [], {}
    for key, e in header.items():
        dtype = _DTYPES[e["dtype"]]
        shape = tuple(int(d) for d in e["shape"])
        begin, end = (int(x) for x in e["data_offsets"])
        count = math.prod(shape)
        if len(shape) > _MAX_DIMS or any(not 0 <= d <= _MAX_DIM for d in shape):
            raise ValueError(f"tensor '{key}': shape {list(shape)[:_MAX_DIMS + 1]} is not a tensor shape")
        if end - begin != count * torch.empty(0, dtype=dtype).element_size():
            raise ValueError(f"tensor '{key}': {e['data_offsets']} do not hold shape {list(shape)} of {e['dtype']}")
        spans.append((begin, end, key))
        prefix, sep, name = key.partition("/")
        if not sep:
            raise ValueError(f"tensor name {key!r} has no role prefix")
        groups.setdefault(prefix, {})[name] = (dtype, shape, begin, end)
    at = 0
    for begin, end, key in sorted(spans):
        if begin != at:
            raise ValueError(f"tensor '{key}' starts at {begin}, expected {at} (gap or overlap)")
        at = end
    if at != data_len:
        raise ValueError(f"tensors hold {at} bytes, the payload has {data_len}")
    return meta, groups


def read_file(f: BinaryIO, size: int, what: str) -> tuple[dict[str, FileTensors], dict[str, Any]]:
    """The tensor groups (kept on disk, read when used) and metadata of a payload file of
    ``size`` bytes, its header checked as strictly as a full load would (:func:`_parse_header`)."""
    try:
        f.seek(0)
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n <= min(_MAX_FILE_HEADER, size - 8):
            raise ValueError(f"header length {n} does not fit a {size}-byte file")
        meta, groups = _parse_header(f.read(n), size - 8 - n)
    except (ValueError, KeyError, TypeError, AttributeError, OSError, RecursionError) as e:
        raise CodecError(f"{what}: malformed payload ({e})") from None
    return {k: FileTensors(f, 8 + n, v) for k, v in groups.items()}, meta
