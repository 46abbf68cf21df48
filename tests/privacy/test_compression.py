from __future__ import annotations

import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from medfed.core import codec
from medfed.core.errors import CodecError
from medfed.core.params import delta
from medfed.core.types import Arm, Encoding, RoundPlan, TrainSettings, Update
from medfed.privacy.compression import (
    CompressionFilter,
    decode,
    decode_delta,
    encode,
    payload_bytes,
    topk_count,
    wire_spec,
)

# every compressed encoding with a fraction that fits it
ENCODINGS = [(Encoding.FP16, None), (Encoding.INT8, None), (Encoding.TOPK, 0.25)]
PLAN = RoundPlan("job", 1, Arm.FEDERATED, TrainSettings(1, 8, 0.1, "sgd", 0.0, 0.0, 0))


def _model(seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny state dict: conv weights, a float64 bias, batch-norm stats and its int64 counter."""
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 3, 2, 2, generator=g),
        "conv.bias": torch.randn(4, generator=g).double(),
        "bn.running_mean": torch.randn(4, generator=g),
        "bn.num_batches_tracked": torch.tensor(17, dtype=torch.int64),
    }


def _trained(global_params, seed: int, scale: float = 0.1):
    """Params a site might send: the global ones moved a little, the counter advanced."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, t in global_params.items():
        if t.is_floating_point():
            out[k] = t + scale * torch.randn(t.shape, generator=g).to(t.dtype)
        else:
            out[k] = t + 5
    return out


def _update(params) -> Update:
    return Update(site="hospital_a", round=1, params=params, num_examples=10, num_steps=3)


def _split(params):
    floats = {k: t for k, t in params.items() if t.is_floating_point()}
    whole = {k: t for k, t in params.items() if not t.is_floating_point()}
    return floats, whole


# --------------------------------------------------------------------------- fp16


def test_fp16_delta_representable_in_fp16_round_trips_exactly():
    ref = {"w": torch.tensor([[1.0, -2.0], [0.5, 3.0]])}
    d = {"w": torch.tensor([[0.125, -0.0625], [1.5, -3.0]])}  # exact in float16

    packed = encode(d, {}, Encoding.FP16)
    values = decode(packed, ref, Encoding.FP16)

    assert packed["w"].dtype == torch.float16
    assert torch.equal(values["w"], ref["w"] + d["w"])
    assert values["w"].dtype == torch.float32


def test_fp16_payload_is_half_of_float32():
    d = {"w": torch.randn(8, 8) * 0.01}
    packed = encode(d, {}, Encoding.FP16)
    assert payload_bytes(packed) * 2 == payload_bytes(d)


def test_fp16_delta_out_of_range_is_refused_at_the_site():
    with pytest.raises(ValueError, match="'w'.*float16"):
        encode({"w": torch.tensor([1e6])}, {}, Encoding.FP16)


# --------------------------------------------------------------------------- int8


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 40), magnitude=st.floats(1e-6, 1e3))
def test_int8_error_is_at_most_half_a_step(seed, n, magnitude):
    v = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * magnitude
    ref = {"w": torch.zeros(n)}

    packed = encode({"w": v}, {}, Encoding.INT8)
    back = decode_delta(packed, ref, Encoding.INT8)["w"]

    scale = float(packed["w#scale"])
    assert scale == pytest.approx(float(v.abs().max()) / 127, rel=1e-6)
    assert int(packed["w"].abs().max()) == 127  # the largest entry uses the full range
    assert bool(((back - v).abs() <= scale / 2 * (1 + 1e-5)).all())


def test_int8_all_zero_tensor_has_scale_zero_and_decodes_to_zeros():
    packed = encode({"w": torch.zeros(3, 2)}, {}, Encoding.INT8)
    back = decode_delta(packed, {"w": torch.ones(3, 2)}, Encoding.INT8)

    assert float(packed["w#scale"]) == 0.0
    assert torch.equal(back["w"], torch.zeros(3, 2))


def test_int8_payload_is_about_a_quarter():
    d = {"w": torch.randn(64, 64)}
    packed = encode(d, {}, Encoding.INT8)
    assert payload_bytes(packed) == 64 * 64 + 4  # one byte an entry, one float32 scale
    assert payload_bytes(packed) / payload_bytes(d) < 0.26


