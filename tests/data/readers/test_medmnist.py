
import numpy as np
import pytest
import torch

from shared_data import SHARED_DATA

from medfed.config import TaskConfig
from medfed.core.errors import DataError
from medfed.data.readers.medmnist import load_medmnist

BINARY = TaskConfig(labels="binary")
SIZES = {"train": 12, "val": 4, "test": 6}
SHARED = SHARED_DATA / "medmnist" / "breastmnist.npz"


def _arrays(images=None, labels=None, seed=0):
    """A small valid MedMNIST-like set: uint8 (N, 28, 28) images, (N, 1) labels in {0, 1}."""
    rng = np.random.default_rng(seed)
    out = {}
    for s, n in SIZES.items():
        out[f"{s}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) if images is None else images(rng, n)
        out[f"{s}_labels"] = rng.integers(0, 2, (n, 1)) if labels is None else labels(rng, n)
    return out


def _write(path, arrays=None, compressed=False, **override):
    arrays = {**(arrays or _arrays()), **override}
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def test_grayscale_with_column_labels(tmp_path):
    arrays = _arrays()
    out = load_medmnist(_write(tmp_path / "m.npz", arrays), BINARY)
    assert set(out) == {"train", "val", "test"}
    for s, n in SIZES.items():
        assert out[s].images.shape == (n, 1, 28, 28) and out[s].images.dtype == torch.float32
        assert out[s].labels.shape == (n,) and out[s].labels.dtype == torch.int64
    assert torch.equal(out["val"].images[:, 0] * 255, torch.from_numpy(arrays["val_images"]).float())
    assert torch.equal(out["test"].labels, torch.from_numpy(arrays["test_labels"][:, 0]))


def test_binary_flat_labels(tmp_path):
    out = load_medmnist(_write(tmp_path / "m.npz", _arrays(labels=lambda r, n: r.integers(0, 2, n))), BINARY)
    assert out["train"].labels.shape == (12,)


def test_rgb_multiclass(tmp_path):
    arrays = _arrays(images=lambda r, n: r.integers(0, 256, (n, 28, 28, 3), dtype=np.uint8),
                     labels=lambda r, n: r.integers(0, 5, (n, 1)))
    out = load_medmnist(_write(tmp_path / "m.npz", arrays), TaskConfig(labels="multiclass", num_classes=5))
    assert out["train"].images.shape == (12, 3, 28, 28)
    # channel-first: channel c of image 0 is the last axis of the stored array
    assert torch.equal(out["train"].images[0, 2] * 255, torch.from_numpy(arrays["train_images"][0, :, :, 2]).float())


def test_float_images_and_single_channel_last_axis(tmp_path):
    arrays = _arrays(images=lambda r, n: r.random((n, 28, 28, 1)).astype(np.float32))
    out = load_medmnist(_write(tmp_path / "m.npz", arrays), BINARY)
    assert out["train"].images.shape == (12, 1, 28, 28)
    assert torch.equal(out["train"].images[:, 0], torch.from_numpy(arrays["train_images"][..., 0]))


def test_multilabel(tmp_path):
    arrays = _arrays(labels=lambda r, n: r.integers(0, 2, (n, 4)).astype(np.uint8))
    out = load_medmnist(_write(tmp_path / "m.npz", arrays), TaskConfig(labels="multilabel", num_classes=4))
    assert out["train"].labels.shape == (12, 4) and out["train"].labels.dtype == torch.float32
    assert torch.equal(out["train"].labels, torch.from_numpy(arrays["train_labels"]).float())


def _nan_images():
    x = np.full((12, 28, 28), 0.5, dtype=np.float32)
    x[0, 0, :3] = [np.nan, np.inf, np.nan]
    return x


def _corrupt_member(tmp_path):
    """A zip archive whose central directory is intact but whose first member is damaged."""
    good = _write(tmp_path / "tmp_good.npz", compressed=True).read_bytes()
    bad = bytearray(good)
    for i in range(200, 1200):
        bad[i] ^= 0x5A
    p = tmp_path / "member.npz"
    p.write_bytes(bytes(bad))
    return p


BAD = {
    # id: (how to make the file, task, text the message must hold besides the file name)
    "missing": (lambda d: d / "absent.npz", BINARY, ["not found"]),
    "truncated": (lambda d: _trunc(d), BINARY, ["not a .npz (zip) archive"]),
    "random_bytes": (lambda d: _raw(d / "rand.npz", np.random.default_rng(0).bytes(500)), BINARY, ["not a .npz"]),
    "npy_not_npz": (lambda d: _npy(d), BINARY, ["not a .npz"]),
    "corrupt_member": (_corrupt_member, BINARY, ["train_images", "cannot be read"]),
    "missing_key": (lambda d: _write(d / "nokey.npz", {k: v for k, v in _arrays().items() if k != "test_labels"}),
                    BINARY, ["missing key(s) ['test_labels']", "found ['test_images', 'train_images'"]),
    "images_ndim": (lambda d: _write(d / "ndim.npz", train_images=np.zeros((12, 28), np.uint8)),
                    BINARY, ["'train_images'", "must have shape (N, H, W)", "(12, 28)"]),
    "images_strings": (lambda d: _write(d / "str.npz", val_images=np.array(["a"] * 4)),
                       BINARY, ["'val_images'", "must be uint8 or float", "<U1"]),
    "images_object": (lambda d: _write(d / "obj.npz", test_images=np.array([None] * 6, dtype=object)),
                      BINARY, ["'test_images'", "dtype object"]),
    "images_nan": (lambda d: _write(d / "nan.npz", train_images=_nan_images()),
                   BINARY, ["'train_images'", "3 pixel value(s) are NaN or Inf"]),
    "images_int_range": (lambda d: _write(d / "i16.npz", train_images=np.full((12, 28, 28), 300, np.int16)),
                         BINARY, ["'train_images'", "0..255", "300"]),
    "label_out_of_range": (lambda d: _write(d / "range.npz", val_labels=np.array([0, 1, 2, 1])),
                           BINARY, ["'val_labels'", "label 2 is outside 0..1"]),
    "label_negative": (lambda d: _write(d / "neg.npz", val_labels=np.array([0, -1, 1, 1])),
                       TaskConfig(labels="multiclass", num_classes=3), ["'val_labels'", "label -1 is outside 0..2"]),
    "label_fraction": (lambda d: _write(d / "frac.npz", val_labels=np.array([0, 0.5, 1, 1])),
                       BINARY, ["'val_labels'", "whole numbers", "0.5"]),
    "labels_ndim": (lambda d: _write(d / "lndim.npz", train_labels=np.zeros((12, 2), np.int64)),
                    BINARY, ["'train_labels'", "(N,) or (N, 1)", "(12, 2)"]),
    "labels_strings": (lambda d: _write(d / "lstr.npz", train_labels=np.array(["x"] * 12)),
                       BINARY, ["'train_labels'", "must be numeric"]),
    "count_mismatch": (lambda d: _write(d / "count.npz", test_labels=np.zeros(5, np.int64)),
                       BINARY, ["6 images in 'test_images' but 5 labels in 'test_labels'"]),
    "empty_split": (lambda d: _write(d / "empty.npz", val_images=np.zeros((0, 28, 28), np.uint8),
                                     val_labels=np.zeros(0, np.int64)), BINARY, ["'val_images'", "empty"]),
    "multilabel_width": (lambda d: _write(d / "mlw.npz"), TaskConfig(labels="multilabel", num_classes=4),
                         ["'train_labels'", "(N, 4)", "(12, 1)"]),
    "multilabel_value": (lambda d: _write(d / "mlv.npz", _arrays(labels=lambda r, n: np.full((n, 3), 2))),
                         TaskConfig(labels="multilabel", num_classes=3), ["'train_labels'", "0 or 1, found 2"]),
    "split_shapes": (lambda d: _write(d / "shapes.npz", test_images=np.zeros((6, 32, 32), np.uint8)),
                     BINARY, ["shapes differ", "(1, 32, 32)"]),
}


def _raw(path, data):
    path.write_bytes(data)
    return path


def _trunc(d):
    return _raw(d / "trunc.npz", _write(d / "full.npz").read_bytes()[:100])


def _npy(d):
    np.save(d / "plain.npy", np.zeros(3))
    return (d / "plain.npy").rename(d / "plain.npz")


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_names_file_key_and_problem(tmp_path, case):
    make, task, expected = BAD[case]
    path = make(tmp_path)
    with pytest.raises(DataError) as e:
        load_medmnist(path, task)
    msg = str(e.value)
    assert str(path) in msg and all(text in msg for text in expected), msg


@pytest.mark.skipif(not SHARED.is_file(), reason=f"the real BreastMNIST file is not present at {SHARED}")
def test_real_breastmnist():
    out = load_medmnist(SHARED, BINARY)
    assert [len(out[s]) for s in ("train", "val", "test")] == [546, 78, 156]
    for s in ("train", "val", "test"):
        assert out[s].images.shape[1:] == (1, 28, 28)
        assert set(out[s].labels.unique().tolist()) == {0, 1}
        assert 0.0 <= float(out[s].images.min()) and float(out[s].images.max()) <= 1.0


# --------------------------------------------------------------------------- 3D (OrganMNIST3D-like)

ORGAN3D = TaskConfig(labels="multiclass", num_classes=11)


def _volumes(rng, n, shape=(28, 28, 28)):
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8)


