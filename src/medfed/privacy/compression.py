"""Compressed updates: the delta to the global model in float16, quantized to int8, or
sparsified to its top-k entries, with error feedback at the site and checked decoding at
the server.

Wire format. For a floating-point tensor ``w`` of the model (its delta ``v``):

* ``Encoding.FP16``: ``w`` float16, ``w``'s shape.
* ``Encoding.INT8``: ``w`` int8, ``w``'s shape, and ``w#scale`` float32, shape ``()``.
  Symmetric per tensor: ``scale = max|v| / 127`` (0 when ``v`` is all zero),
  ``q = round(v / scale)`` in [-127, 127]; the value is ``q * scale``.
* ``Encoding.TOPK`` (``fraction`` f in (0, 1]): ``w#values`` float32 and ``w#indices``
  int32, both of shape ``(k,)``, ``k = max(1, ceil(f * numel))`` (0 for an empty tensor):
  the k entries of largest ``|v|`` at their flat indices (ascending); the rest are 0.

Non-floating-point entries (batch-norm ``num_batches_tracked``) travel whole under their
own name. ``#`` never occurs in a PyTorch state-dict name, so packed names cannot clash.

Error feedback (Seide et al. 2014; Karimireddy et al. 2019): the site adds what earlier
rounds' compression dropped (the residual) to this round's delta before compressing, so
over rounds the server receives the sum of the true deltas less one residual.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from fractions import Fraction

import torch

from medfed.core.errors import CodecError
from medfed.core.params import apply_delta, delta, nbytes
from medfed.core.types import Encoding, Params, RoundPlan, Spec, Update
from medfed.privacy.base import UpdateFilter

SCALE = "#scale"
VALUES = "#values"
INDICES = "#indices"
_QMAX = 127  # symmetric int8: -128 is never produced, so 0 sits exactly in the middle
_COMPRESSED = (Encoding.FP16, Encoding.INT8, Encoding.TOPK)


# --------------------------------------------------------------------------- arguments


def _check_args(encoding: Encoding, fraction: float | None, allow_full: bool) -> Encoding:
    """``encoding`` as an :class:`Encoding`, after checking that it is one compression
    handles and that ``fraction`` is given exactly for top-k, in (0, 1]."""
    allowed = ((Encoding.FULL,) if allow_full else ()) + _COMPRESSED
    try:
        enc = Encoding(encoding)
    except (ValueError, TypeError):
        enc = None
    if enc not in allowed:
        raise ValueError(f"encoding must be one of {[e.value for e in allowed]}, got {encoding!r}")
    if enc is Encoding.TOPK:
        ok = isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0 < fraction <= 1
        if not ok:
            raise ValueError(f"fraction must be a number in (0, 1] for top-k, got {fraction!r}")
    elif fraction is not None:
        raise ValueError(f"fraction is for top-k only and must be None for {enc.value}, got {fraction!r}")
    return enc


def topk_count(numel: int, fraction: float) -> int:
    """How many entries top-k keeps of a tensor of ``numel`` entries:
    ``max(1, ceil(fraction * numel))``, at most ``numel`` (so 0 for an empty tensor).

    ``fraction`` is read as the decimal it prints as, so that ``0.1 * 30`` keeps 3 entries
    rather than the 4 that binary rounding (3.0000000000000004) would give."""
    if numel == 0:
        return 0
    return min(numel, max(1, math.ceil(Fraction(str(fraction)) * numel)))


def _delta_dtype(reference: torch.Tensor) -> torch.dtype:
    # as core.params.delta: float32, except float64 entries stay float64
    return torch.float64 if reference.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- spec


def _sent_whole(enc: Encoding, name: str, t: torch.Tensor, whole: frozenset[str]) -> bool:
    return enc is Encoding.FULL or not t.is_floating_point() or name in whole


def wire_spec(
    reference: Params, encoding: Encoding, fraction: float | None = None, whole: frozenset[str] = frozenset()
) -> Spec:
    """Names, shapes and dtypes an update of ``encoding`` must hold, given ``reference``:
    the global params restricted to the names sites send. ``Encoding.FULL``: the
    reference's own shapes and dtypes. Entries named in ``whole`` (the model's buffers,
    e.g. batch-norm running statistics: values, not steps, so compressing their change
    and feeding the error back would drift them, even below zero) and non-float entries
    travel as they are. Raises ValueError on a bad encoding or fraction, or a reference
    name holding ``#``."""
    enc = _check_args(encoding, fraction, allow_full=True)
    spec: Spec = {}
    for name, t in reference.items():
        shape = tuple(t.shape)
        if enc is not Encoding.FULL and "#" in name:
            raise ValueError(f"tensor name {name!r} holds '#', which compressed updates reserve")
        if _sent_whole(enc, name, t, whole):
            spec[name] = (shape, t.dtype)
            continue
        if enc is Encoding.FP16:
            spec[name] = (shape, torch.float16)
        elif enc is Encoding.INT8:
            spec[name] = (shape, torch.int8)
            spec[name + SCALE] = ((), torch.float32)
        else:
            k = topk_count(t.numel(), fraction)
            spec[name + VALUES] = ((k,), torch.float32)
            spec[name + INDICES] = ((k,), torch.int32)
    return spec


