"""A model's description (entry names, shapes, dtypes and their fingerprint): the same
fingerprint as ``model_fingerprint``, the first difference named, and every bound of what a
site may send checked."""

from __future__ import annotations

import pytest
import torch

from medfed.config import ModelConfig, TaskConfig
from medfed.core.errors import CodecError
from medfed.core.modelspec import (
    MAX_DIM, MAX_ENTRIES, MAX_NAME, ModelSpec, SpecEntry, fingerprint_of, first_difference, model_mismatch,
)
from medfed.models import build_model, model_fingerprint


def _spec(*entries: tuple[str, tuple[int, ...], str]) -> ModelSpec:
    return ModelSpec.of({n: torch.empty(shape, dtype=getattr(torch, dt)) for n, shape, dt in entries})


OURS = _spec(("conv.weight", (4, 1, 3, 3), "float32"), ("conv.bias", (4,), "float32"),
             ("bn.num_batches_tracked", (), "int64"), ("head.weight", (2, 4), "float32"))


def test_the_fingerprint_is_model_fingerprint_s_and_survives_the_wire():
    model = build_model(ModelConfig(name="small_cnn", width=8), TaskConfig(labels="binary"), 1)
    spec = ModelSpec.of(model.state_dict())
    assert spec.fingerprint == model_fingerprint(model)
    assert ModelSpec.from_wire(spec.to_wire()) == spec
    assert spec.entries[0] == SpecEntry("features.0.0.weight", (8, 1, 3, 3), "float32")


def test_the_same_model_has_no_difference():
    assert first_difference(OURS, _spec(*[(e.name, e.shape, e.dtype) for e in OURS.entries])) is None
    assert model_mismatch(OURS, OURS, "hint") is None


@pytest.mark.parametrize("theirs, first", [
    (_spec(("conv.weight", (4, 1, 3, 3), "float32"), ("conv.bias", (4,), "float32"),
           ("bn.num_batches_tracked", (), "int64"), ("head.weight", (3, 4), "float32")),
     "entry 'head.weight' has shape (3, 4) there and (2, 4) here"),
    (_spec(("conv.weight", (4, 1, 3, 3), "float16"), ("conv.bias", (4,), "float32"),
           ("bn.num_batches_tracked", (), "int64"), ("head.weight", (2, 4), "float32")),
     "entry 'conv.weight' is float16 there and float32 here"),
    (_spec(("conv.weight", (4, 1, 3, 3), "float32"), ("bn.num_batches_tracked", (), "int64"),
           ("head.weight", (2, 4), "float32")),
     "entry 'conv.bias' is missing there"),
    (_spec(("conv.weight", (4, 1, 3, 3), "float32"), ("conv.bias", (4,), "float32"),
           ("bn.num_batches_tracked", (), "int64"), ("head.weight", (2, 4), "float32"), ("extra.bias", (2,), "float32")),
     "entry 'extra.bias' is there but not here"),
    (_spec(("conv.bias", (4,), "float32"), ("conv.weight", (4, 1, 3, 3), "float32"),
           ("bn.num_batches_tracked", (), "int64"), ("head.weight", (2, 4), "float32")),
     "the entries come in another order (at position 0: 'conv.bias' there, 'conv.weight' here)"),
], ids=["shape", "dtype", "missing", "unexpected", "order"])
def test_the_first_difference_is_named(theirs, first):
    assert first_difference(theirs, OURS) == first


def test_further_differences_are_counted_and_the_reason_says_what_to_do():
    theirs = _spec(("conv.weight", (8, 1, 3, 3), "float32"), ("conv.bias", (8,), "float32"),
                   ("head.weight", (2, 8), "float32"))
    why = model_mismatch(theirs, OURS, "install the same code at every site")
    assert why.startswith("it built a different model: entry 'conv.weight' has shape (8, 1, 3, 3) there and "
                          "(4, 1, 3, 3) here (3 more differences)")
    assert f"fingerprints {theirs.fingerprint[:12]}... there, {OURS.fingerprint[:12]}... here" in why
    assert why.endswith("; install the same code at every site")


