import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pytest

from medfed.core import codec, payload, tensors
from medfed.core.errors import CodecError
from medfed.core.types import Arm, FitRequest, RoundPlan, TrainSettings, Update

DTYPES = [torch.float32, torch.float16, torch.float64, torch.int64, torch.int32, torch.uint8, torch.bfloat16]


@st.composite
def params(draw):
    n = draw(st.integers(0, 4))
    out = {}
    for i in range(n):
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        dtype = draw(st.sampled_from(DTYPES))
        seed = draw(st.integers(0, 2**16))
        g = torch.Generator().manual_seed(seed)
        t = torch.randn(shape, generator=g) * 100
        out[f"layer{i}.w"] = t.to(dtype)
    return out


@settings(max_examples=60, deadline=None)
@given(p=params(), extras=params(), n=st.integers(1, 10**6), loss=st.floats(allow_nan=False, allow_infinity=False))
def test_update_round_trip_is_exact(p, extras, n, loss):
    u = Update(site="hospital_a", round=3, params=p, num_examples=n, num_steps=7, metrics={"loss": loss}, extras=extras)
    v = codec.decode_update(codec.encode_update(u))
    assert (v.site, v.round, v.num_examples, v.num_steps, v.metrics) == (u.site, u.round, n, 7, {"loss": loss})
    for src, dst in ((u.params, v.params), (u.extras, v.extras)):
        assert src.keys() == dst.keys()
        for k in src:
            assert dst[k].dtype == src[k].dtype and dst[k].shape == src[k].shape
            assert torch.equal(dst[k], src[k])


def test_fit_request_round_trip():
    plan = RoundPlan("job1", 2, Arm.LOCAL, TrainSettings(1, 32, 0.1, "sgd", 0.9, 0.0, 1234), {"c": torch.ones(2)})
    req = FitRequest("b", {"w": torch.arange(6.0).reshape(2, 3)}, plan)
    back = codec.decode_fit_request(codec.encode_fit_request(req))
    assert back.site == "b" and back.plan.train == plan.train and back.plan.arm is Arm.LOCAL
    assert torch.equal(back.params["w"], req.params["w"]) and torch.equal(back.plan.extras["c"], torch.ones(2))


@pytest.mark.parametrize("blob", [b"", b"\x00" * 8, b"\xff" * 64, b"not a payload at all"])
def test_garbage_is_a_codec_error(blob):
    with pytest.raises(CodecError):
        codec.decode_update(blob)