# --------------------------------------------------------------------------- encode (site)


def _pack_fp16(name: str, v: torch.Tensor, fraction: float | None) -> Params:
    h = v.to(torch.float16)
    if not bool(torch.isfinite(h).all()):
        raise ValueError(f"delta of tensor '{name}' exceeds float16's range (±65504); use int8 or topk")
    return {name: h}


def _pack_int8(name: str, v: torch.Tensor, fraction: float | None) -> Params:
    amax = v.abs().max() if v.numel() else v.new_zeros(())
    scale = (amax / _QMAX).to(torch.float32)
    if scale > 0:
        q = torch.round(v / scale.to(v.dtype)).clamp_(-_QMAX, _QMAX).to(torch.int8)
    else:  # all zero, or so small that the scale underflows float32: zero is the best guess
        q = torch.zeros_like(v, dtype=torch.int8)
    return {name: q, name + SCALE: scale}


def _pack_topk(name: str, v: torch.Tensor, fraction: float | None) -> Params:
    flat = v.reshape(-1)
    if flat.numel() > torch.iinfo(torch.int32).max:
        raise ValueError(f"tensor '{name}' has {flat.numel()} entries, more than int32 indices can address")
    k = topk_count(flat.numel(), fraction)
    # ascending indices: one canonical payload for a given delta
    idx = torch.topk(flat.abs(), k).indices.sort().values
    return {name + VALUES: flat[idx].to(torch.float32), name + INDICES: idx.to(torch.int32)}


_PACKERS = {Encoding.FP16: _pack_fp16, Encoding.INT8: _pack_int8, Encoding.TOPK: _pack_topk}


def encode(
    d: Params, full: Params, encoding: Encoding, fraction: float | None = None, whole: frozenset[str] = frozenset()
) -> Params:
    """The payload of a compressed update: the float deltas ``d`` packed as ``encoding``
    says (see the module docstring), plus the entries of ``full`` (non-float values, and
    float ones named in ``whole``, that travel whole) unchanged.

    Raises ValueError on FULL or a bad fraction, a non-float delta, a float entry in
    ``full`` not named in ``whole``, a name in both, or a delta holding NaN or Inf (better
    said at the site than rejected at the server)."""
    enc = _check_args(encoding, fraction, allow_full=False)
    out: Params = {}
    for name, v in d.items():
        if not v.is_floating_point():
            raise ValueError(f"delta of tensor '{name}' is {v.dtype}; only float entries carry a delta")
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"delta of tensor '{name}' holds NaN or Inf")
        out.update(_PACKERS[enc](name, v, fraction))
    for name, t in full.items():
        if t.is_floating_point() and name not in whole:
            raise ValueError(f"tensor '{name}' is {t.dtype}: float entries travel as deltas, not whole")
        if name in d:
            raise ValueError(f"tensor '{name}' is both a delta and a whole entry")
        out[name] = t
    return out


# --------------------------------------------------------------------------- decode (server)


