from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from shared_data import SHARED_DATA

from medfed.core.errors import DataError
from medfed.data.readers.volumes import load_dicom, load_dicom_series, load_nifti, load_nifti_pair

VOLUMES = SHARED_DATA / "volumes"


def _nifti(path: Path, array: np.ndarray, zooms=(1.0, 2.0, 3.0)) -> Path:
    img = nib.Nifti1Image(array, np.diag([*zooms, 1.0]))
    img.header.set_zooms(zooms)
    nib.save(img, str(path))
    return path


def test_nifti_round_trip_keeps_spacing_and_affine(tmp_path):
    arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    vol = load_nifti(_nifti(tmp_path / "v.nii.gz", arr), "h1")
    assert np.array_equal(vol.array, arr) and vol.spacing == (1.0, 2.0, 3.0)
    assert np.allclose(np.diag(vol.affine), [1.0, 2.0, 3.0, 1.0])


def test_nifti_bad_inputs_are_named(tmp_path):
    good = _nifti(tmp_path / "v.nii.gz", np.zeros((2, 3, 4), np.float32))
    trunc = tmp_path / "trunc.nii.gz"
    trunc.write_bytes(good.read_bytes()[:60])
    with pytest.raises(DataError, match="trunc.nii.gz' is not a readable NIfTI"):
        load_nifti(trunc, "h1")
    with pytest.raises(DataError, match="not found"):
        load_nifti(tmp_path / "missing.nii", "h1")
    # zero spacing, as broken exports write it: nibabel would save (and load) it as 1, so
    # patch pixdim[2] (bytes 84-88 of a NIfTI-1 header) in the file itself
    flat = _nifti(tmp_path / "flat.nii", np.zeros((2, 3, 4), np.float32))
    raw = bytearray(flat.read_bytes())
    raw[84:88] = np.float32(0.0).tobytes()
    flat.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"site 'h1'.*flat.nii': voxel spacing must be positive, got \(1.0, 0.0, 3.0\)"):
        load_nifti(flat, "h1")
    nan = np.zeros((2, 3, 4), np.float32)
    nan[0, 0, 0] = np.nan
    with pytest.raises(DataError, match="1 voxel value"):
        load_nifti(_nifti(tmp_path / "nan.nii.gz", nan), "h1")


def test_nifti_pair_checks_shape_and_labels(tmp_path):
    img = _nifti(tmp_path / "img.nii.gz", np.zeros((2, 3, 4), np.float32))
    small = _nifti(tmp_path / "small.nii.gz", np.zeros((2, 3, 3), np.float32))
    with pytest.raises(DataError, match="image 'img.nii.gz' is \\(2, 3, 4\\) but its mask is \\(2, 3, 3\\)"):
        load_nifti_pair(img, small, "h1", 2)
    three = _nifti(tmp_path / "three.nii.gz", np.full((2, 3, 4), 3, np.float32))
    with pytest.raises(DataError, match="mask 'three.nii.gz' holds values \\[3.0\\], expected class indices 0..1"):
        load_nifti_pair(img, three, "h1", 2)


@pytest.mark.skipif(not (VOLUMES / "promise12_Case00.nii.gz").is_file(), reason=f"PROMISE12 volume not present in {VOLUMES}")
def test_real_promise12_volume_and_mask():
    vol, labels = load_nifti_pair(VOLUMES / "promise12_Case00.nii.gz", VOLUMES / "promise12_Case00_segmentation.nii.gz",
                                  "promise12", 2)
    assert vol.array.shape == (128, 128, 64) and labels.shape == (128, 128, 64)
    assert np.allclose(vol.spacing, (1.0937, 1.0937, 1.6156), atol=1e-3)
    assert set(np.unique(labels).tolist()) == {0, 1}


CT = get_testdata_file("CT_small.dcm")


def test_dicom_pixels_are_rescaled():
    raw = pydicom.dcmread(CT)
    vol = load_dicom(Path(CT), "h1")
    expected = raw.pixel_array.astype(np.float32) * float(raw.RescaleSlope) + float(raw.RescaleIntercept)
    assert np.array_equal(vol.array, expected) and float(raw.RescaleIntercept) == -1024.0
    assert vol.spacing == pytest.approx((0.661468, 0.661468))


def test_truncated_dicom_is_named(tmp_path):
    bad = tmp_path / "cut.dcm"
    bad.write_bytes(Path(CT).read_bytes()[:300])
    with pytest.raises(DataError, match="cut.dcm' is not a readable DICOM image"):
        load_dicom(bad, "h1")


def _series(folder: Path, zs, spacing=None):
    folder.mkdir()
    for i, z in enumerate(zs):
        ds = pydicom.dcmread(CT)
        ds.ImagePositionPatient = [0.0, 0.0, float(z)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        if spacing is not None and i == 1:
            ds.PixelSpacing = spacing
        ds.save_as(folder / f"slice_{(7 * i) % 10}.dcm")  # file names out of position order
    return folder


def test_dicom_series_sorted_by_position_with_spacing(tmp_path):
    vol = load_dicom_series(_series(tmp_path / "s", [5.0, 0.0, 2.5]), "h1")
    assert vol.array.shape == (3, 128, 128)
    assert vol.spacing == pytest.approx((2.5, 0.661468, 0.661468))


def test_inconsistent_or_repeated_series_is_named(tmp_path):
    with pytest.raises(DataError, match=r"series '.*odd' has inconsistent geometry"):
        load_dicom_series(_series(tmp_path / "odd", [0.0, 2.5, 5.0], spacing=[0.5, 0.5]), "h1")
    with pytest.raises(DataError, match="uneven or repeated slice positions"):
        load_dicom_series(_series(tmp_path / "dup", [0.0, 0.0, 2.5]), "h1")
