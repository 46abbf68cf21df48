"""The one place where typed payloads become bytes and back.

Tensors travel as safetensors; everything else as JSON in the safetensors header
metadata. No pickle: a payload from another process or another hospital is parsed, never
executed. Tensor names are prefixed by their role (``params/``, ``extras/``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from medfed.core.errors import CodecError
from medfed.core.types import Arm, Encoding, EvalResult, FitRequest, Params, RoundPlan, Split, TrainSettings, Update

_META_KEY = "medfed"


def _pack(groups: dict[str, Params], meta: dict[str, Any]) -> bytes:
    tensors: dict[str, torch.Tensor] = {}
    for prefix, params in groups.items():
        for name, t in params.items():
            tensors[f"{prefix}/{name}"] = t.detach().to("cpu").contiguous()
    return _st_save(tensors, metadata={_META_KEY: json.dumps(meta)})


def _unpack(blob: bytes, what: str) -> tuple[dict[str, Params], dict[str, Any]]:
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise CodecError(f"{what}: expected bytes, got {type(blob).__name__}")
    blob = bytes(blob)
    try:
        tensors = _st_load(blob)
        header_len = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8 : 8 + header_len])
        meta = json.loads(header["__metadata__"][_META_KEY])
    except (SafetensorError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise CodecError(f"{what}: malformed payload ({e})") from None
    if not isinstance(meta, dict):
        raise CodecError(f"{what}: header metadata must be a JSON object")
    groups: dict[str, Params] = {}
    for key, t in tensors.items():
        prefix, sep, name = key.partition("/")
        if not sep:
            raise CodecError(f"{what}: tensor name {key!r} has no role prefix")
        groups.setdefault(prefix, {})[name] = t
    return groups, meta


def encode_params(params: Params) -> bytes:
    """Serialize a state dict (names to tensors) to safetensors bytes."""
    return _pack({"params": params}, {})


def decode_params(blob: bytes) -> Params:
    groups, _ = _unpack(blob, "params")
    return groups.get("params", {})


def plan_to_dict(plan: RoundPlan) -> dict[str, Any]:
    """The JSON part of a round plan (its ``extras`` tensors travel with the parameters)."""
    out = {"job_id": plan.job_id, "round": plan.round, "arm": plan.arm.value, "train": asdict(plan.train)}
    if plan.secagg is not None:
        out["secagg"] = plan.secagg
    return out


def plan_from_dict(meta: Any, extras: Params, what: str = "round plan") -> RoundPlan:
    try:
        return RoundPlan(
            job_id=str(meta["job_id"]),
            round=int(meta["round"]),
            arm=Arm(meta["arm"]),
            train=TrainSettings(**meta["train"]),
            extras=extras,
            secagg=_object(meta.get("secagg"), "secagg"),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CodecError(f"{what}: bad header field ({e})") from None


def _object(v: Any, what: str) -> dict | None:
    if v is not None and not isinstance(v, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(v).__name__}")
    return v


def encode_model(params: Params, extras: Params) -> bytes:
    """The tensors a site receives for one round: the global parameters and the
    algorithm's extras. One blob serves every site of the round."""
    return _pack({"params": params, "extras": extras}, {})


def decode_model(blob: bytes) -> tuple[Params, Params]:
    groups, _ = _unpack(blob, "model")
    unknown = groups.keys() - {"params", "extras"}
    if unknown:
        raise CodecError(f"model: unexpected tensor group(s) {sorted(unknown)}")
    return groups.get("params", {}), groups.get("extras", {})


def encode_fit_request(req: FitRequest) -> bytes:
    meta = {"site": req.site, **plan_to_dict(req.plan)}
    return _pack({"params": req.params, "extras": req.plan.extras}, meta)


def decode_fit_request(blob: bytes) -> FitRequest:
    groups, meta = _unpack(blob, "fit request")
    plan = plan_from_dict(meta, groups.get("extras", {}), "fit request")
    try:
        return FitRequest(site=str(meta["site"]), params=groups.get("params", {}), plan=plan)
    except KeyError as e:
        raise CodecError(f"fit request: bad header field ({e})") from None


def encode_eval_results(results: Sequence[EvalResult]) -> bytes:
    """Evaluation results as JSON (they hold no tensors)."""
    rows = [{"split": r.split.value, "n": r.num_examples, "metrics": r.metrics} for r in results]
    return json.dumps(rows, allow_nan=False).encode()


