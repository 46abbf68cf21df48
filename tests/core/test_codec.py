import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pytest

from medfed.core import codec
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
