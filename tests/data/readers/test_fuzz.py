"""Damaged files of every format the readers accept: the only exception allowed is
DataError, and its message names the file. Each case starts from a valid file and
truncates it, overwrites a stretch of it with random bytes, or replaces it by random
bytes. ``MEDFED_FUZZ_EXAMPLES`` raises the number of examples for a longer run."""

import io
import os
import shutil
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.data import get_testdata_file

from medfed.config import FolderData, PairsData, TaskConfig, VolumesData
from medfed.core.errors import DataError
from medfed.data.readers.folder import read_folder
from medfed.data.readers.medmnist import load_medmnist
from medfed.data.readers.pairs import read_pair_sites
from medfed.data.readers.volumes import read_volume_sites

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom and nibabel warn about damaged headers
FUZZ = settings(max_examples=int(os.environ.get("MEDFED_FUZZ_EXAMPLES", 40)), deadline=None)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def _nifti(array: np.ndarray, gz: bool) -> bytes:
    img = nib.Nifti1Image(array, np.diag([1.0, 2.0, 3.0, 1.0]))
    return (img.to_bytes() if not gz else __import__("gzip").compress(img.to_bytes(), mtime=0))


def _npz() -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    np.savez(buf, **{f"{s}_{k}": (rng.integers(0, 256, (n, 8, 8), dtype=np.uint8) if k == "images"
                                  else rng.integers(0, 2, (n, 1)))
                     for s, n in (("train", 3), ("val", 1), ("test", 2)) for k in ("images", "labels")})
    return buf.getvalue()


GREY = np.tile(np.arange(0, 240, 15, dtype=np.uint8), (12, 1))  # 12x16
MASK = np.where(GREY > 100, 255, 0).astype(np.uint8)
VALID = {
    "png": _png(GREY),
    "mask": _png(MASK),
    "nii": _nifti(np.arange(60, dtype=np.float32).reshape(3, 4, 5), gz=False),
    "nii.gz": _nifti(np.arange(60, dtype=np.float32).reshape(3, 4, 5), gz=True),
    "dcm": Path(get_testdata_file("CT_small.dcm")).read_bytes(),
    "npz": _npz(),
}


def damaged(valid: bytes):
    """Truncated at a drawn position, a stretch overwritten, or purely random bytes."""
    truncated = st.integers(0, len(valid) - 1).map(lambda n: valid[:n])
    overwritten = st.tuples(st.integers(0, len(valid) - 1), st.binary(min_size=1, max_size=32)).map(
        lambda t: valid[: t[0]] + t[1] + valid[t[0] + len(t[1]):])
    return st.one_of(truncated, overwritten, st.binary(max_size=2048))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _fresh(workdir: Path) -> Path:
    folder = workdir / uuid.uuid4().hex
    folder.mkdir()
    return folder


def _only_data_error(read, bad: Path) -> None:
    """``read()`` succeeds (the damage left a valid file) or raises DataError naming ``bad``."""
    try:
        read()
    except DataError as e:
        assert str(bad) in str(e), str(e)
    finally:
        shutil.rmtree(bad.parent.parent, ignore_errors=True)


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@FUZZ
@given(data=damaged(VALID["png"]), skip=st.booleans())
def test_png_in_a_folder_source(workdir, data, skip):
    root = _fresh(workdir)
    bad = _write(root / "img" / "bad.png", data)
    _write(root / "img" / "good.png", VALID["png"])
    (root / "labels.csv").write_text("file,label\nbad.png,1\ngood.png,0\n")
    cfg = FolderData(source="folder", sites=[{"name": "h1", "images": root / "img", "csv": root / "labels.csv"}],
                     label_columns=["label"], on_bad_file="skip" if skip else "error")
    try:
        (site,) = read_folder(cfg, TaskConfig(labels="binary"))
        assert len(site.records) == 2 or (skip and site.skipped[0][0] == str(bad))
    except DataError as e:
        assert not skip and str(bad) in str(e), str(e)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@FUZZ
@given(data=damaged(VALID["mask"]))
def test_mask_in_a_pairs_source(workdir, data):
    root = _fresh(workdir)
    _write(root / "image" / "a.png", VALID["png"])
    bad = _write(root / "mask" / "a.png", data)
    cfg = PairsData(source="pairs", sites=[{"name": "h1", "images": root / "image", "masks": root / "mask"}],
                    mask_values=[0, 255])
    _only_data_error(lambda: read_pair_sites(cfg), bad)


def _volumes(root: Path, fmt: str) -> VolumesData:
    return VolumesData(source="volumes", format=fmt, sites=[{"name": "h1", "images": root / "img", "masks": root / "msk"}])


@pytest.mark.parametrize("suffix", ["nii", "nii.gz"])
def test_nifti_image(workdir, suffix):
    @FUZZ
    @given(data=damaged(VALID[suffix]))
    def run(data):
        root = _fresh(workdir)
        bad = _write(root / "img" / f"v.{suffix}", data)
        _write(root / "msk" / "v.nii.gz", _nifti(np.zeros((3, 4, 5), np.uint8), gz=True))
        _only_data_error(lambda: read_volume_sites(_volumes(root, "nifti"), 2), bad)

    run()


@FUZZ
@given(data=damaged(VALID["dcm"]))
def test_dicom_file(workdir, data):
    root = _fresh(workdir)
    bad = _write(root / "img" / "ct.dcm", data)
    _write(root / "msk" / "ct.nii", _nifti(np.zeros((1, 128, 128), np.uint8), gz=False))
    _only_data_error(lambda: read_volume_sites(_volumes(root, "dicom"), 2), bad)


@FUZZ
@given(data=damaged(VALID["npz"]))
def test_medmnist_npz(workdir, data):
    bad = _write(_fresh(workdir) / "x" / "m.npz", data)
    _only_data_error(lambda: load_medmnist(bad, TaskConfig(labels="binary")), bad)
