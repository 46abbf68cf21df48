import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medfed.algorithms import build_algorithm
from medfed.algorithms.fedavg import weighted_average
from medfed.config import FedAvgConfig
from medfed.core.types import Update


def test_weighted_average_hand_computed():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(10)}
    b = {"w": torch.tensor([4.0, -1.0]), "n": torch.tensor(20)}
    out = weighted_average([a, b], [1, 2])
    # (1*[1,2] + 2*[4,-1]) / 3 = [3, 0]; integer buffer (10 + 40) / 3 = 16.67 -> 17
    assert torch.allclose(out["w"], torch.tensor([3.0, 0.0]))
    assert out["n"].dtype == torch.int64 and int(out["n"]) == 17


def test_fedavg_weights_by_examples():
    algo = build_algorithm(FedAvgConfig(), torch.nn.Linear(1, 1), 2)
    ups = [
        Update("a", 1, {"w": torch.tensor([0.0])}, num_examples=30, num_steps=1),
        Update("b", 1, {"w": torch.tensor([10.0])}, num_examples=10, num_steps=1),
    ]
    assert torch.allclose(algo.aggregate({"w": torch.tensor([5.0])}, ups)["w"], torch.tensor([2.5]))


@settings(max_examples=50, deadline=None)
@given(
    values=st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=6),
    weights=st.lists(st.integers(1, 10_000), min_size=1, max_size=8),
)
def test_average_of_identical_updates_is_that_update(values, weights):
    p = {"w": torch.tensor(values, dtype=torch.float32)}
    out = weighted_average([p] * len(weights), weights)
    assert torch.allclose(out["w"], p["w"], rtol=1e-6, atol=1e-5)


def test_bad_weights_are_refused():
    with pytest.raises(ValueError):
        weighted_average([], [])
    with pytest.raises(ValueError):
        weighted_average([{"w": torch.ones(1)}], [0])
    with pytest.raises(ValueError):
        weighted_average([{"w": torch.ones(1)}], [1, 2])


# ---------------------------------------------------------------------- bit for bit, part by part

import tempfile  # noqa: E402

from medfed.algorithms import mean  # noqa: E402
from medfed.core import codec  # noqa: E402


def _reference(params_list, weights):
    """The formula, written out: a float64 accumulator over whole tensors."""
    total = float(sum(weights))
    out = {}
    for name in params_list[0]:
        first = params_list[0][name]
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for p, w in zip(params_list, weights):
            acc += p[name].to(torch.float64) * (w / total)
        out[name] = acc.to(first.dtype) if first.dtype.is_floating_point else acc.round().to(first.dtype)
    return out


SHAPES = {"long": (20,), "flat_slice": (7,), "matrix": (3, 5), "big": (4, 11), "scalar": (), "empty": (0, 3), "one": (1,)}


def _site_params(seed: int, dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in SHAPES.items():
        for suffix, dtype in dtypes.items():
            if dtype.is_floating_point:
                t = (torch.randn(shape, generator=g, dtype=torch.float64) * 10 ** torch.randint(-3, 4, (), generator=g))
            else:
                t = torch.randint(-1000, 100_000, shape, generator=g, dtype=torch.float64)
            out[f"{name}.{suffix}"] = t.to(dtype)
    return out


MIXED_DTYPES = {"f32": torch.float32, "f16": torch.float16, "i64": torch.int64, "f64": torch.float64,
                "bf16": torch.bfloat16}


def _assert_bitwise(out, ref):
    assert out.keys() == ref.keys()
    for k in ref:
        assert out[k].dtype == ref[k].dtype and out[k].shape == ref[k].shape, k
        assert torch.equal(out[k], ref[k]), k


def _spooled(params_list, stack):
    """Each site's params written as an update and read back with read_update_file (tensors on disk)."""
    out = []
    for i, p in enumerate(params_list):
        blob = codec.encode_update(Update(f"s{i}", 1, p, 10, 1))
        f = stack.enter_context(tempfile.TemporaryFile())
        f.write(blob)
        f.flush()
        u = codec.read_update_file(f, len(blob))
        assert isinstance(u.params, codec.FileTensors)
        out.append(u.params)
    return out


@settings(max_examples=25, deadline=None)
@given(
    seeds=st.lists(st.integers(0, 2**16), min_size=1, max_size=4),
    weights=st.data(),
    flat_slice=st.sampled_from([None, 1, 3, 7, 8, 20, 21]),
    source=st.sampled_from(["memory", "files", "mixed"]),
)
def test_weighted_average_is_the_formula_bit_for_bit(seeds, weights, flat_slice, source):
    import contextlib

    ws = weights.draw(st.lists(st.one_of(st.integers(1, 10**6), st.floats(0.01, 1e4)),
                               min_size=len(seeds), max_size=len(seeds)))
    params_list = [_site_params(s, MIXED_DTYPES) for s in seeds]
    ref = _reference(params_list, ws)
    with contextlib.ExitStack() as stack, pytest.MonkeyPatch.context() as mp:
        if flat_slice is not None:
            mp.setattr(mean, "SLICE", flat_slice)
        if source == "memory":
            inputs = params_list
        else:
            inputs = _spooled(params_list, stack)
            if source == "mixed":
                inputs = [p if i % 2 else params_list[i] for i, p in enumerate(inputs)]
        _assert_bitwise(weighted_average(inputs, ws), ref)


@pytest.mark.parametrize("flat_slice", [7, 5, 1, 1 << 20])
@pytest.mark.parametrize("source", ["memory", "files"])
def test_weighted_average_part_by_part(monkeypatch, flat_slice, source):
    """Tensors several flat_slices long (and not a multiple of the flat_slice size), three sites,
    uneven weights: the same bits as the whole-tensor formula."""
    monkeypatch.setattr(mean, "SLICE", flat_slice)
    g = torch.Generator().manual_seed(0)
    params_list = [
        {"w": torch.randn(5, 9, generator=g) * 1e3, "h": (torch.randn(23, generator=g) * 50).half(),
         "n": torch.randint(0, 10**9, (3, 7), generator=g), "b": torch.randn(7, generator=g, dtype=torch.float64),
         "s": torch.tensor(float(i) / 3), "c": torch.tensor(10 * i + 3)}
        for i in range(3)
    ]
    weights = [3, 0.7, 11]
    import contextlib

    with contextlib.ExitStack() as stack:
        inputs = params_list if source == "memory" else _spooled(params_list, stack)
        out = weighted_average(inputs, weights)
    _assert_bitwise(out, _reference(params_list, weights))
    assert out["n"].dtype == torch.int64 and out["h"].dtype == torch.float16


def test_integer_entries_are_rounded_in_every_piece(monkeypatch):
    monkeypatch.setattr(mean, "SLICE", 3)
    a = {"n": torch.arange(10)}
    b = {"n": torch.arange(10) + 1}
    out = weighted_average([a, b], [1, 1])  # x + 0.5 rounds half to even
    assert out["n"].tolist() == torch.tensor([i + 0.5 for i in range(10)], dtype=torch.float64).round().long().tolist()
    assert out["n"].tolist() == [0, 2, 2, 4, 4, 6, 6, 8, 8, 10]
