from pathlib import Path

import numpy as np
import pytest

from medfed.config import TaskConfig
from medfed.core.errors import DataError
from medfed.data.medmnist import load_medmnist

BINARY = TaskConfig(labels="binary")
SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "medmnist" / "breastmnist.npz"


def _write(path, images=None, labels=None, **override):
    rng = np.random.default_rng(0)
    arrays = {}
    for s, n in (("train", 12), ("val", 4), ("test", 6)):
        arrays[f"{s}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) if images is None else images(n)
        arrays[f"{s}_labels"] = rng.integers(0, 2, (n, 1)) if labels is None else labels(n)
    arrays.update(override)
    np.savez(path, **arrays)
    return path


def test_grayscale_with_column_labels(tmp_path):
    out = load_medmnist(_write(tmp_path / "m.npz"), BINARY)
    assert out["train"].images.shape == (12, 1, 28, 28) and out["val"].labels.shape == (4,)
    assert 0.0 <= float(out["test"].images.min()) and float(out["test"].images.max()) <= 1.0


def test_rgb_and_flat_labels(tmp_path):
    rng = np.random.default_rng(1)
    p = _write(tmp_path / "m.npz", images=lambda n: rng.integers(0, 256, (n, 28, 28, 3), dtype=np.uint8),
               labels=lambda n: rng.integers(0, 5, n))
    out = load_medmnist(p, TaskConfig(labels="multiclass", num_classes=5))
    assert out["train"].images.shape == (12, 3, 28, 28)


def test_multilabel(tmp_path):
    rng = np.random.default_rng(2)
    p = _write(tmp_path / "m.npz", labels=lambda n: rng.integers(0, 2, (n, 4)))
    out = load_medmnist(p, TaskConfig(labels="multilabel", num_classes=4))
    assert out["train"].labels.shape == (12, 4)


def _bad_cases(tmp_path):
    good = _write(tmp_path / "good.npz")
    trunc = tmp_path / "trunc.npz"
    trunc.write_bytes(good.read_bytes()[:100])
    rand = tmp_path / "rand.npz"
    rand.write_bytes(np.random.default_rng(0).bytes(500))
    nan = np.full((12, 28, 28), 0.5, dtype=np.float32)
    nan[0, 0, 0] = np.nan
    return [
        (tmp_path / "missing.npz", "not found"),
        (trunc, "not a readable .npz"),
        (rand, "not a readable .npz"),
        (_nokey(tmp_path), "missing key(s) ['test_labels']"),
        (_write(tmp_path / "ndim.npz", train_images=np.zeros((12, 28), np.uint8)), "key 'train_images': images must have shape"),
        (_write(tmp_path / "str.npz", train_images=np.array(["a"] * 12)), "images must be numeric"),
        (_write(tmp_path / "nan.npz", train_images=nan), "key 'train_images': 1 pixel value(s) are NaN"),
        (_write(tmp_path / "range.npz", val_labels=np.array([0, 1, 2, 1])), "key 'val_labels': label 2 is outside 0..1"),
        (_write(tmp_path / "count.npz", test_labels=np.zeros(5, np.int64)), "6 images in 'test_images' but 5 labels"),
        (_write(tmp_path / "empty.npz", val_images=np.zeros((0, 28, 28), np.uint8), val_labels=np.zeros(0)), "the split is empty"),
    ]


def _nokey(tmp_path):
    p = tmp_path / "nokey.npz"
    rng = np.random.default_rng(0)
    arrays = {f"{s}_{k}": (rng.integers(0, 256, (4, 28, 28), dtype=np.uint8) if k == "images" else np.zeros(4, np.int64))
              for s in ("train", "val", "test") for k in ("images", "labels")}
    del arrays["test_labels"]
    np.savez(p, **arrays)
    return p


def test_bad_inputs_name_file_and_problem(tmp_path):
    for path, expected in _bad_cases(tmp_path):
        with pytest.raises(DataError) as e:
            load_medmnist(path, BINARY)
        assert path.name in str(e.value) and expected in str(e.value), str(e.value)


@pytest.mark.skipif(not SHARED.is_file(), reason=f"real BreastMNIST not present at {SHARED}")
def test_real_breastmnist():
    out = load_medmnist(SHARED, BINARY)
    assert [len(out[s]) for s in ("train", "val", "test")] == [546, 78, 156]
    assert out["train"].images.shape[1:] == (1, 28, 28)
    assert set(out["train"].labels.unique().tolist()) == {0, 1}