def test_int8_hand_computed():
    v = torch.tensor([-2.54, 1.0, 0.0, 0.01])  # scale = 2.54 / 127 = 0.02
    packed = encode({"w": v}, {}, Encoding.INT8)
    assert packed["w"].tolist() == [-127, 50, 0, 0]
    assert float(packed["w#scale"]) == pytest.approx(0.02)


# --------------------------------------------------------------------------- top-k


def test_topk_keeps_exactly_the_k_largest_magnitudes():
    v = torch.tensor([[0.1, -5.0, 3.0], [0.2, -4.0, 1.0]])
    ref = {"w": torch.zeros(2, 3)}

    packed = encode({"w": v}, {}, Encoding.TOPK, 0.5)
    back = decode_delta(packed, ref, Encoding.TOPK, 0.5)["w"]

    assert packed["w#indices"].tolist() == [1, 2, 4]
    assert packed["w#values"].tolist() == [-5.0, 3.0, -4.0]
    assert torch.equal(back, torch.tensor([[0.0, -5.0, 3.0], [0.0, -4.0, 0.0]]))


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 60), fraction=st.floats(0.001, 1.0))
def test_topk_kept_entries_dominate_dropped_ones(seed, n, fraction):
    v = torch.randn(n, generator=torch.Generator().manual_seed(seed))

    packed = encode({"w": v}, {}, Encoding.TOPK, fraction)
    back = decode_delta(packed, {"w": torch.zeros(n)}, Encoding.TOPK, fraction)["w"]

    k = topk_count(n, fraction)
    kept = torch.zeros(n, dtype=torch.bool)
    kept[packed["w#indices"].long()] = True
    assert int(kept.sum()) == k >= 1
    assert torch.equal(back[kept], v[kept]) and bool((back[~kept] == 0).all())
    if k < n:
        assert float(v[kept].abs().min()) >= float(v[~kept].abs().max())


def test_topk_count():
    assert topk_count(3, 0.01) == 1  # small tensors keep at least one entry
    assert topk_count(30, 0.1) == 3  # not 4, although 0.1 * 30 == 3.0000000000000004
    assert topk_count(10, 0.25) == 3
    assert topk_count(7, 1.0) == 7
    assert topk_count(0, 0.5) == 0


def test_topk_fraction_one_is_exact():
    v = torch.randn(5, 3)
    ref = {"w": torch.randn(5, 3)}
    back = decode_delta(encode({"w": v}, {}, Encoding.TOPK, 1.0), ref, Encoding.TOPK, 1.0)
    assert torch.equal(back["w"], v)


def test_topk_of_a_scalar_and_an_empty_tensor():
    ref = {"s": torch.tensor(2.0), "e": torch.zeros(0, 3)}
    d = {"s": torch.tensor(0.5), "e": torch.zeros(0, 3)}

    packed = encode(d, {}, Encoding.TOPK, 0.1)
    values = decode(packed, ref, Encoding.TOPK, 0.1)

    assert packed["s#indices"].tolist() == [0] and packed["e#values"].shape == (0,)
    assert float(values["s"]) == 2.5 and values["e"].shape == (0, 3)


# --------------------------------------------------------------------------- error feedback


def _run_rounds(filt: CompressionFilter, global_params, rounds: int):
    """(sum of true deltas, sum of what the server decoded) over ``rounds`` rounds."""
    true_sum = {k: torch.zeros(t.shape, dtype=torch.float64) for k, t in global_params.items() if t.is_floating_point()}
    sent_sum = {k: torch.zeros_like(t) for k, t in true_sum.items()}
    for r in range(rounds):
        params = _trained(global_params, seed=100 + r)
        out = filt.apply(_update(params), global_params, PLAN)
        sent = decode_delta(out.params, global_params, filt.encoding, filt.fraction)
        for k, t in delta(params, global_params).items():
            true_sum[k] += t.double()
            sent_sum[k] += sent[k].double()
    return true_sum, sent_sum


@pytest.mark.parametrize("encoding,fraction", ENCODINGS + [(Encoding.TOPK, 0.05)])
def test_error_feedback_telescopes(encoding, fraction):
    global_params = _model()
    filt = CompressionFilter(encoding, fraction)

    true_sum, sent_sum = _run_rounds(filt, global_params, rounds=6)

    residual = filt.residual
    for k in true_sum:
        torch.testing.assert_close(sent_sum[k] + residual[k].double(), true_sum[k], atol=1e-5, rtol=0)


