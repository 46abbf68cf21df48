"""The one place where typed messages become bytes and back: round plans, models, fit
requests, updates and evaluation results onto the payload format of core/payload.py
(tensors in safetensors, everything else as JSON in its header). No pickle: a payload
from another process or another hospital is parsed, never executed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, BinaryIO


from medfed.core import payload
from medfed.core.buffers import BufferPool
from medfed.core.errors import CodecError
from medfed.core.payload import FileTensors  # noqa: F401 (an update read from a file holds these)
from medfed.core.types import (
    Arm,
    Encoding,
    EvalResult,
    FitRequest,
    Params,
    RoundPlan,
    SecAggPlan,
    Split,
    TrainSettings,
    Update,
)

def encode_params(params: Params) -> bytearray:
    """Serialize a state dict (names to tensors) to safetensors bytes."""
    return payload.pack({"params": params}, {})


def decode_params(blob: bytes) -> Params:
    groups, _ = payload.unpack(blob, "params")
    return groups.get("params", {})


def plan_to_dict(plan: RoundPlan) -> dict[str, Any]:
    """The JSON part of a round plan (its ``extras`` tensors travel with the parameters)."""
    out = {"job_id": plan.job_id, "round": plan.round, "arm": plan.arm.value, "train": asdict(plan.train)}
    if plan.secagg is not None:
        out["secagg"] = {"weight": plan.secagg.weight, "ciphertexts": plan.secagg.ciphertexts}
    return out


def plan_from_dict(meta: Any, extras: Params, what: str = "round plan") -> RoundPlan:
    try:
        return RoundPlan(
            job_id=str(meta["job_id"]),
            round=int(meta["round"]),
            arm=Arm(meta["arm"]),
            train=TrainSettings(**meta["train"]),
            extras=extras,
            secagg=_secagg_plan(meta.get("secagg")),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CodecError(f"{what}: bad header field ({e})") from None


def _secagg_plan(v: Any) -> SecAggPlan | None:
    """Secure aggregation's part of a plan from JSON: a number ``weight`` and ``ciphertexts``
    mapping names to text (ValueError otherwise; the range of the weight is the site's check)."""
    if v is None:
        return None
    if not isinstance(v, dict) or set(v) - {"weight", "ciphertexts"}:
        raise ValueError("secagg must be a JSON object with weight and ciphertexts")
    weight, cts = v.get("weight"), v.get("ciphertexts", {})
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise ValueError(f"secagg.weight must be a number, got {weight!r}")
    if not isinstance(cts, dict) or not all(isinstance(k, str) and isinstance(c, str) for k, c in cts.items()):
        raise ValueError("secagg.ciphertexts must map site names to text")
    return SecAggPlan(float(weight), dict(cts))


def encode_model(params: Params, extras: Params, pool: BufferPool | None = None) -> bytearray | memoryview:
    """The tensors a site receives for one round: the global parameters and the
    algorithm's extras. One blob serves every site of the round."""
    return payload.pack({"params": params, "extras": extras}, {}, pool)


def decode_model(blob: bytes, pool: BufferPool | None = None) -> tuple[Params, Params]:
    """(params, extras) of a model payload: tensors of their own, or, with ``pool``, views
    of a copy of ``blob`` in a reused buffer (one copy into memory already in place; the
    tensors may be changed without changing ``blob``)."""
    if pool is None:
        groups, _ = payload.unpack(blob, "model")
    else:
        view = payload.bytes_view(blob, "model")
        base, _, entries = payload.layout(view, "model")
        copy = pool.take(len(view))
        copy[:] = view
        groups = payload.views(copy, base, entries)
    unknown = groups.keys() - {"params", "extras"}
    if unknown:
        raise CodecError(f"model: unexpected tensor group(s) {sorted(unknown)}")
    return groups.get("params", {}), groups.get("extras", {})


def encode_fit_request(req: FitRequest) -> bytearray:
    meta = {"site": req.site, **plan_to_dict(req.plan)}
    return payload.pack({"params": req.params, "extras": req.plan.extras}, meta)


def decode_fit_request(blob: bytes) -> FitRequest:
    groups, meta = payload.unpack(blob, "fit request")
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
    except (UnicodeDecodeError, KeyError, TypeError, ValueError, RecursionError) as e:
        raise CodecError(f"evaluation results: malformed ({e})") from None
    if splits is not None and [r.split for r in out] != list(splits):
        raise CodecError(f"evaluation results: splits {[r.split.value for r in out]}, expected {[s.value for s in splits]}")
    return out


def encode_update(update: Update, pool: BufferPool | None = None) -> bytearray | memoryview:
    meta = {
        "site": update.site,
        "round": update.round,
        "num_examples": update.num_examples,
        "num_steps": update.num_steps,
        "metrics": update.metrics,
        "encoding": update.encoding.value,
    }
    if update.state_round is not None:
        meta["state_round"] = update.state_round
    return payload.pack({"params": update.params, "extras": update.extras}, meta, pool)


def decode_update(blob: bytes) -> Update:
    groups, meta = payload.unpack(blob, "update")
    return _update_from(groups, meta)


def view_update(buf: bytearray | memoryview) -> Update:
    """An update whose tensors are views of ``buf`` (no copy; the tensors keep ``buf``
    alive): ``buf`` must not be changed while the update is in use. Checked like
    :func:`decode_update`."""
    if not isinstance(buf, (bytearray, memoryview)) or memoryview(buf).readonly:
        raise CodecError(f"update: expected a writable buffer, got {type(buf).__name__}")
    view = memoryview(buf).cast("B")
    base, meta, entries = payload.layout(view, "update")
    return _update_from(payload.views(view, base, entries), meta)


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
            state_round=_state_round(meta.get("state_round")),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CodecError(f"update: bad header field ({e})") from None


def _state_round(value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"state_round is {value!r}, not a round number")
    return value


def read_update_file(f: BinaryIO, size: int) -> Update:
    """An update from a payload file of ``size`` bytes whose tensors stay on disk until
    they are used: a server can hold many sites' updates at the memory cost of one tensor."""
    groups, meta = payload.read_file(f, size, "update")
    return _update_from(groups, meta)
