import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut

from shared_data import shared

from medfed.config import VolumesData
from medfed.core.errors import DataError
from medfed.data.readers.volumes import load_dicom, load_dicom_series, load_nifti, load_nifti_pair, read_volume_sites

CT = get_testdata_file("CT_small.dcm")
MR = get_testdata_file("MR_small.dcm")
MULTIFRAME = get_testdata_file("rtdose.dcm")  # 15 frames of 10x10, GridFrameOffsetVector 0, 5, ..., 70


def _nifti(path: Path, array: np.ndarray, zooms=(1.0, 2.0, 3.0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(array, np.diag([*zooms[:3], *[1.0] * (4 - min(len(zooms), 3))]))
    img.header.set_zooms(zooms)
    nib.save(img, str(path))
    return path


def _zero_spacing(path: Path) -> Path:
    """Patch pixdim[2] (bytes 84-88 of a NIfTI-1 header) to 0 in the file itself:
    nibabel would save (and load) a zero spacing as 1."""
    raw = bytearray(path.read_bytes())
    raw[84:88] = np.float32(0.0).tobytes()
    path.write_bytes(bytes(raw))
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
    with pytest.raises(DataError, match="site 'h1': '.*trunc.nii.gz': not a readable NIfTI"):
        load_nifti(trunc, "h1")
    with pytest.raises(DataError, match="not found"):
        load_nifti(tmp_path / "missing.nii", "h1")
    flat = _zero_spacing(_nifti(tmp_path / "flat.nii", np.zeros((2, 3, 4), np.float32)))
    with pytest.raises(DataError, match=r"site 'h1'.*flat.nii': voxel spacing must be positive, got \(1.0, 0.0, 3.0\)"):
        load_nifti(flat, "h1")
    nan = np.zeros((2, 3, 4), np.float32)
    nan[0, 0, 0] = np.nan
    with pytest.raises(DataError, match="1 voxel value"):
        load_nifti(_nifti(tmp_path / "nan.nii.gz", nan), "h1")


def test_nifti_pair_checks_shape_and_labels(tmp_path):
    img = _nifti(tmp_path / "img.nii.gz", np.zeros((2, 3, 4), np.float32))
    small = _nifti(tmp_path / "small.nii.gz", np.zeros((2, 3, 3), np.float32))
    with pytest.raises(DataError, match=r"img.nii.gz' is \(2, 3, 4\) but its mask '.*small.nii.gz' is \(2, 3, 3\)"):
        load_nifti_pair(img, small, "h1", 2)
    three = _nifti(tmp_path / "three.nii.gz", np.full((2, 3, 4), 3, np.float32))
    with pytest.raises(DataError, match=r"mask '.*three.nii.gz' holds values \[3.0\] outside the class indices 0..1"):
        load_nifti_pair(img, three, "h1", 2)


# --------------------------------------------------------------------------- DICOM files


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_dicom_pixels_are_rescaled_and_spacing_read(name):
    path = get_testdata_file(name)
    raw = pydicom.dcmread(path)
    vol = load_dicom(Path(path), "h1")
    expected = apply_modality_lut(raw.pixel_array, raw).astype(np.float32)
    assert vol.array.dtype == np.float32 and np.array_equal(vol.array, expected)
    assert vol.spacing == pytest.approx(tuple(float(v) for v in raw.PixelSpacing))
    if name == "CT_small.dcm":  # Hounsfield units: stored values shifted by the intercept
        assert float(raw.RescaleIntercept) == -1024.0 and vol.array.min() == raw.pixel_array.min() - 1024


def test_multi_frame_dicom():
    raw = pydicom.dcmread(MULTIFRAME)
    vol = load_dicom(Path(MULTIFRAME), "h1")
    assert vol.array.shape == (15, 10, 10) and np.array_equal(vol.array, raw.pixel_array.astype(np.float32))
    assert vol.spacing == pytest.approx((5.0, 10.0, 10.0))


def test_enhanced_multi_frame_functional_groups(tmp_path):
    """Spacing and per-frame rescale from the functional groups of an enhanced file."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = pydicom.dcmread(MULTIFRAME)
    for name in ("PixelSpacing", "GridFrameOffsetVector"):
        delattr(ds, name)
    measures = Dataset()
    measures.PixelSpacing = [0.5, 0.25]
    measures.SpacingBetweenSlices = 2.0
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for i in range(15):
        transform = Dataset()
        transform.RescaleSlope, transform.RescaleIntercept = float(i + 1), -1.0
        group = Dataset()
        group.PixelValueTransformationSequence = Sequence([transform])
        frames.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.save_as(tmp_path / "enhanced.dcm")
    vol = load_dicom(tmp_path / "enhanced.dcm", "h1")
    raw = ds.pixel_array.astype(np.float64)
    assert vol.spacing == (2.0, 0.5, 0.25)
    assert np.allclose(vol.array, raw * np.arange(1, 16)[:, None, None] - 1.0, rtol=1e-6)


def test_modality_lut_maps_stored_values(tmp_path):
    """A file whose modality transform is a lookup table (ModalityLUTSequence) rather than
    slope and intercept: each stored value v becomes table[v - first], clipped to the
    table's ends (PS3.3 C.11.1)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, meta.MediaStorageSOPInstanceUID, "CT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 4, 5, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelSpacing = [0.5, 0.25]
    stored = (np.arange(20, dtype=np.uint16) + 10).reshape(4, 5)  # 10..29
    ds.PixelData = stored.tobytes()
    lut = Dataset()
    lut.add_new(0x00283002, "US", [16, 12, 16])  # LUTDescriptor: 16 entries, the first for stored 12, 16 bits
    lut.ModalityLUTType = "US"
    lut.add_new(0x00283006, "US", [3 * i * i for i in range(16)])  # LUTData: no slope and intercept fit it
    ds.ModalityLUTSequence = Sequence([lut])
    ds.save_as(tmp_path / "lut.dcm", enforce_file_format=True)

    vol = load_dicom(tmp_path / "lut.dcm", "h1")
    expected = np.array([[0, 0, 0, 3, 12],  # 10, 11 below the table: its first entry
                         [27, 48, 75, 108, 147],
                         [192, 243, 300, 363, 432],
                         [507, 588, 675, 675, 675]], dtype=np.float32)  # 28, 29 past it: its last
    assert vol.array.dtype == np.float32 and np.array_equal(vol.array, expected)
    assert vol.spacing == (0.5, 0.25)


def test_dicom_without_pixel_spacing_has_no_spacing(tmp_path):
    ds = pydicom.dcmread(CT)
    del ds.PixelSpacing
    ds.save_as(tmp_path / "nospacing.dcm")
    assert load_dicom(tmp_path / "nospacing.dcm", "h1").spacing is None


def test_truncated_colour_and_non_image_dicom_are_named(tmp_path):
    bad = tmp_path / "cut.dcm"
    bad.write_bytes(Path(CT).read_bytes()[:300])
    with pytest.raises(DataError, match="site 'h1': '.*cut.dcm': not a readable DICOM image"):
        load_dicom(bad, "h1")
    with pytest.raises(DataError, match="colour DICOM image"):
        load_dicom(Path(get_testdata_file("SC_rgb_rle_2frame.dcm")), "h1")
    with pytest.raises(DataError, match="rtplan.dcm': not a readable DICOM image"):
        load_dicom(Path(get_testdata_file("rtplan.dcm")), "h1")


def _series(folder: Path, zs, edit=None):
    folder.mkdir(parents=True)
    for i, z in enumerate(zs):
        ds = pydicom.dcmread(CT)
        ds.ImagePositionPatient = [0.0, 0.0, float(z)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        if edit is not None and i == 1:
            edit(ds)
        ds.save_as(folder / f"slice_{(7 * i) % 10}.dcm")  # file names out of position order
    return folder


def test_dicom_series_sorted_by_position_with_spacing(tmp_path):
    vol = load_dicom_series(_series(tmp_path / "s", [5.0, 0.0, 2.5]), "h1")
    assert vol.array.shape == (3, 128, 128)
    assert vol.spacing == pytest.approx((2.5, 0.661468, 0.661468))
    one = pydicom.dcmread(CT)
    assert np.array_equal(vol.array[0], apply_modality_lut(one.pixel_array, one).astype(np.float32))


def _smaller(ds):
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[:64, :100]).tobytes()
    ds.Rows, ds.Columns = 64, 100


@pytest.mark.parametrize("edit, expected", [
    (lambda ds: setattr(ds, "PixelSpacing", [0.5, 0.5]), "pixel spacing (0.5, 0.5) vs (0.661468, 0.661468)"),
    (_smaller, "size (64, 100) vs (128, 128)"),
    (lambda ds: setattr(ds, "ImageOrientationPatient", [0, 1, 0, 0, 0, 1]), "orientation"),
])
def test_inconsistent_series_is_named(tmp_path, edit, expected):
    folder = _series(tmp_path / "odd", [0.0, 2.5, 5.0], edit)
    with pytest.raises(DataError) as e:
        load_dicom_series(folder, "h1")
    msg = str(e.value)
    assert f"site 'h1': '{folder}': DICOM series has inconsistent geometry: 'slice_7.dcm' differs" in msg
    assert expected in msg


def test_repeated_positions_mixed_series_and_missing_position_are_named(tmp_path):
    with pytest.raises(DataError, match=r"'.*dup': DICOM series has uneven or repeated slice positions"):
        load_dicom_series(_series(tmp_path / "dup", [0.0, 0.0, 2.5]), "h1")
    with pytest.raises(DataError, match=r"'.*mixed': the folder holds files of 2 DICOM series"):
        load_dicom_series(_series(tmp_path / "mixed", [0.0, 2.5], lambda ds: setattr(ds, "SeriesInstanceUID", "1.2.3")),
                          "h1")
    with pytest.raises(DataError, match=r"'.*nopos': series file 'slice_7.dcm' lacks its position"):
        load_dicom_series(_series(tmp_path / "nopos", [0.0, 2.5], lambda ds: delattr(ds, "ImagePositionPatient")), "h1")
    with pytest.raises(DataError, match=r"'.*cut/slice_7.dcm': not a readable DICOM image"):
        folder = _series(tmp_path / "cut", [0.0, 2.5])
        (folder / "slice_7.dcm").write_bytes((folder / "slice_7.dcm").read_bytes()[:500])
        load_dicom_series(folder, "h1")


# --------------------------------------------------------------------------- read_volume_sites


def _cfg(root: Path, fmt="nifti", **kw) -> VolumesData:
    return VolumesData(source="volumes", format=fmt, sites=[{"name": "h1", "images": root / "img", "masks": root / "msk"}],
                       **kw)


def _nifti_site(root: Path, names=("a", "b"), shape=(4, 5, 6)):
    rng = np.random.default_rng(0)
    for i, name in enumerate(names):
        suffix = ".nii.gz" if i % 2 else ".nii"
        _nifti(root / "img" / f"{name}{suffix}", rng.random(shape).astype(np.float32))
        _nifti(root / "msk" / f"{name}.nii.gz", rng.integers(0, 3, shape).astype(np.uint8))


def test_nifti_sites(tmp_path):
    _nifti_site(tmp_path)
    (tmp_path / "img" / "README.txt").write_text("ignored")
    (site,) = read_volume_sites(_cfg(tmp_path), num_classes=3)
    assert site.name == "h1" and [r.name for r in site.records] == ["a", "b"] and site.skipped == []
    r = site.records[1]
    assert r.image.shape == (1, 4, 5, 6) and r.image.dtype == np.float32
    assert r.target.shape == (4, 5, 6) and r.target.dtype == np.int64 and set(np.unique(r.target)) <= {0, 1, 2}
    assert r.spacing == (1.0, 2.0, 3.0) and r.split is None
    expected = nib.load(str(tmp_path / "img" / "b.nii.gz")).get_fdata().astype(np.float32)
    assert np.array_equal(r.image[0], expected)


def test_nifti_sites_train_test(tmp_path):
    _nifti_site(tmp_path / "tr")
    _nifti_site(tmp_path / "te", names=("c",))
    cfg = VolumesData(source="volumes", sites=[{"name": "h1",
                      "train": {"images": tmp_path / "tr" / "img", "masks": tmp_path / "tr" / "msk"},
                      "test": {"images": tmp_path / "te" / "img", "masks": tmp_path / "te" / "msk"}}])
    (site,) = read_volume_sites(cfg, 3)
    assert [(r.name, r.split) for r in site.records] == [("train/a", "train"), ("train/b", "train"), ("test/c", "test")]


def test_volume_site_errors(tmp_path):
    _nifti_site(tmp_path)
    cfg = _cfg(tmp_path, on_bad_file="skip")
    # unmatched names, also with skip
    os.rename(tmp_path / "msk" / "b.nii.gz", tmp_path / "msk" / "z.nii.gz")
    with pytest.raises(DataError, match="site 'h1': images without a mask: b.nii.gz; masks without an image: z.nii.gz"):
        read_volume_sites(cfg, 3)
    # mask of the wrong shape: both shapes named
    _nifti(tmp_path / "msk" / "b.nii.gz", np.zeros((4, 5, 7), np.uint8))
    (tmp_path / "msk" / "z.nii.gz").unlink()
    with pytest.raises(DataError, match=r"site 'h1': image '.*b.nii.gz' is \(4, 5, 6\) but its mask '.*b.nii.gz' is \(4, 5, 7\)"):
        read_volume_sites(cfg, 3)
    # labels outside the classes
    _nifti(tmp_path / "msk" / "b.nii.gz", np.full((4, 5, 6), 5, np.uint8))
    with pytest.raises(DataError, match=r"site 'h1': mask '.*b.nii.gz' holds values \[5.0\] outside the class indices 0..2"):
        read_volume_sites(cfg, 3)
    # one name twice
    _nifti(tmp_path / "msk" / "b.nii.gz", np.zeros((4, 5, 6), np.uint8))
    _nifti(tmp_path / "img" / "b.nii", np.zeros((4, 5, 6), np.float32))
    with pytest.raises(DataError, match="image 'b.nii' and 'b.nii.gz' in '.*img' share the name 'b'"):
        read_volume_sites(cfg, 3)


def test_zero_spacing_and_4d_images_are_named(tmp_path):
    _nifti_site(tmp_path)
    _zero_spacing(tmp_path / "img" / "a.nii")
    with pytest.raises(DataError, match=r"site 'h1': '.*a.nii': voxel spacing must be positive"):
        read_volume_sites(_cfg(tmp_path), 3)
    _nifti(tmp_path / "img" / "a.nii", np.zeros((4, 5, 6, 2), np.float32), zooms=(1.0, 2.0, 3.0, 1.0))
    with pytest.raises(DataError, match=r"'.*a.nii': array of shape \(4, 5, 6, 2\) is not a 3D volume"):
        read_volume_sites(_cfg(tmp_path), 3)
    _nifti(tmp_path / "img" / "a.nii", np.zeros((4, 5, 6, 1), np.float32), zooms=(1.0, 2.0, 3.0, 1.0))
    assert read_volume_sites(_cfg(tmp_path), 3)[0].records[0].image.shape == (1, 4, 5, 6)


def test_corrupt_volume_is_an_error_or_skipped(tmp_path):
    _nifti_site(tmp_path, names=("a", "b", "c"))
    bad = tmp_path / "msk" / "b.nii.gz"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(DataError, match=f"site 'h1': '{bad}': not a readable NIfTI"):
        read_volume_sites(_cfg(tmp_path), 3)
    (site,) = read_volume_sites(_cfg(tmp_path, on_bad_file="skip"), 3)
    assert [r.name for r in site.records] == ["a", "c"] and [p for p, _ in site.skipped] == [str(bad)]


def test_empty_site_folder(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    with pytest.raises(DataError, match="site 'h1': no image volumes in '.*img'"):
        read_volume_sites(_cfg(tmp_path), 2)
    with pytest.raises(DataError, match="site 'h1': image folder '.*nothere' not found"):
        read_volume_sites(VolumesData(source="volumes", sites=[{"name": "h1", "images": tmp_path / "nothere",
                                                                 "masks": tmp_path / "msk"}]), 2)


def test_dicom_sites(tmp_path):
    _series(tmp_path / "img" / "ser", [0.0, 2.5, 5.0])
    (tmp_path / "img" / "DICOMDIR").write_bytes(b"index, ignored")
    os.symlink(CT, tmp_path / "img" / "ct.dcm")
    os.symlink(MULTIFRAME, tmp_path / "img" / "dose.dcm")
    _nifti(tmp_path / "msk" / "ser.nii.gz", np.zeros((3, 128, 128), np.uint8))
    _nifti(tmp_path / "msk" / "ct.nii", np.ones((128, 128), np.uint8), (1.0, 1.0))  # size-1 axes aside
    _nifti(tmp_path / "msk" / "dose.nii.gz", np.ones((15, 10, 10), np.uint8))
    (site,) = read_volume_sites(_cfg(tmp_path, "dicom"), 2)
    by_name = {r.name: r for r in site.records}
    assert sorted(by_name) == ["ct", "dose", "ser"]
    assert by_name["ser"].image.shape == (1, 3, 128, 128) and by_name["ser"].spacing == pytest.approx((2.5, 0.661468, 0.661468))
    assert by_name["ct"].image.shape == (1, 1, 128, 128) and by_name["ct"].spacing == pytest.approx((5.0, 0.661468, 0.661468))
    assert by_name["ct"].target.shape == (1, 128, 128) and int(by_name["ct"].target.sum()) == 128 * 128
    assert by_name["dose"].image.shape == (1, 15, 10, 10) and by_name["dose"].spacing == pytest.approx((5.0, 10.0, 10.0))


def test_dicom_mask_in_nifti_axis_order_gets_a_hint(tmp_path):
    _series(tmp_path / "img" / "ser", [0.0, 2.5])
    _nifti(tmp_path / "msk" / "ser.nii.gz", np.zeros((128, 128, 2), np.uint8))
    with pytest.raises(DataError, match=r"is \(2, 128, 128\) but its mask .* is \(128, 128, 2\); the mask seems to be"):
        read_volume_sites(_cfg(tmp_path, "dicom"), 2)


def test_bad_dicom_series_is_skipped_by_name(tmp_path):
    _series(tmp_path / "img" / "good", [0.0, 2.5])
    _series(tmp_path / "img" / "odd", [0.0, 2.5, 5.0], lambda ds: setattr(ds, "PixelSpacing", [0.5, 0.5]))
    for name in ("good", "odd"):
        _nifti(tmp_path / "msk" / f"{name}.nii.gz", np.zeros((3 if name == "odd" else 2, 128, 128), np.uint8))
    with pytest.raises(DataError, match=r"site 'h1': '.*odd': DICOM series has inconsistent geometry"):
        read_volume_sites(_cfg(tmp_path, "dicom"), 2)
    (site,) = read_volume_sites(_cfg(tmp_path, "dicom", on_bad_file="skip"), 2)
    assert [r.name for r in site.records] == ["good"] and site.skipped[0][0] == str(tmp_path / "img" / "odd")


# --------------------------------------------------------------------------- real data


def test_real_promise12_volume_and_mask():
    root = shared("volumes")
    image, mask = root / "promise12_Case00.nii.gz", root / "promise12_Case00_segmentation.nii.gz"
    vol, labels = load_nifti_pair(image, mask, "promise12", 2)
    assert vol.array.shape == (128, 128, 64) and labels.shape == (128, 128, 64)
    assert np.allclose(vol.spacing, (1.0937, 1.0937, 1.6156), atol=1e-3)
    assert set(np.unique(labels).tolist()) == {0, 1}


def _promise12_site(tmp_path):
    """The PROMISE12 case through read_volume_sites, its image and mask linked under one name."""
    root = shared("volumes")
    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    os.symlink(root / "promise12_Case00.nii.gz", tmp_path / "img" / "Case00.nii.gz")
    os.symlink(root / "promise12_Case00_segmentation.nii.gz", tmp_path / "msk" / "Case00.nii.gz")
    (site,) = read_volume_sites(_cfg(tmp_path), 2)
    return site


def test_real_promise12_through_read_volume_sites(tmp_path):
    site = _promise12_site(tmp_path)
    (r,) = site.records
    assert r.name == "Case00" and r.image.shape == (1, 128, 128, 64) and r.target.shape == (128, 128, 64)
    assert np.allclose(r.spacing, (1.0937, 1.0937, 1.6156), atol=1e-3)
    assert set(np.unique(r.target).tolist()) == {0, 1} and 0 < r.target.mean() < 0.5


def test_real_promise12_resampled_trains_one_3d_step_and_segments_by_sliding_window(tmp_path):
    import torch

    from medfed.algorithms.base import SiteHook
    from medfed.config import ModelConfig, SegmentationTaskConfig, TransformsConfig
    from medfed.core.types import TrainSettings
    from medfed.data.base import ArraySplit
    from medfed.data.transforms import build_augment, build_preprocess
    from medfed.models import build_model
    from medfed.site.train import train_local
    from medfed.tasks.segmentation import SegmentationTask

    site = _promise12_site(tmp_path)
    steps = TransformsConfig(preprocess=[{"name": "spacing", "pixdim": [2.2, 2.2, 3.2]}, {"name": "normalize"},
                                         {"name": "crop_or_pad", "size": [64, 64, 32]}]).preprocess
    rec = build_preprocess(steps, 3, True)(site.records[0])
    assert rec.image.shape == (1, 64, 64, 32) and rec.spacing == (2.2, 2.2, 3.2)
    assert set(np.unique(rec.target).tolist()) == {0, 1}
    data = ArraySplit(torch.from_numpy(rec.image)[None].repeat(2, 1, 1, 1, 1),
                      torch.from_numpy(rec.target)[None].repeat(2, 1, 1, 1), spacing=rec.spacing)
    task_cfg = SegmentationTaskConfig(kind="segmentation", num_classes=2)
    task = SegmentationTask(task_cfg, patch=(32, 32, 16))
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="unet", width=4), task_cfg, 1, spatial_dims=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = TrainSettings(local_epochs=1, batch_size=2, lr=0.01, optimizer="adam", momentum=0.0,
                             weight_decay=0.0, seed=0)
    augment = build_augment([], (32, 32, 16), 3, True)
    stats = train_local(model, data, task, settings, SiteHook(), torch.device("cpu"), augment=augment)
    assert stats.num_steps == 1 and np.isfinite(stats.mean_loss)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()
    with torch.no_grad():
        logits = task.infer(model, data.images[:1])
    assert logits.shape == (1, 2, 64, 64, 32)