def test_without_error_feedback_topk_loses_the_dropped_mass():
    global_params = _model()
    filt = CompressionFilter(Encoding.TOPK, 0.05, error_feedback=False)

    true_sum, sent_sum = _run_rounds(filt, global_params, rounds=6)

    assert filt.residual == {}
    gap = max(float((true_sum[k] - sent_sum[k]).abs().max()) for k in true_sum)
    assert gap > 0.1


def test_residual_resets_when_names_or_shapes_change():
    g1 = _model()
    filt = CompressionFilter(Encoding.TOPK, 0.25)
    filt.apply(_update(_trained(g1, 1)), g1, PLAN)
    assert set(filt.residual) == {"conv.weight", "conv.bias", "bn.running_mean"}

    # the model changes: one tensor reshaped, one gone
    g2 = {"conv.weight": torch.zeros(2, 3), "bn.num_batches_tracked": torch.tensor(3)}
    params = {"conv.weight": torch.tensor([[1.0, 0, 0], [0, 0, 0]]), "bn.num_batches_tracked": torch.tensor(4)}
    out = filt.apply(_update(params), g2, PLAN)

    values = decode(out.params, g2, Encoding.TOPK, 0.25)
    assert torch.equal(values["conv.weight"], params["conv.weight"])  # no stale residual added
    assert set(filt.residual) == {"conv.weight"}


def test_filter_uses_only_the_sent_names_of_the_global_params():
    g = _model()
    g_sent_and_local = {**g, "head.weight": torch.ones(2, 2)}  # a local layer the site keeps
    out = CompressionFilter(Encoding.FP16).apply(_update(_trained(g, 3)), g_sent_and_local, PLAN)
    assert set(wire_spec(g, Encoding.FP16)) == set(out.params)


# --------------------------------------------------------------------------- the filter's contract


@pytest.mark.parametrize("encoding,fraction", ENCODINGS)
def test_filter_sets_the_encoding_and_keeps_the_rest(encoding, fraction):
    g = _model()
    params = _trained(g, 7)
    out = CompressionFilter(encoding, fraction).apply(_update(params), g, PLAN)

    assert out.encoding is encoding
    assert (out.site, out.round, out.num_examples, out.num_steps) == ("hospital_a", 1, 10, 3)
    values = decode(out.params, g, encoding, fraction)
    assert {k: (t.shape, t.dtype) for k, t in values.items()} == {k: (t.shape, t.dtype) for k, t in params.items()}


@pytest.mark.parametrize("encoding,fraction", ENCODINGS)
def test_non_float_entries_pass_through_unchanged(encoding, fraction):
    g = _model()
    params = _trained(g, 8)
    out = CompressionFilter(encoding, fraction).apply(_update(params), g, PLAN)

    assert out.params["bn.num_batches_tracked"].dtype == torch.int64
    assert int(out.params["bn.num_batches_tracked"]) == 22
    assert int(decode(out.params, g, encoding, fraction)["bn.num_batches_tracked"]) == 22


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"encoding": Encoding.TOPK}, "fraction"),
        ({"encoding": Encoding.TOPK, "fraction": 0.0}, "fraction"),
        ({"encoding": Encoding.TOPK, "fraction": 1.5}, "fraction"),
        ({"encoding": Encoding.TOPK, "fraction": float("nan")}, "fraction"),
        ({"encoding": Encoding.INT8, "fraction": 0.1}, "fraction"),
        ({"encoding": Encoding.FP16, "fraction": 0.1}, "fraction"),
        ({"encoding": Encoding.FULL}, "encoding"),
        ({"encoding": Encoding.MASKED}, "encoding"),
    ],
)
def test_filter_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CompressionFilter(**kwargs)


def test_filter_rejects_an_already_encoded_update():
    g = _model()
    first = CompressionFilter(Encoding.FP16).apply(_update(_trained(g, 1)), g, PLAN)
    with pytest.raises(ValueError, match="full update"):
        CompressionFilter(Encoding.INT8).apply(first, g, PLAN)


def test_encode_refuses_a_non_finite_delta():
    with pytest.raises(ValueError, match="'w'.*NaN"):
        encode({"w": torch.tensor([1.0, float("nan")])}, {}, Encoding.INT8)


# --------------------------------------------------------------------------- wire spec