def test_truncated_payload_is_a_codec_error():
    blob = codec.encode_update(Update("a", 1, {"w": torch.ones(100)}, 5, 1))
    for cut in (10, len(blob) // 2, len(blob) - 1):
        with pytest.raises(CodecError):
            codec.decode_update(blob[:cut])


def test_missing_header_field_is_a_codec_error():
    blob = codec.encode_params({"w": torch.ones(2)})  # a params blob has no update header
    with pytest.raises(CodecError, match="update: bad header field"):
        codec.decode_update(blob)


def _file(blob: bytes):
    import tempfile

    f = tempfile.TemporaryFile()
    f.write(blob)
    f.flush()
    return f


def test_an_update_read_from_a_file_equals_the_decoded_one():
    u = Update("a", 3, {"w": torch.randn(5, 4), "n": torch.tensor(7), "e": torch.zeros(0), "h": torch.ones(3).half()},
               12, 4, {"loss": 0.25}, {"dc/w": torch.randn(5, 4)})
    blob = codec.encode_update(u)
    with _file(blob) as f:
        v = codec.read_update_file(f, len(blob))
        w = codec.decode_update(blob)
        assert (v.site, v.round, v.num_examples, v.num_steps, v.metrics) == ("a", 3, 12, 4, {"loss": 0.25})
        assert sorted(v.params) == sorted(w.params) and sorted(v.extras) == ["dc/w"]
        for k in w.params:
            assert v.params[k].dtype == w.params[k].dtype and torch.equal(v.params[k], w.params[k])
        assert torch.equal(v.extras["dc/w"], u.extras["dc/w"])


@settings(max_examples=60, deadline=None)
@given(cut=st.integers(0, 10_000), junk=st.binary(min_size=1, max_size=64), at=st.integers(0, 10_000))
def test_a_damaged_update_file_is_a_codec_error(cut, junk, at):
    """Truncated or overwritten bytes: either the same update or a CodecError, never another exception."""
    blob = codec.encode_update(Update("a", 1, {"w": torch.arange(100.0), "b": torch.ones(7)}, 5, 1))
    for bad in (blob[: cut % len(blob)], blob[: at % len(blob)] + junk + blob[at % len(blob) + len(junk):]):
        with _file(bad) as f:
            try:
                u = codec.read_update_file(f, len(bad))
                _ = [u.params[k] for k in u.params]
            except CodecError:
                pass


# --------------------------------------------------------------------------- safetensors interop

import json  # noqa: E402
import struct  # noqa: E402

import safetensors.torch  # noqa: E402

MIXED = {
    "f32": torch.randn(3, 4, generator=torch.Generator().manual_seed(1)),
    "f64": torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(2)),
    "f16": (torch.randn(2, 3, generator=torch.Generator().manual_seed(3)) * 100).half(),
    "bf16": (torch.randn(4, 2, generator=torch.Generator().manual_seed(4)) * 1e20).bfloat16(),
    "i64": torch.tensor([-(2**62), -1, 0, 1, 2**62 + 3]),
    "i32": torch.tensor([[-7, 8], [2**31 - 1, -(2**31)]], dtype=torch.int32),
    "i16": torch.tensor([-300, 300], dtype=torch.int16),
    "i8": torch.tensor([-128, 127, 0], dtype=torch.int8),
    "u8": torch.tensor([0, 255, 17], dtype=torch.uint8),
    "bool": torch.tensor([[True, False, True], [False, False, True]]),
    "scalar": torch.tensor(2.5),
    "scalar_i": torch.tensor(-9),
    "empty": torch.zeros(0),
    "empty2": torch.zeros(3, 0, dtype=torch.int64),
}
MIXED_EXTRAS = {"c/f32": torch.arange(6.0).reshape(2, 3), "c/bool": torch.tensor([False, True]), "c/e": torch.ones(0, 2)}


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(_bits(a[k]), _bits(b[k])), k  # bit for bit (NaN payloads included)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def test_medfed_payloads_are_read_by_safetensors():
    for blob in (codec.encode_model(MIXED, MIXED_EXTRAS),
                 codec.encode_update(Update("a", 2, MIXED, 3, 1, {"loss": 1.5}, MIXED_EXTRAS))):
        loaded = safetensors.torch.load(bytes(blob))
        _same(loaded, {**{f"params/{k}": v for k, v in MIXED.items()},
                       **{f"extras/{k}": v for k, v in MIXED_EXTRAS.items()}})


def test_medfed_payloads_from_a_pool_are_read_by_safetensors():
    from medfed.core.buffers import BufferPool

    pool = BufferPool(keep=1)
    blob = codec.encode_model(MIXED, {}, pool)
    assert isinstance(blob, memoryview)
    _same(safetensors.torch.load(bytes(blob)), {f"params/{k}": v for k, v in MIXED.items()})
    params, extras = codec.decode_model(blob)
    _same(params, MIXED)
    assert extras == {}


def test_safetensors_payloads_are_decoded_by_medfed():
    blob = safetensors.torch.save({**{f"params/{k}": v for k, v in MIXED.items()},
                                   **{f"extras/{k}": v for k, v in MIXED_EXTRAS.items()}})
    params, extras = codec.decode_model(blob)
    _same(params, MIXED)
    _same(extras, MIXED_EXTRAS)
    # the same through decode_params, and a payload with only one group
    _same(codec.decode_params(safetensors.torch.save({f"params/{k}": v for k, v in MIXED.items()})), MIXED)
    params, extras = codec.decode_model(safetensors.torch.save({"params/w": torch.ones(2), "extras/e": torch.zeros(1)}))
    _same(params, {"w": torch.ones(2)})
    _same(extras, {"e": torch.zeros(1)})