def _read(packed: Mapping[str, torch.Tensor], key: str, spec: Spec, enc: Encoding) -> torch.Tensor:
    """``packed[key]`` after checking its type, shape and dtype against ``spec``."""
    t = packed[key]
    shape, dtype = spec[key]
    if not isinstance(t, torch.Tensor):
        raise CodecError(f"{enc.value} update: tensor '{key}' is a {type(t).__name__}, not a tensor")
    if tuple(t.shape) != shape or t.dtype != dtype:
        raise CodecError(
            f"{enc.value} update: tensor '{key}' is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}"
        )
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise CodecError(f"{enc.value} update: tensor '{key}' holds NaN or Inf")
    return t


def _check_names(packed: Mapping[str, torch.Tensor], spec: Spec, enc: Encoding) -> None:
    for key in spec:
        if key not in packed:
            raise CodecError(f"{enc.value} update: tensor '{key}' is missing")
    for key in packed.keys():
        if key not in spec:
            raise CodecError(f"{enc.value} update: unexpected tensor '{key}'")


def _unpack_fp16(packed, name: str, ref: torch.Tensor, spec: Spec) -> torch.Tensor:
    return _read(packed, name, spec, Encoding.FP16).to(_delta_dtype(ref))


def _unpack_int8(packed, name: str, ref: torch.Tensor, spec: Spec) -> torch.Tensor:
    q = _read(packed, name, spec, Encoding.INT8)
    scale = _read(packed, name + SCALE, spec, Encoding.INT8)  # finite: checked by _read
    if scale < 0:
        raise CodecError(f"int8 update: tensor '{name}{SCALE}' is {float(scale)}, expected >= 0")
    if q.numel() and int(q.min()) < -_QMAX:
        raise CodecError(f"int8 update: tensor '{name}' holds {int(q.min())}, outside [-{_QMAX}, {_QMAX}]")
    dt = _delta_dtype(ref)
    return q.to(dt) * scale.to(dt)


def _unpack_topk(packed, name: str, ref: torch.Tensor, spec: Spec) -> torch.Tensor:
    values = _read(packed, name + VALUES, spec, Encoding.TOPK)
    idx = _read(packed, name + INDICES, spec, Encoding.TOPK)
    n = ref.numel()
    if idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= n:
            bad = lo if lo < 0 else hi
            raise CodecError(f"topk update: tensor '{name}{INDICES}' holds {bad}, outside [0, {n})")
        if torch.unique(idx).numel() != idx.numel():
            raise CodecError(f"topk update: tensor '{name}{INDICES}' holds duplicate indices")
    dt = _delta_dtype(ref)
    out = torch.zeros(n, dtype=dt)
    out[idx.long()] = values.to(dt)
    return out.reshape(ref.shape)


_UNPACKERS = {Encoding.FP16: _unpack_fp16, Encoding.INT8: _unpack_int8, Encoding.TOPK: _unpack_topk}


def _decode(
    packed: Mapping[str, torch.Tensor], reference: Params, enc: Encoding, fraction: float | None,
    whole_names: frozenset[str] = frozenset(),
):
    """(float deltas, entries sent whole), checking everything on the way. Each tensor of
    ``packed`` is read once (an update read from a file loads a tensor per lookup)."""
    spec = wire_spec(reference, enc, fraction, whole_names)
    _check_names(packed, spec, enc)
    deltas: Params = {}
    whole: Params = {}
    for name, ref in reference.items():
        if _sent_whole(enc, name, ref, whole_names):
            whole[name] = _read(packed, name, spec, enc)
        else:
            deltas[name] = _UNPACKERS[enc](packed, name, ref, spec)
    return deltas, whole


def decode_delta(
    packed: Mapping[str, torch.Tensor], reference: Params, encoding: Encoding, fraction: float | None = None,
    whole: frozenset[str] = frozenset(),
) -> Params:
    """The float deltas an update carries, one per float name of ``reference``, in float32
    (float64 for float64 entries); entries not sent are 0 (top-k). ``Encoding.FULL``: the
    values less ``reference``. Raises CodecError naming the tensor when ``packed`` does not
    match :func:`wire_spec` or holds bad values (see :func:`decode`)."""
    enc = _check_args(encoding, fraction, allow_full=True)
    deltas, sent_whole = _decode(packed, reference, enc, fraction, whole)
    if enc is Encoding.FULL:
        return delta(sent_whole, reference)
    return deltas