@st.composite
def models(draw):
    out = {}
    for i in range(draw(st.integers(1, 4))):
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
        dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64]))
        t = torch.randn(shape) if dtype.is_floating_point else torch.randint(0, 9, shape)
        out[f"layer{i}.w"] = t.to(dtype)
    return out


@settings(max_examples=40, deadline=None)
@given(g=models(), seed=st.integers(0, 100), fraction=st.floats(0.01, 1.0))
def test_wire_spec_matches_what_encode_produces(g, seed, fraction):
    params = _trained(g, seed)
    d = delta(params, g)
    _, whole = _split(params)
    for encoding, frac in [(Encoding.FP16, None), (Encoding.INT8, None), (Encoding.TOPK, fraction)]:
        packed = encode(d, whole, encoding, frac)
        assert {k: (tuple(t.shape), t.dtype) for k, t in packed.items()} == wire_spec(g, encoding, frac)
        decode(packed, g, encoding, frac)  # and what encode produces is accepted


def test_wire_spec_full_is_the_reference_itself():
    g = _model()
    assert wire_spec(g, Encoding.FULL) == {k: (tuple(t.shape), t.dtype) for k, t in g.items()}


def test_wire_spec_int8_and_topk_names():
    g = {"w": torch.zeros(2, 5), "n": torch.tensor(1)}
    assert wire_spec(g, Encoding.INT8) == {
        "w": ((2, 5), torch.int8), "w#scale": ((), torch.float32), "n": ((), torch.int64)
    }
    assert wire_spec(g, Encoding.TOPK, 0.2) == {
        "w#values": ((2,), torch.float32), "w#indices": ((2,), torch.int32), "n": ((), torch.int64)
    }


def test_decode_full_returns_the_values_and_their_delta():
    g = _model()
    params = _trained(g, 4)
    values = decode(params, g, Encoding.FULL)
    assert all(torch.equal(values[k], params[k]) for k in g)
    d = decode_delta(params, g, Encoding.FULL)
    assert set(d) == {"conv.weight", "conv.bias", "bn.running_mean"}


# --------------------------------------------------------------------------- decode rejects


def _packed(encoding, fraction):
    g = {"w": torch.zeros(2, 4), "n": torch.tensor(3)}
    d = {"w": torch.tensor([[0.5, -1.0, 2.0, 0.0], [0.25, 4.0, -3.0, 1.0]])}
    return g, encode(d, {"n": torch.tensor(4)}, encoding, fraction)


def _set(key, value):
    def mutate(p):
        p[key] = value
    return mutate


def _drop(key):
    def mutate(p):
        del p[key]
    return mutate


BAD = [
    # (encoding, fraction, mutation, tensor named, problem)
    (Encoding.FP16, None, _drop("w"), "w", "missing"),
    (Encoding.INT8, None, _drop("w#scale"), "w#scale", "missing"),
    (Encoding.TOPK, 0.5, _drop("n"), "n", "missing"),
    (Encoding.FP16, None, _set("x", torch.zeros(1)), "x", "unexpected"),
    (Encoding.INT8, None, _set("w#scale#scale", torch.tensor(1.0)), "w#scale#scale", "unexpected"),
    (Encoding.FP16, None, _set("w", torch.zeros(2, 4)), "w", "float32"),  # float32, not float16
    (Encoding.INT8, None, _set("w#scale", torch.tensor(1.0, dtype=torch.float64)), "w#scale", "float64"),
    (Encoding.TOPK, 0.5, _set("w#indices", torch.arange(4)), "w#indices", "int64"),
    (Encoding.FP16, None, _set("n", torch.tensor(4, dtype=torch.int32)), "n", "int32"),
    (Encoding.FP16, None, _set("w", torch.zeros(4, 2, dtype=torch.float16)), "w", r"\(4, 2\)"),
    (Encoding.TOPK, 0.5, _set("w#values", torch.zeros(3)), "w#values", r"\(3,\)"),
    (Encoding.FP16, None, _set("w", torch.full((2, 4), float("nan"), dtype=torch.float16)), "w", "NaN"),
    (Encoding.TOPK, 0.5, _set("w#values", torch.tensor([1.0, float("inf"), 0, 0])), "w#values", "Inf"),
    (Encoding.INT8, None, _set("w#scale", torch.tensor(-0.5)), "w#scale", ">= 0"),
    (Encoding.INT8, None, _set("w#scale", torch.tensor(float("nan"))), "w#scale", "NaN"),
    (Encoding.INT8, None, _set("w", torch.full((2, 4), -128, dtype=torch.int8)), "w", "-128"),
    (Encoding.TOPK, 0.5, _set("w#indices", torch.tensor([0, 1, 2, 8], dtype=torch.int32)), "w#indices", "outside"),
    (Encoding.TOPK, 0.5, _set("w#indices", torch.tensor([-1, 1, 2, 3], dtype=torch.int32)), "w#indices", "outside"),
    (Encoding.TOPK, 0.5, _set("w#indices", torch.tensor([1, 5, 1, 3], dtype=torch.int32)), "w#indices", "duplicate"),
]


