"""DICOM SEG masks of DICOM series (``volumes``, ``format: dicom``, ``masks_format: seg``):
matched to their series by the SOP instances they reference, read in the series' slice
order, segments mapped to classes; every refusal named, none quoting a patient."""

import shutil
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from dicom_files import PHI
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medfed.config import VolumesData, parse_job
from medfed.core.errors import ConfigError, DataError
from medfed.data.base import Planned
from medfed.data.readers.dicom_seg import _reason
from medfed.data.readers.folder import UnreadableFile
from medfed.data.readers.volumes import index_volume_sites, load_dicom, load_dicom_series, read_volume_sites
from medfed.data.sites import build_sites

N, SIZE = 4, 16


def _slices(n: int = N, size: int = SIZE) -> list[FileDataset]:
    """A CT series in position order: slice i at z = 2.5 i, pixel (0, 0) = 100 i - 1024 HU."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out = []
    for i in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset("ct", {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientSex, ds.StudyDate, ds.StudyTime = "CT", "O", "20240101", "120000"
        ds.ReferringPhysicianName, ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "", "1", 1, i + 1
        for key, value in PHI.items():
            setattr(ds, key, value)
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, 2.5 * i], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness, ds.RescaleSlope, ds.RescaleIntercept = [0.5, 0.5], 2.5, 1, -1024
        pixels = np.arange(size * size, dtype=np.uint16).reshape(size, size) % 50 + 100 * i
        ds.set_pixel_data(pixels, "MONOCHROME2", 16, generate_instance_uid=False)
        out.append(ds)
    return out


def _write_series(folder: Path, slices: list[FileDataset]) -> Path:
    """The slices as files whose names (no suffix) run against their positions, written in
    a shuffled order."""
    folder.mkdir(parents=True)
    for k in np.random.default_rng(1).permutation(len(slices)):
        slices[k].save_as(folder / f"IM{len(slices) - k:04d}", enforce_file_format=True)
    return folder


def _masks(n: int = N, size: int = SIZE) -> np.ndarray:
    """(slices, rows, cols, 2) booleans: liver on slices 1-2, a tumour overlapping it on
    slice 2, slice 3 empty (the SEG leaves its frame out)."""
    m = np.zeros((n, size, size, 2), bool)
    m[1, 2:6, 2:6, 0] = True
    m[2, 4:10, 4:10, 0] = True
    m[2, 8:12, 8:12, 1] = True
    return m


def _descriptions(labels=("liver", "tumour")):
    return [hd.seg.SegmentDescription(
        segment_number=k + 1, segment_label=label, segmented_property_category=codes.cid7150.Tissue,
        segmented_property_type=codes.cid7166.ConnectiveTissue, algorithm_type="MANUAL",
    ) for k, label in enumerate(labels)]


def _seg(path: Path, sources, pixels: np.ndarray, kind: str = "BINARY", labels=("liver", "tumour")) -> Path:
    """A SEG of ``sources`` (``pixels[i]`` segments ``sources[i]``; of frame i of a single
    multi-frame source). A series is handed to highdicom in reverse order, so that the
    SEG's frames do not follow the series' slice order."""
    if len(sources) > 1:
        sources, pixels = list(sources)[::-1], pixels[::-1]
    seg = hd.seg.Segmentation(
        source_images=list(sources), pixel_array=np.ascontiguousarray(pixels), segmentation_type=kind,
        segment_descriptions=_descriptions(labels), series_instance_uid=generate_uid(), series_number=9,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="m", manufacturer_model_name="mm",
        software_versions="1", device_serial_number="1",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return path


def _labels(masks: np.ndarray, classes=(1, 2)) -> np.ndarray:
    out = np.zeros(masks.shape[:3], np.int64)
    for k in np.argsort(classes, kind="stable"):  # the higher class is written last
        out[masks[..., k]] = classes[k]
    return out


def _cfg(root: Path, **kw) -> VolumesData:
    return VolumesData(source="volumes", format="dicom", masks_format="seg",
                       sites=[{"name": "h1", "images": root / "img", "masks": root / "msk"}], **kw)


def _site(root: Path, name: str = "ct_abdomen", seg_name: str = "export/1-1.dcm", masks=None):
    slices = _slices()
    _write_series(root / "img" / name, slices)
    masks = _masks() if masks is None else masks
    return slices, _seg(root / "msk" / seg_name, slices, masks), masks


def _leaks(text: str) -> list[str]:
    return [v for v in PHI.values() if v in text]


def _error(call, *args, kind=DataError) -> str:
    with pytest.raises(kind) as e:
        call(*args)
    assert not _leaks(str(e.value)), str(e.value)
    return str(e.value)


# --------------------------------------------------------------------------- reading


def test_seg_is_matched_by_references_and_read_in_series_order(tmp_path):
    _, seg_path, masks = _site(tmp_path)
    (tmp_path / "msk" / "README.txt").write_text("not DICOM: ignored")
    (site,) = read_volume_sites(_cfg(tmp_path), num_classes=3)
    (record,) = site.records
    assert record.name == "ct_abdomen"  # the series folder's name, not the SEG's
    series = load_dicom_series(tmp_path / "img" / "ct_abdomen", "h1")
    assert np.array_equal(record.image[0], series.array)
    assert record.image[0, :, 0, 0].tolist() == [-1024, -924, -824, -724]  # slices in position order
    assert record.spacing == pytest.approx((2.5, 0.5, 0.5))
    assert record.target.dtype == np.int64 and np.array_equal(record.target, _labels(masks))
    assert (record.target[2] == 2).sum() == 16 and (record.target[2] == 1).sum() == 32  # overlap: tumour wins
    (entry,) = index_volume_sites(_cfg(tmp_path), 3)[0].entries
    assert entry.mask == seg_path and str(seg_path) in entry.files()


def test_fractional_seg_is_thresholded_at_one_half(tmp_path):
    slices = _slices()
    _write_series(tmp_path / "img" / "ct", slices)
    prob = np.zeros((N, SIZE, SIZE, 1), np.float32)
    prob[1, 0:4, 0:4, 0], prob[1, 4:8, 0:4, 0], prob[1, 8:12, 0:4, 0], prob[1, 12:16, 0:4, 0] = 0.2, 0.45, 0.55, 1.0
    _seg(tmp_path / "msk" / "prob.dcm", slices, prob, "FRACTIONAL", labels=("liver",))
    (record,) = read_volume_sites(_cfg(tmp_path), 2)[0].records
    expected = np.zeros((N, SIZE, SIZE), np.int64)
    expected[1, 8:16, 0:4] = 1
    assert np.array_equal(record.target, expected)


@pytest.mark.parametrize("segments, classes", [
    ({1: "tumour", 2: 1}, (2, 1)),  # by label and number; liver now the higher class, so it wins the overlap
    ({1: "tumour"}, (0, 1)),  # a segment left out is background
    ({1: ["liver", "tumour"]}, (1, 1)),  # two segments make one class
])
def test_segments_map_to_classes(tmp_path, segments, classes):
    _, _, masks = _site(tmp_path)
    (record,) = read_volume_sites(_cfg(tmp_path, segments=segments), 3)[0].records
    assert np.array_equal(record.target, _labels(masks, classes))


def test_multi_frame_image_is_read_by_frame(tmp_path):
    slices = _slices()
    frames = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=slices, series_instance_uid=generate_uid(), series_number=3, sop_instance_uid=generate_uid(),
        instance_number=1)
    (tmp_path / "img").mkdir()
    frames.save_as(tmp_path / "img" / "enhanced.dcm")
    image = load_dicom(tmp_path / "img" / "enhanced.dcm", "h1").array
    order = [int(round((v + 1024) / 100)) for v in image[:, 0, 0]]  # the slice each frame holds
    assert order != sorted(order)  # highdicom stores the frames in another order than the slices
    by_slice = _masks()
    _seg(tmp_path / "msk" / "seg.dcm", [frames], by_slice[order][..., :1], labels=("liver",))
    (record,) = read_volume_sites(_cfg(tmp_path), 2)[0].records
    assert record.name == "enhanced" and record.image.shape == (1, N, SIZE, SIZE)
    assert np.array_equal(record.target, by_slice[order][..., 0].astype(np.int64))
    _edit(tmp_path / "msk" / "seg.dcm", lambda ds: setattr(
        ds.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0],
        "ReferencedFrameNumber", 9))
    assert "1 frame(s) do not name a frame 1..4 of the multi-frame image" in _error(read_volume_sites, _cfg(tmp_path), 2)


def test_memory_and_streamed_sites_give_the_same_masks(tmp_path):
    rng = np.random.default_rng(0)
    written = {}
    for i in range(6):
        masks = rng.random((N, SIZE, SIZE, 2)) < 0.2
        _site(tmp_path, name=f"case{i}", seg_name=f"seg_{5 - i}.dcm", masks=masks)
        written[f"case{i}"] = torch.from_numpy(_labels(masks))

    def masks_by_name(cache):
        job = parse_job({
            "name": "seg", "output": str(tmp_path / "run"), "rounds": 1, "threads": 1,
            "data": {**_cfg(tmp_path).model_dump(mode="json"), "cache": cache, "loader": {"workers": 0},
                     "split": {"val": 0.25, "test": 0.25}},
            "model": {"name": "unet", "width": 4}, "task": {"kind": "segmentation", "num_classes": 3},
        })
        (site,) = build_sites(job)
        out = {}
        for which in ("train", "val", "test"):
            split = site.split(which)
            (batch,) = split.batches([Planned(torch.arange(len(split)))])
            out.update(zip(split.names, batch.labels))
        return out

    memory, streamed = masks_by_name("memory"), masks_by_name("none")
    assert sorted(memory) == sorted(streamed) == sorted(written)
    assert all(torch.equal(memory[n], written[n]) and torch.equal(streamed[n], written[n]) for n in written)


# --------------------------------------------------------------------------- refusals


def test_matching_errors_name_the_files(tmp_path):
    slices, seg_path, _ = _site(tmp_path)
    cfg = _cfg(tmp_path)
    # a series without a SEG
    _write_series(tmp_path / "img" / "chest", _slices())
    assert "image volumes without a DICOM SEG: chest" in _error(read_volume_sites, cfg, 3)
    shutil.rmtree(tmp_path / "img" / "chest")
    # two SEGs of one series
    shutil.copy(seg_path, tmp_path / "msk" / "again.dcm")
    msg = _error(read_volume_sites, cfg, 3)
    assert "DICOM SEGs" in msg and "again.dcm" in msg and "1-1.dcm" in msg and "both segment" in msg
    (tmp_path / "msk" / "again.dcm").unlink()
    # a SEG of a series that is not there
    other = _slices()
    _seg(tmp_path / "msk" / "stray.dcm", other, _masks())
    assert f"'{tmp_path / 'msk' / 'stray.dcm'}' references none of the image volumes" in _error(read_volume_sites, cfg, 3)
    (tmp_path / "msk" / "stray.dcm").unlink()
    # a SEG referencing an instance the series lacks
    (tmp_path / "img" / "ct_abdomen" / "IM0001").unlink()
    assert "references 1 instance(s) that are not in" in _error(read_volume_sites, cfg, 3)
    # no SEG at all (a DICOM image in the masks folder is not one)
    seg_path.unlink()
    slices[0].save_as(seg_path, enforce_file_format=True)
    assert "no DICOM SEG files (SOP Class Segmentation Storage)" in _error(read_volume_sites, cfg, 3)


def _edit(path: Path, edit) -> None:
    ds = pydicom.dcmread(path)
    edit(ds)
    ds.save_as(path)


def test_seg_of_two_series_or_of_unplaceable_frames_is_an_error(tmp_path):
    _, seg_path, _ = _site(tmp_path)
    chest = _slices()
    _write_series(tmp_path / "img" / "chest", chest)
    _seg(tmp_path / "msk" / "chest.dcm", chest, _masks())
    original = seg_path.read_bytes()

    def also_chest(ds):
        ref = pydicom.Dataset()
        ref.SeriesInstanceUID = chest[0].SeriesInstanceUID
        item = pydicom.Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = CTImageStorage, chest[0].SOPInstanceUID
        ref.ReferencedInstanceSequence = [item]
        ds.ReferencedSeriesSequence.append(ref)

    _edit(seg_path, also_chest)
    assert "references images of 2 volumes (chest, ct_abdomen); a SEG segments one series" in _error(
        read_volume_sites, _cfg(tmp_path), 3)
    seg_path.write_bytes(original)
    _edit(seg_path, lambda ds: setattr(ds.PerFrameFunctionalGroupsSequence[1].DerivationImageSequence[0]
                                       .SourceImageSequence[0], "SpatialLocationsPreserved", "NO"))
    assert "pixel locations were not preserved (SpatialLocationsPreserved NO)" in _error(
        read_volume_sites, _cfg(tmp_path), 3)
    seg_path.write_bytes(original)
    _edit(seg_path, lambda ds: delattr(ds.PerFrameFunctionalGroupsSequence[0], "DerivationImageSequence"))
    assert "1 of its 3 frame(s) do not record their source image" in _error(read_volume_sites, _cfg(tmp_path), 3)


def test_segment_and_class_errors(tmp_path):
    _site(tmp_path)
    msg = _error(read_volume_sites, _cfg(tmp_path, segments={1: "spleen"}), 3)
    assert "1-1.dcm' has no segment labelled 'spleen' (data.segments, class 1)" in msg
    assert "has no segment number 7" in _error(read_volume_sites, _cfg(tmp_path, segments={1: 7}), 3)
    assert "segment 1 is named twice" in _error(read_volume_sites, _cfg(tmp_path, segments={1: "liver", 2: 1}), 3)
    assert "segment number(s) [2] but the task has 2 classes" in _error(read_volume_sites, _cfg(tmp_path), 2)
    msg = _error(read_volume_sites, _cfg(tmp_path, segments={2: "liver"}), 2)
    assert "data.segments names class 2 but the task has 2 classes" in msg


def test_frames_of_another_size_are_an_error(tmp_path):
    slices = _slices()
    _seg(tmp_path / "msk" / "seg.dcm", slices, _masks())
    small = _slices(size=8)
    for big, little in zip(slices, small):  # the same instances, stored smaller
        little.SOPInstanceUID = little.file_meta.MediaStorageSOPInstanceUID = big.SOPInstanceUID
    _write_series(tmp_path / "img" / "ct", small)
    assert "has frames of (16, 16) pixels but the images of" in _error(read_volume_sites, _cfg(tmp_path), 3)


def test_damaged_seg_is_unreadable_or_skipped(tmp_path):
    _site(tmp_path, name="good", seg_name="a.dcm")
    _, cut, _ = _site(tmp_path, name="cut", seg_name="b.dcm")
    cut.write_bytes(cut.read_bytes()[:-20])  # pixel data truncated: found when read
    assert f"'{cut}': not a readable DICOM SEG" in _error(read_volume_sites, _cfg(tmp_path), 3, kind=UnreadableFile)
    (site,) = read_volume_sites(_cfg(tmp_path, on_bad_file="skip"), 3)
    assert [r.name for r in site.records] == ["good"] and [p for p, _ in site.skipped] == [str(cut)]


def test_seg_errors_quote_no_patient(tmp_path):
    a = _site(tmp_path, name="good", seg_name="a.dcm")[1]
    ds = pydicom.dcmread(a)
    with warnings.catch_warnings():  # pydicom warns of the invalid value
        warnings.simplefilter("ignore")
        ds.SegmentationType = PHI["PatientName"]  # highdicom refuses it, quoting the value
        ds.save_as(a)
    msg = _error(read_volume_sites, _cfg(tmp_path), 3, kind=UnreadableFile)
    assert f"'{a}': not a readable DICOM SEG (ValueError: '<header value>' is not a valid" in msg


def test_unreadable_seg_header_is_skipped_with_its_series(tmp_path):
    a = _site(tmp_path, name="good", seg_name="a.dcm")[1]
    _site(tmp_path, name="other", seg_name="b.dcm")
    a.write_bytes(a.read_bytes()[:1500])  # the header cut: the SEG cannot be matched
    assert f"'{a}': not a readable DICOM SEG" in _error(index_volume_sites, _cfg(tmp_path), 3, kind=UnreadableFile)
    (site,) = read_volume_sites(_cfg(tmp_path, on_bad_file="skip"), 3)
    assert [r.name for r in site.records] == ["other"]
    assert sorted(p for p, _ in site.skipped) == [str(tmp_path / "img" / "good"), str(a)]
    assert not any(_leaks(r) for _, r in site.skipped)
    assert "no readable DICOM SEG references it; 1 SEG file(s)" in dict(site.skipped)[str(tmp_path / "img" / "good")]
    # two series without a SEG but one unreadable SEG: not both can be its series, an error still
    _write_series(tmp_path / "img" / "third", _slices())
    msg = _error(read_volume_sites, _cfg(tmp_path, on_bad_file="skip"), 3)
    assert "image volumes without a DICOM SEG: good, third" in msg


def test_library_messages_lose_uids_and_header_text(tmp_path):
    ds = _slices(1)[0]
    text = _reason(ValueError(f"instance {ds.SOPInstanceUID} of {PHI['PatientID']} is odd"), ds)
    assert text == "ValueError: instance <uid> of <header value> is odd"
    assert _reason(OSError(f"{PHI['PatientID']} cut")) == "OSError"  # no header to blank: the type alone


# --------------------------------------------------------------------------- the job


def test_job_fields_are_checked():
    site = [{"name": "h1", "images": "i", "masks": "m"}]
    with pytest.raises(ValueError, match="masks_format: seg reads DICOM SEG masks of DICOM series; set format: dicom"):
        VolumesData(source="volumes", sites=site, masks_format="seg")
    with pytest.raises(ValueError, match="segments maps DICOM SEG segments to classes; it needs masks_format: seg"):
        VolumesData(source="volumes", format="dicom", sites=site, segments={1: "liver"})
    with pytest.raises(ValueError, match=r"keys are class indices 1, 2, ... \(0 is the background\), got 0"):
        VolumesData(source="volumes", format="dicom", masks_format="seg", sites=site, segments={0: "liver"})
    with pytest.raises(ValueError, match=r"a segment is its label \(text\) or its number \(1, 2, ...\), got True"):
        VolumesData(source="volumes", format="dicom", masks_format="seg", sites=site, segments={1: [2, True]})
    with pytest.raises(ValueError, match="segment 'liver' is given for class 1 and class 2"):
        VolumesData(source="volumes", format="dicom", masks_format="seg", sites=site, segments={1: "liver", 2: ["liver"]})
    body = {"name": "seg", "output": "run", "rounds": 1, "model": {"name": "unet"}, "task": {"kind": "segmentation", "num_classes": 3},
            "data": {"source": "volumes", "format": "dicom", "masks_format": "seg", "sites": site,
                     "segments": {1: "liver", 3: "tumour"}}}
    with pytest.raises(ConfigError, match=r"data.segments: class 3 but task.num_classes is 3 \(classes 0..2"):
        parse_job(body)
    body["data"]["segments"] = {"1": "liver", "2": [3, "tumour"]}  # JSON's keys: strings, read back as classes
    assert parse_job(body).data.segment_map() == {1: ["liver"], 2: [3, "tumour"]}