# --------------------------------------------------------------------------- view_update

UPD = Update("hospital_a", 4, MIXED, 12, 3, {"loss": 0.125, "acc": 0.5}, MIXED_EXTRAS)


def _check_update(v: Update, u: Update) -> None:
    assert (v.site, v.round, v.num_examples, v.num_steps, v.metrics, v.encoding) == (
        u.site, u.round, u.num_examples, u.num_steps, u.metrics, u.encoding)
    _same(dict(v.params), dict(u.params))
    _same(dict(v.extras), dict(u.extras))


def test_view_update_equals_decode_update():
    blob = codec.encode_update(UPD)
    assert isinstance(blob, bytearray)
    v, d = codec.view_update(blob), codec.decode_update(blob)
    _check_update(v, d)
    _check_update(v, UPD)
    # a memoryview (a pool's buffer) works as well
    _check_update(codec.view_update(memoryview(bytearray(blob))), UPD)


def _data_span(blob, key: str) -> tuple[int, int]:
    n = int.from_bytes(blob[:8], "little")
    begin, end = json.loads(bytes(blob[8 : 8 + n]))[key]["data_offsets"]
    return 8 + n + begin, 8 + n + end


def _address(buf) -> int:
    return torch.frombuffer(buf, dtype=torch.uint8).data_ptr()


def _is_view_of(t: torch.Tensor, buf) -> bool:
    start = _address(buf)
    return start <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= start + len(buf)


# names and sizes that keep every tensor aligned: float32 and int64 entries, each of a
# length that keeps the next one 8-byte aligned
ALIGNED = Update("a", 2, {"w": torch.randn(3, 4), "x": torch.randn(5, dtype=torch.float64), "y": torch.arange(3),
                          "z": torch.tensor(1.5, dtype=torch.float64)}, 7, 1, {}, {"c": torch.tensor([1.0, 2.0])})


def test_view_update_tensors_share_memory_with_the_buffer():
    blob = codec.encode_update(ALIGNED)
    v = codec.view_update(blob)
    for group in (v.params, v.extras):
        for k, t in group.items():
            assert _is_view_of(t, blob), k
    begin, end = _data_span(blob, "params/w")
    assert end - begin == 12 * 4
    blob[begin + 4 : begin + 8] = struct.pack("<f", 1234.5)  # the second element of params/w
    assert v.params["w"][0, 1].item() == 1234.5
    begin, _ = _data_span(blob, "extras/c")
    blob[begin + 4 : begin + 8] = struct.pack("<f", -7.0)
    assert v.extras["c"].tolist() == [1.0, -7.0]
    begin, _ = _data_span(blob, "params/y")
    blob[begin + 16 : begin + 24] = struct.pack("<q", 42)
    assert v.params["y"].tolist() == [0, 1, 42]
    begin, _ = _data_span(blob, "params/z")
    blob[begin : begin + 8] = struct.pack("<d", -0.25)
    assert v.params["z"].item() == -0.25
    # and the other way round: the tensor writes into the buffer
    v.params["x"][4] = 3.0
    begin, _ = _data_span(blob, "params/x")
    assert struct.unpack("<d", bytes(blob[begin + 32 : begin + 40]))[0] == 3.0
    # a decoded update is a copy
    d = codec.decode_update(blob)
    blob[begin + 32 : begin + 40] = struct.pack("<d", 5.0)
    assert d.params["x"][4].item() == 3.0 and v.params["x"][4].item() == 5.0
    # a view of a memoryview (a pool's buffer) shares it too
    view = memoryview(bytearray(codec.encode_update(ALIGNED)))
    assert all(_is_view_of(t, view) for t in codec.view_update(view).params.values())


def test_view_update_shares_every_tensor_of_a_medfed_payload():
    """_pack puts larger elements first, so every tensor is aligned and used in place."""
    blob = codec.encode_update(UPD)
    v = codec.view_update(blob)
    copied = [k for group in (v.params, v.extras) for k, t in group.items() if t.numel() and not _is_view_of(t, blob)]
    assert copied == []