@pytest.mark.parametrize("encoding,fraction,mutate,name,problem", BAD)
def test_decode_rejects_a_bad_payload_naming_the_tensor(encoding, fraction, mutate, name, problem):
    g, packed = _packed(encoding, fraction)
    decode(packed, g, encoding, fraction)  # the untouched payload is fine
    mutate(packed)
    with pytest.raises(CodecError, match=rf"tensor '{name}'.*{problem}|{problem}.*tensor '{name}'"):
        decode(packed, g, encoding, fraction)
    with pytest.raises(CodecError):
        decode_delta(packed, g, encoding, fraction)


def test_decode_rejects_a_value_that_overflows_its_dtype():
    g = {"w": torch.tensor([60000.0], dtype=torch.float16)}
    packed = encode({"w": torch.tensor([60000.0])}, {}, Encoding.FP16)
    with pytest.raises(CodecError, match="'w'.*overflows"):
        decode(packed, g, Encoding.FP16)


def test_decode_with_a_different_fraction_is_rejected():
    g, packed = _packed(Encoding.TOPK, 0.5)
    with pytest.raises(CodecError, match="w#values"):
        decode(packed, g, Encoding.TOPK, 0.25)


# --------------------------------------------------------------------------- on the wire


@pytest.mark.parametrize("encoding,fraction", ENCODINGS)
def test_packed_update_survives_safetensors(encoding, fraction):
    g = _model()
    out = CompressionFilter(encoding, fraction).apply(_update(_trained(g, 5)), g, PLAN)

    back = st_load(st_save(out.params))

    assert back.keys() == out.params.keys()
    assert all(back[k].dtype == t.dtype and torch.equal(back[k], t) for k, t in out.params.items())
    expected = decode(out.params, g, encoding, fraction)
    got = decode(back, g, encoding, fraction)
    assert all(torch.equal(got[k], expected[k]) for k in g)


@pytest.mark.parametrize("encoding,fraction", ENCODINGS)
def test_packed_tensors_survive_the_update_codec(encoding, fraction):
    # core/codec.py carries the tensors; it does not (yet) carry Update.encoding, so the
    # server must know the round's encoding from its own configuration
    g = _model()
    out = CompressionFilter(encoding, fraction).apply(_update(_trained(g, 6)), g, PLAN)
    expected = decode(out.params, g, encoding, fraction)
    blob = codec.encode_update(out)

    in_memory = codec.decode_update(blob).params
    with tempfile.TemporaryFile() as f:  # and lazily from a file, a tensor per lookup
        f.write(blob)
        f.flush()
        on_disk = codec.read_update_file(f, len(blob)).params
        for params in (in_memory, on_disk):
            got = decode(params, g, encoding, fraction)
            assert all(torch.equal(got[k], expected[k]) for k in g)


@pytest.mark.parametrize("encoding,fraction", ENCODINGS)
def test_buffers_named_whole_travel_exactly_and_carry_no_residual(encoding, fraction):
    # batch-norm statistics are values, not steps: a compressed change fed back round
    # after round drifts them (a running variance can go negative)
    g0 = _model()
    whole = frozenset({"bn.running_mean"})
    filt = CompressionFilter(encoding, fraction, error_feedback=True, whole=whole)
    for rnd in range(3):
        sent = _trained(g0, seed=rnd, scale=0.5)
        packed = filt.apply(_update(sent), g0, PLAN).params
        assert torch.equal(packed["bn.running_mean"], sent["bn.running_mean"])
        assert wire_spec(g0, encoding, fraction, whole)["bn.running_mean"] == ((4,), torch.float32)
        out = decode(packed, g0, encoding, fraction, whole)
        assert torch.equal(out["bn.running_mean"], sent["bn.running_mean"])
        assert "bn.running_mean" not in filt.residual