def _organ3d(**kw):
    return _arrays(images=kw.get("images", _volumes), labels=lambda r, n: r.integers(0, 11, (n, 1)))


def test_3d_volumes(tmp_path):
    arrays = _organ3d()
    out = load_medmnist(_write(tmp_path / "organ3d.npz", arrays, compressed=True), ORGAN3D, dims=3)
    for s, n in SIZES.items():
        assert out[s].images.shape == (n, 1, 28, 28, 28) and out[s].images.dtype == torch.float32
        assert out[s].spatial_dims == 3 and out[s].labels.shape == (n,) and int(out[s].labels.max()) <= 10
    assert torch.equal(out["val"].images[:, 0] * 255, torch.from_numpy(arrays["val_images"]).float())
    assert 0.0 <= float(out["train"].images.min()) and float(out["train"].images.max()) <= 1.0


def test_3d_volumes_with_channel_axis(tmp_path):
    arrays = _organ3d(images=lambda r, n: _volumes(r, n, (28, 28, 28, 1)))
    out = load_medmnist(_write(tmp_path / "organ3d.npz", arrays), ORGAN3D, dims=3)
    assert out["test"].images.shape == (6, 1, 28, 28, 28)
    assert torch.equal(out["test"].images[:, 0] * 255, torch.from_numpy(arrays["test_images"][..., 0]).float())


@pytest.mark.parametrize("shape, dims, expected", [
    ((28, 28, 28), 2, "look like 3D volumes (N, D, H, W); set data.dims: 3"),
    ((28, 28, 28, 1), 2, "look like 3D volumes (N, D, H, W); set data.dims: 3"),
    ((28, 28), 3, "look like 2D images (N, H, W[, C]); set data.dims: 2"),
    ((28, 28, 3), 3, "look like 2D images (N, H, W[, C]); set data.dims: 2"),
    ((28, 28, 28, 2), 3, "3D images must have shape (N, D, H, W) or (N, D, H, W, 1)"),
])
def test_dims_mismatch_says_which_dims_to_set(tmp_path, shape, dims, expected):
    path = _write(tmp_path / "m.npz", _organ3d(images=lambda r, n: _volumes(r, n, shape)))
    with pytest.raises(DataError) as e:
        load_medmnist(path, ORGAN3D, dims=dims)
    assert str(path) in str(e.value) and "'train_images'" in str(e.value) and expected in str(e.value)