@pytest.mark.parametrize("blob", [lambda b: bytes(b), lambda b: memoryview(bytes(b)),
                                  lambda b: memoryview(bytearray(b)).toreadonly()], ids=["bytes", "view", "readonly"])
def test_view_update_refuses_a_read_only_buffer(blob):
    with pytest.raises(CodecError, match="writable buffer"):
        codec.view_update(blob(codec.encode_update(UPD)))


def test_view_update_refuses_what_is_not_a_buffer():
    with pytest.raises(CodecError):
        codec.view_update("not bytes")  # type: ignore[arg-type]


def _unaligned_payload(u: Update) -> bytearray:
    """A safetensors payload made by hand whose header is not padded: its length is odd,
    so every tensor of more than one byte per element starts at a misaligned offset."""
    meta = {"site": u.site, "round": u.round, "num_examples": u.num_examples, "num_steps": u.num_steps,
            "metrics": u.metrics, "encoding": u.encoding.value}
    header: dict = {"__metadata__": {"medfed": json.dumps(meta)}}
    data = bytearray()
    for prefix, group in (("params", u.params), ("extras", u.extras)):
        for name, t in group.items():
            raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            header[f"{prefix}/{name}"] = {"dtype": payload._DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                                          "data_offsets": [len(data), len(data) + len(raw)]}
            data += raw
    raw = json.dumps(header, separators=(",", ":")).encode()
    if len(raw) % 2 == 0:
        raw += b" "
    assert len(raw) % 2 == 1 and len(raw) % 8 != 0
    return bytearray(len(raw).to_bytes(8, "little") + raw + data)


def test_a_payload_with_an_unpadded_header_is_decoded():
    blob = _unaligned_payload(UPD)
    _check_update(codec.view_update(blob), UPD)
    _check_update(codec.decode_update(blob), UPD)
    _check_update(codec.view_update(memoryview(bytearray(blob))), UPD)
    with _file(bytes(blob)) as f:
        v = codec.read_update_file(f, len(blob))
        _check_update(Update(v.site, v.round, {k: v.params[k] for k in v.params}, v.num_examples, v.num_steps,
                             v.metrics, {k: v.extras[k] for k in v.extras}, v.encoding), UPD)


def test_view_update_of_an_update_without_extras():
    u = Update("b", 1, {"w": torch.randn(7, 3), "n": torch.tensor(5)}, 9, 2)
    v = codec.view_update(codec.encode_update(u))
    _check_update(v, u)
    assert v.extras == {} and v.metrics == {}


@settings(max_examples=40, deadline=None)
@given(p=params(), extras=params(), n=st.integers(1, 10**6))
def test_view_update_round_trip_is_exact(p, extras, n):
    u = Update("hospital_b", 9, p, n, 2, {"m": 1.0}, extras)
    _check_update(codec.view_update(codec.encode_update(u)), u)


@settings(max_examples=80, deadline=None)
@given(cut=st.integers(0, 10_000), junk=st.binary(min_size=1, max_size=64), at=st.integers(0, 10_000))
def test_a_damaged_payload_is_a_codec_error_for_view_update(cut, junk, at):
    """Truncated or overwritten bytes: view_update gives the update decode_update gives, or
    a CodecError (as decode_update does), never another exception."""
    blob = bytes(codec.encode_update(Update("a", 1, {"w": torch.arange(100.0), "b": torch.ones(7)}, 5, 1,
                                            extras={"i": torch.arange(3)})))
    truncated = blob[: cut % len(blob)]
    with pytest.raises(CodecError):
        codec.view_update(bytearray(truncated))
    bad = blob[: at % len(blob)] + junk + blob[at % len(blob) + len(junk):]
    try:
        v = codec.view_update(bytearray(bad))
    except CodecError:
        with pytest.raises(CodecError):
            codec.decode_update(bad)
        return
    _check_update(v, codec.decode_update(bad))