def decode(
    packed: Mapping[str, torch.Tensor], reference: Params, encoding: Encoding, fraction: float | None = None,
    whole: frozenset[str] = frozenset(),
) -> Params:
    """The full parameter values an update carries, in ``reference``'s names, order and
    dtypes: ``reference + delta`` for float entries, non-float entries as sent.

    ``packed`` comes from another hospital, so it is checked before use; CodecError names
    the first wrong tensor: names, shapes and dtypes must equal :func:`wire_spec`
    (``reference``: the global params restricted to the sent names), float tensors must be
    finite, an int8 scale >= 0 and its values in [-127, 127], top-k indices in
    [0, numel) without duplicates, and the decoded values finite in their dtype."""
    enc = _check_args(encoding, fraction, allow_full=True)
    deltas, sent_whole = _decode(packed, reference, enc, fraction, whole)
    values = apply_delta(reference, deltas)
    for name, t in values.items():
        if not bool(torch.isfinite(t).all()):
            raise CodecError(f"{enc.value} update: tensor '{name}' overflows {t.dtype} once decoded")
    return {name: values[name] if name in values else sent_whole[name] for name in reference}


def payload_bytes(params: Params) -> int:
    """Bytes of tensor data an (encoded) update carries, less the safetensors header: the
    figure compression shrinks. See :func:`medfed.core.params.nbytes`."""
    return nbytes(params)


# --------------------------------------------------------------------------- site filter


class CompressionFilter(UpdateFilter):
    """The site's outgoing compression, with error feedback. One object per site for the
    whole run: it keeps the residual (what compression dropped so far), one tensor per
    float name in the delta's dtype (float32; float64 for float64 entries).

    ``encoding``: FP16, INT8 or TOPK; ``fraction``: the share of entries top-k keeps, in
    (0, 1], required for TOPK and None otherwise; ``error_feedback`` (default True): carry
    the residual into the next round; ``whole``: names sent as they are (the model's
    buffers, see :func:`wire_spec`). A residual whose name is no longer sent or whose
    shape changed is dropped (reset to 0).
    """

    def __init__(
        self, encoding: Encoding, fraction: float | None = None, error_feedback: bool = True,
        whole: frozenset[str] = frozenset(),
    ):
        self.encoding = _check_args(encoding, fraction, allow_full=False)
        self.fraction = fraction
        self.error_feedback = error_feedback
        self.whole = frozenset(whole)
        self._residual: Params = {}

    @property
    def residual(self) -> Params:
        """The error-feedback residual after the last :meth:`apply` (empty without it)."""
        return dict(self._residual)

    def apply(self, update: Update, global_params: Params, plan: RoundPlan) -> Update:
        """``update`` with its params packed as ``self.encoding`` and its encoding set.

        Raises ValueError when ``update`` is already encoded (compression needs full
        values, so no other encoding filter may come before it) or holds a name that
        ``global_params`` lacks."""
        if update.encoding is not Encoding.FULL:
            raise ValueError(
                f"site '{update.site}': compression needs a full update, got encoding "
                f"'{update.encoding.value}' from an earlier filter"
            )
        unknown = [k for k in update.params if k not in global_params]
        if unknown:
            raise ValueError(f"site '{update.site}': update tensor '{unknown[0]}' is not in the global params")
        reference = {k: global_params[k] for k in update.params}
        changes = delta({k: t for k, t in update.params.items() if k not in self.whole}, reference)
        v = {k: t + self._carried(k, t) for k, t in changes.items()}
        whole = {k: t for k, t in update.params.items() if k not in v}
        packed = encode(v, whole, self.encoding, self.fraction, self.whole)
        if self.error_feedback:
            sent = decode_delta(packed, reference, self.encoding, self.fraction, self.whole)
            self._residual = {k: v[k] - sent[k] for k in v}
        return dataclasses.replace(update, params=packed, encoding=self.encoding)

    def state(self) -> Params:
        return {k: v.clone() for k, v in self._residual.items()}

    def load_state(self, state: Params) -> None:
        self._residual = {k: v.clone() for k, v in state.items()}

    def _carried(self, name: str, d: torch.Tensor) -> torch.Tensor | float:
        r = self._residual.get(name)
        if r is None or r.shape != d.shape:  # new name or reshaped model: start afresh
            return 0.0
        return r.to(d.dtype)