def decode_eval_results(site: str, blob: bytes, splits: Sequence[Split] | None = None) -> list[EvalResult]:
    """Parse :func:`encode_eval_results` output; ``splits`` (when given) must be exactly
    the splits that were asked for. Metric values must be finite numbers or null."""
    try:
        rows = json.loads(bytes(blob).decode())
        out = []
        for d in rows:
            metrics: dict[str, float | None] = {}
            for k, v in dict(d["metrics"]).items():
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                    raise ValueError(f"metric {k!r} is {v!r}")
                metrics[str(k)] = None if v is None else float(v)
            n = d["n"]
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"n is {n!r}")
            out.append(EvalResult(site=site, split=Split(d["split"]), num_examples=n, metrics=metrics))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CodecError(f"evaluation results: malformed ({e})") from None
    if splits is not None and [r.split for r in out] != list(splits):
        raise CodecError(f"evaluation results: splits {[r.split.value for r in out]}, expected {[s.value for s in splits]}")
    return out


def encode_update(update: Update) -> bytes:
    meta = {
        "site": update.site,
        "round": update.round,
        "num_examples": update.num_examples,
        "num_steps": update.num_steps,
        "metrics": update.metrics,
        "encoding": update.encoding.value,
    }
    return _pack({"params": update.params, "extras": update.extras}, meta)


def decode_update(blob: bytes) -> Update:
    groups, meta = _unpack(blob, "update")
    return _update_from(groups, meta)


def _update_from(groups: dict[str, Any], meta: dict[str, Any]) -> Update:
    try:
        metrics = {str(k): float(v) for k, v in dict(meta.get("metrics", {})).items()}
        return Update(
            site=str(meta["site"]),
            round=int(meta["round"]),
            params=groups.get("params", {}),
            num_examples=int(meta["num_examples"]),
            num_steps=int(meta["num_steps"]),
            metrics=metrics,
            extras=groups.get("extras", {}),
            encoding=Encoding(meta.get("encoding", "full")),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CodecError(f"update: bad header field ({e})") from None


# --------------------------------------------------------------------------- updates on disk

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_FILE_HEADER = 100 << 20


class FileTensors(Mapping):
    """Tensors of a safetensors file, each read from disk when it is looked up (a
    positioned read, not a memory map, so tensors not in use cost no memory)."""

    def __init__(self, f: BinaryIO, base: int, entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]):
        self._f, self._base, self._entries = f, base, entries

    def __getitem__(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self._entries[name]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        buf = bytearray(end - begin)
        view, done = memoryview(buf), 0
        while done < len(buf):
            n = os.preadv(self._f.fileno(), [view[done:]], self._base + begin + done)
            if n <= 0:
                raise CodecError(f"tensor '{name}': file ended early")
            done += n
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def read_update_file(f: BinaryIO, size: int) -> Update:
    """An update from a safetensors file of ``size`` bytes whose tensors stay on disk until
    they are used: a server can hold many sites' updates at the memory cost of one tensor.

    The header is checked as strictly as a full load would: known dtypes, sizes that match
    the shapes, byte ranges inside the file that cover its data without gaps or overlaps."""
    try:
        f.seek(0)
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n <= min(_MAX_FILE_HEADER, size - 8):
            raise ValueError(f"header length {n} does not fit a {size}-byte file")
        header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        meta = json.loads(header.pop("__metadata__", {}).get(_META_KEY, "{}"))
        if not isinstance(meta, dict):
            raise ValueError("medfed metadata is not a JSON object")
        data_len = size - 8 - n
        spans, groups = [], {}
        for key, e in header.items():
            dtype = _DTYPES[e["dtype"]]
            shape = tuple(int(d) for d in e["shape"])
            begin, end = (int(x) for x in e["data_offsets"])
            count = math.prod(shape)
            if min(shape, default=0) < 0 or end - begin != count * torch.empty(0, dtype=dtype).element_size():
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
            raise ValueError(f"tensors hold {at} bytes, the file has {data_len}")
    except (ValueError, KeyError, TypeError, AttributeError, OSError, json.JSONDecodeError) as e:
        raise CodecError(f"update: malformed payload ({e})") from None
    return _update_from({k: FileTensors(f, 8 + n, v) for k, v in groups.items()}, meta)