# --------------------------------------------------------------------------- tensors on disk, in parts

FLAT = {"w": torch.randn(5, 7, generator=torch.Generator().manual_seed(5)),  # 35 elements
        "h": (torch.randn(3, 3, generator=torch.Generator().manual_seed(6)) * 10).half(),
        "i": torch.arange(-10, 13).reshape(23, 1),
        "s": torch.tensor(3.25),
        "e": torch.zeros(2, 0),
        "bf": torch.linspace(-3, 3, 16).bfloat16()}


def _from_file(f, p=FLAT):
    blob = codec.encode_update(Update("a", 1, p, 4, 1, extras={"x": torch.arange(20.0)}))
    f.write(blob)
    f.flush()
    return codec.read_update_file(f, len(blob))


def test_describe_reads_the_header():
    with _file(b"") as f:
        u = _from_file(f)
        assert isinstance(u.params, codec.FileTensors)
        for k, t in FLAT.items():
            assert tensors.describe(u.params, k) == (tuple(t.shape), t.dtype) == u.params.describe(k)
            assert tensors.describe(FLAT, k) == (tuple(t.shape), t.dtype)
        assert tensors.describe(u.extras, "x") == ((20,), torch.float32)


def test_pieces_of_a_file_are_the_slices_of_the_flattened_tensor():
    with _file(b"") as f:
        u = _from_file(f)
        for k, t in FLAT.items():
            flat = t.reshape(-1)
            count = flat.numel()
            spans = [(0, count), (0, 0), (count, count)] + [(a, b) for a in range(0, count + 1, 3)
                                                            for b in (a, min(a + 1, count), min(a + 5, count), count)]
            for a, b in spans:
                got = u.params.flat_slice(k, a, b)
                assert got.dtype == t.dtype and got.shape == (b - a,), (k, a, b)
                assert torch.equal(got, flat[a:b]), (k, a, b)
                out = torch.full((b - a,), 1, dtype=t.dtype)
                got = tensors.flat_slice(u.params, k, a, b, out)
                assert torch.equal(got, flat[a:b]), (k, a, b)
                if b > a:
                    assert got.data_ptr() == out.data_ptr()  # read into the buffer given
                assert torch.equal(tensors.flat_slice(FLAT, k, a, b, out), flat[a:b])


def test_a_piece_into_a_buffer_that_does_not_fit_is_still_right():
    with _file(b"") as f:
        u = _from_file(f)
        flat = FLAT["w"].reshape(-1)
        for out in (torch.zeros(3, dtype=torch.float64), torch.zeros(2), torch.zeros(10)):
            assert torch.equal(u.params.flat_slice("w", 4, 7, out), flat[4:7])
        assert torch.equal(tensors.flat_slice(u.params, "w", 30, 35, torch.zeros(1, dtype=torch.int64)), flat[30:35])


@pytest.mark.parametrize("size", [1, 3, 4, 8, 34, 35, 36, 1000])
def test_pieces_go_through_a_tensor_in_parts(size):
    with _file(b"") as f:
        u = _from_file(f)
        for k, t in FLAT.items():
            flat = t.reshape(-1)
            count = flat.numel()
            expected = [flat[a : a + size] for a in range(0, count, size)]
            assert [len(p) for p in expected] == [min(size, count - a) for a in range(0, count, size)]
            from_file = [p.clone() for p in tensors.flat_slices(u.params, k, size=size)]  # each valid until the next
            in_memory = list(tensors.flat_slices(FLAT, k, size=size))
            for parts in (from_file, in_memory):
                assert len(parts) == len(expected), (k, size)
                for got, exp in zip(parts, expected):
                    assert got.dtype == t.dtype and torch.equal(got, exp), (k, size)
            if count:
                assert torch.equal(torch.cat(from_file), flat)