def test_a_site_that_sent_no_description_or_too_long_a_list_is_told_apart():
    assert "sent no description of the model it built" in model_mismatch(None, OURS, "hint")
    wire = _spec(("head.weight", (3, 4), "float32")).to_wire(budget=10)  # its list would not fit: fingerprint only
    assert wire["entries"] is None
    assert "the first difference is unknown" in first_difference(ModelSpec.from_wire(wire), OURS)
    assert OURS.to_wire()["entries"][2] == ["bn.num_batches_tracked", [], "int64"]


def _wire(*entries, fingerprint=None) -> dict:
    """A description as a site sends it; its fingerprint computed from ``entries`` unless given."""
    computed = fingerprint_of([SpecEntry(n, tuple(s), d) for n, s, d in entries]) if fingerprint is None else ""
    return {"fingerprint": fingerprint or computed, "entries": [list(e) for e in entries]}


@pytest.mark.parametrize("obj, message", [
    ([], "model: must be an object, got list"),
    ({**OURS.to_wire(), "values": [1]}, "model: unknown field 'values'"),
    ({**OURS.to_wire(), "fingerprint": "AB" * 32}, "model.fingerprint: must be 64 lower-case hex digits"),
    ({**OURS.to_wire(), "fingerprint": "ab" * 31}, "model.fingerprint: must be 64 lower-case hex digits"),
    ({**OURS.to_wire(), "fingerprint": 7}, "model.fingerprint: must be 64 lower-case hex digits (SHA-256), got 7"),
    ({"fingerprint": "ab" * 32, "entries": {"a": 1}}, "model.entries: must be a list or null, got dict"),
    ({"fingerprint": "ab" * 32, "entries": [["w", [1], "float32"]] * (MAX_ENTRIES + 1)},
     f"model.entries: {MAX_ENTRIES + 1} entries, at most {MAX_ENTRIES}"),
    (_wire(("w", [1], "float32")) | {"entries": [["w", [1]]]}, "model.entries[0]: must be [name, shape, dtype]"),
    (_wire(("w", [1], "float32")) | {"entries": ["w"]}, "model.entries[0]: must be [name, shape, dtype]"),
    (_wire(("", [1], "float32")), "model.entries[0]: the name must be printable text"),
    (_wire(("x" * (MAX_NAME + 1), [1], "float32")), f"the name must be printable text of 1 to {MAX_NAME}"),
    (_wire(("w\x1b[2J", [1], "float32")), "model.entries[0]: the name must be printable text"),
    (_wire((5, [1], "float32")), "model.entries[0]: the name must be printable text"),
    (_wire(("w", [1] * 9, "float32")), "model.entries[0] ('w'): the shape must be a list of at most 8 sizes"),
    (_wire(("w", "3x4", "float32")), "the shape must be a list"),
    (_wire(("w", [-1], "float32")), f"the shape's sizes must be integers in [0, {MAX_DIM}]"),
    (_wire(("w", [MAX_DIM + 1], "float32")), "the shape's sizes must be integers"),
    (_wire(("w", [True], "float32")), "the shape's sizes must be integers"),
    (_wire(("w", [2.0], "float32")), "the shape's sizes must be integers"),
    (_wire(("w", [2], "torch.float32")), "model.entries[0] ('w'): dtype must be one of torch's"),
    (_wire(("w", [2], "object")), "dtype must be one of torch's"),
    (_wire(("w", [2], "float32"), ("b", [2], "float32"), ("w", [2], "float32")), "entry 'w' is listed twice"),
    (_wire(("w", [2], "float32"), fingerprint="ab" * 32), "model.fingerprint: does not match the entries listed"),
], ids=["not-object", "unknown-field", "upper-hex", "short-hex", "int-fingerprint", "entries-dict", "too-many",
        "pair", "bare-name", "empty-name", "long-name", "control-name", "int-name", "many-dims", "str-shape",
        "negative", "huge", "bool", "float", "torch-prefix", "unknown-dtype", "duplicate", "wrong-fingerprint"])
def test_what_a_site_sends_is_checked(obj, message):
    with pytest.raises(CodecError) as info:
        ModelSpec.from_wire(obj)
    assert message in str(info.value)