def test_pieces_default_to_the_piece_size():
    assert tensors.SLICE > 35
    with _file(b"") as f:
        u = _from_file(f)
        (only,) = list(tensors.flat_slices(u.params, "w"))
        assert torch.equal(only, FLAT["w"].reshape(-1))
        assert list(tensors.flat_slices(u.params, "e")) == []
        (s,) = list(tensors.flat_slices(u.params, "s"))
        assert s.shape == (1,) and s.item() == 3.25


def test_pieces_of_a_file_longer_than_the_piece_size():
    t = torch.arange(2 * 37 + 5, dtype=torch.float32)
    with _file(b"") as f:
        u = _from_file(f, {"t": t})
        parts = [p.clone() for p in tensors.flat_slices(u.params, "t", size=37)]
        assert [len(p) for p in parts] == [37, 37, 5]
        assert torch.equal(torch.cat(parts), t)


META = {"site": "a", "round": 1, "num_examples": 5, "num_steps": 1, "metrics": {}, "encoding": "full"}


def _crafted(header: dict, data: bytes = b"") -> bytearray:
    raw = json.dumps({"__metadata__": {"medfed": json.dumps(META)}, **header}).encode()
    return bytearray(len(raw).to_bytes(8, "little") + raw + data)


@pytest.mark.parametrize("shape", [[0, 10**30], [0, 2**62, 2**62], [0] * 40, [-1, 0]])
def test_absurd_shapes_are_a_codec_error(shape):
    blob = _crafted({"params/w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}})
    for decode in (codec.decode_update, codec.view_update):
        with pytest.raises(CodecError, match="shape"):
            decode(blob)


def test_deeply_nested_json_is_a_codec_error():
    raw = b"[" * 100_000
    blob = bytearray(len(raw).to_bytes(8, "little") + raw)
    for decode in (codec.decode_update, codec.view_update):
        with pytest.raises(CodecError):
            decode(blob)
    with pytest.raises(CodecError):
        codec.decode_eval_results("a", raw)


def test_decode_model_into_a_reused_buffer():
    """With a pool the tensors are views of a copy: changing them leaves the payload alone,
    and a second decode while the first tensors live does not overwrite them."""
    from medfed.core.buffers import BufferPool

    params, extras = {"w": torch.randn(5, 4), "b": torch.arange(3), "h": torch.ones(2).half()}, {"c": torch.randn(3)}
    blob = codec.encode_model(params, extras)
    kept = bytes(blob)
    pool = BufferPool(keep=1)
    p1, e1 = codec.decode_model(blob, pool)
    assert all(torch.equal(p1[k], params[k]) for k in params) and torch.equal(e1["c"], extras["c"])
    p1["w"].zero_()
    assert bytes(blob) == kept  # the payload is untouched
    other = codec.encode_model({k: v + 1 for k, v in params.items()}, extras)
    p2, _ = codec.decode_model(other, pool)
    assert torch.equal(p2["w"], params["w"] + 1) and bool((p1["w"] == 0).all())
    del p1, e1, p2, _
    p3, _ = codec.decode_model(blob, pool)  # the buffer is free again: reused, right values
    assert all(torch.equal(p3[k], params[k]) for k in params)


def test_secure_aggregation_s_part_of_a_plan_is_typed_and_checked_at_the_wire():
    from medfed.core.types import RoundPlan, SecAggPlan, TrainSettings

    plan = RoundPlan("j", 2, Arm.FEDERATED, TrainSettings(1, 4, 0.1, "sgd", 0.0, 0.0, 7),
                     secagg=SecAggPlan(0.25, {"hospital_b": "c2hhcmVz"}))
    back = codec.plan_from_dict(json.loads(json.dumps(codec.plan_to_dict(plan))), {})
    assert back == plan and isinstance(back.secagg, SecAggPlan)
    for bad in ({"weight": "half"}, {"weight": True}, {"weight": 0.5, "ciphertexts": {"b": 3}},
                {"weight": 0.5, "extra": 1}, ["not", "an", "object"]):
        with pytest.raises(CodecError, match="round plan: bad header field.*secagg"):
            codec.plan_from_dict({**codec.plan_to_dict(plan), "secagg": bad}, {})
