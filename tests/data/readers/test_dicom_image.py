"""2D DICOM images in folder jobs: LUTs, windows, MONOCHROME1, colour, compressed syntaxes,
refusals (see medfed.data.readers.dicom_image). Files are made with pydicom in tmp_path."""

import numpy as np
import pydicom
import pytest
from dicom_files import PHI, write_dicom
from PIL import Image
from pydicom import uid
from pydicom.data import get_testdata_file
from pydicom.pixels import convert_color_space, get_encoder

from medfed.config import DicomWindow, FolderData, TaskConfig
from medfed.data.readers.dicom_image import is_dicom
from medfed.data.readers.folder import UnreadableFile, read_folder, read_image

HU = np.array([[-1024, 0, 40, 1024]])  # a CT row in Hounsfield units; stored as HU + 1024
CT = {"RescaleSlope": 1, "RescaleIntercept": -1024}


def _ct(tmp_path, name="ct.dcm", **attrs):
    return write_dicom(tmp_path / name, (HU + 1024).astype(np.uint16), bits_stored=12, **{**CT, **attrs})


def _linear(x, center, width):
    """DICOM's LINEAR window function onto 0..1 (PS3.3 C.11.2.1.2.1)."""
    c, w = center - 0.5, width - 1
    return np.where(x <= c - w / 2, 0.0, np.where(x > c + w / 2, 1.0, (x - c) / w + 0.5))


def _exact(x, center, width):
    """LINEAR_EXACT onto 0..1, clipped: what the job's window does."""
    return np.clip((x - center) / width + 0.5, 0, 1)


def _encodable(syntax) -> None:
    if not get_encoder(syntax).is_available:
        pytest.skip(f"no pydicom encoder installed for {uid.UID(syntax).name}")


# --------------------------------------------------------------------------- grey


def test_without_window_the_stored_bit_depth_range_maps_to_0_1(tmp_path):
    a = write_dicom(tmp_path / "a.dcm", np.array([[0, 1000]], np.uint16), bits_stored=12)
    b = write_dicom(tmp_path / "b.dcm", np.array([[0, 1000, 4000]], np.uint16), bits_stored=12)
    out_a, out_b = read_image(a, 1, "h1"), read_image(b, 1, "h1")
    assert out_a.dtype == np.float32 and out_a.shape == (1, 1, 2)
    assert np.allclose(out_b[0, 0], [0, 1000 / 4095, 4000 / 4095], atol=1e-7)
    assert out_a[0, 0, 1] == out_b[0, 0, 1]  # the same stored value, the same intensity in both files
    signed = write_dicom(tmp_path / "s.dcm", np.array([[-2000, 0, 1000]], np.int16), bits_stored=16, **CT)
    # 16-bit signed through the rescale: -32768-1024 .. 32767-1024 onto 0..1
    assert np.allclose(read_image(signed, 1, "h1")[0, 0], (np.array([-2000, 0, 1000]) + 32768) / 65535, atol=1e-7)


def test_file_window_first_of_several_and_its_function(tmp_path):
    path = _ct(tmp_path, WindowCenter=[40, 400], WindowWidth=[400, 2000])
    assert np.allclose(read_image(path, 1, "h1")[0], _linear(HU, 40, 400), atol=1e-6)
    sigmoid = _ct(tmp_path, "sig.dcm", WindowCenter=40, WindowWidth=400, VOILUTFunction="SIGMOID")
    assert np.allclose(read_image(sigmoid, 1, "h1")[0], 1 / (1 + np.exp(-4 * (HU - 40) / 400)), atol=1e-6)


def test_job_window_replaces_the_files(tmp_path):
    path = _ct(tmp_path, WindowCenter=40, WindowWidth=400)
    lung = read_image(path, 1, "h1", window=DicomWindow(preset="ct_lung"))  # level -600, width 1500
    assert np.allclose(lung[0], _exact(HU, -600, 1500), atol=1e-6)
    assert np.allclose(lung[0, 0, 1], 0.9, atol=1e-6)  # 0 HU
    own = read_image(path, 1, "h1", window=DicomWindow(center=0, width=100))
    assert np.allclose(own[0, 0], [0, 0.5, 0.9, 1], atol=1e-6)
    plain = _ct(tmp_path, "plain.dcm")  # no window in the file: the job's still applies
    assert np.array_equal(read_image(plain, 1, "h1", window=DicomWindow(center=0, width=100)), own)


def test_voi_lut_sequence_is_preferred_to_the_window(tmp_path):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    lut = Dataset()
    lut.add_new("LUTDescriptor", "US", [4, 0, 8])  # 4 entries, first input 0, 8-bit entries
    lut.add_new("LUTData", "US", [0, 100, 200, 255])
    path = write_dicom(tmp_path / "v.dcm", np.array([[0, 1, 2, 3, 9]], np.uint16), bits_stored=12,
                       VOILUTSequence=Sequence([lut]), WindowCenter=2, WindowWidth=4)
    assert np.allclose(read_image(path, 1, "h1")[0, 0], np.array([0, 100, 200, 255, 255]) / 255, atol=1e-7)


def test_monochrome1_is_inverted(tmp_path):
    path = write_dicom(tmp_path / "m1.dcm", np.array([[0, 51, 255]], np.uint8), "MONOCHROME1")
    assert np.allclose(read_image(path, 1, "h1")[0, 0], [1, 0.8, 0], atol=1e-7)
    windowed = write_dicom(tmp_path / "w1.dcm", np.array([[0, 51, 255]], np.uint8), "MONOCHROME1",
                           WindowCenter=128, WindowWidth=256, VOILUTFunction="LINEAR_EXACT")
    assert np.allclose(read_image(windowed, 1, "h1")[0, 0], 1 - _exact(np.array([0, 51, 255]), 128, 256), atol=1e-6)


def test_grey_repeated_in_three_channels(tmp_path):
    path = _ct(tmp_path)
    grey = read_image(path, 1, "h1")
    assert np.array_equal(read_image(path, 3, "h1"), np.repeat(grey, 3, axis=0))


# --------------------------------------------------------------------------- colour


def test_rgb_to_three_channels_and_to_grey_like_pillow(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    path = write_dicom(tmp_path / "c.dcm", rgb, "RGB")
    assert np.allclose(read_image(path, 3, "h1"), np.moveaxis(rgb, -1, 0) / 255, atol=1e-7)
    grey = read_image(path, 1, "h1")
    assert grey.shape == (1, 32, 32)
    assert np.allclose(grey[0], rgb @ np.array([0.299, 0.587, 0.114]) / 255, atol=1e-6)
    pillow = np.asarray(Image.fromarray(rgb).convert("L"), np.float32) / 255  # the PNG reader's grey
    assert np.abs(grey[0] - pillow).max() <= 0.5 / 255 + 1e-6


@pytest.mark.parametrize("syntax", [uid.ExplicitVRLittleEndian, uid.RLELossless])
def test_ybr_full_is_converted_to_rgb(tmp_path, syntax):
    rgb = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    path = write_dicom(tmp_path / "y.dcm", convert_color_space(rgb, "RGB", "YBR_FULL"), "YBR_FULL", syntax=syntax)
    out = read_image(path, 3, "h1")
    assert np.abs(out - np.moveaxis(rgb, -1, 0) / 255).max() <= 1.01 / 255  # 8-bit YCbCr round trip


def test_ybr_full_422_and_palette_from_pydicom_test_files():
    ybr = get_testdata_file("SC_ybr_full_422_uncompressed.dcm", download=False)
    assert pydicom.dcmread(ybr).PhotometricInterpretation == "YBR_FULL_422"
    want = pydicom.dcmread(ybr).pixel_array / 255  # pydicom converts it to RGB
    assert np.allclose(read_image(ybr, 3, "h1"), np.moveaxis(want, -1, 0), atol=1e-6)
    palette = get_testdata_file("examples_palette.dcm", download=False)
    out = read_image(palette, 3, "h1")
    assert out.shape == (3, 350, 800) and not np.array_equal(out[0], out[1])  # colour, not grey


# --------------------------------------------------------------------------- compressed syntaxes


@pytest.mark.parametrize("syntax", [uid.RLELossless, uid.JPEGLSLossless, uid.JPEG2000Lossless])
def test_lossless_syntaxes_read_as_the_uncompressed_file(tmp_path, syntax):
    _encodable(syntax)
    rng = np.random.default_rng(2)
    grey = rng.integers(0, 4096, (32, 32)).astype(np.uint16)
    rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    plain = read_image(write_dicom(tmp_path / "g.dcm", grey, bits_stored=12, **CT), 1, "h1")
    packed = write_dicom(tmp_path / "gz.dcm", grey, bits_stored=12, syntax=syntax, **CT)
    assert pydicom.dcmread(packed).file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(read_image(packed, 1, "h1"), plain)
    colour = write_dicom(tmp_path / "cz.dcm", rgb, "RGB", syntax=syntax)
    assert np.allclose(read_image(colour, 3, "h1"), np.moveaxis(rgb, -1, 0) / 255, atol=1e-7)


# --------------------------------------------------------------------------- which files, refusals


def test_dicom_is_found_by_suffix_or_preamble(tmp_path):
    dcm = _ct(tmp_path, "IM0001")  # no suffix, as archives export
    png = tmp_path / "p.png"
    Image.fromarray(np.full((2, 2), 51, np.uint8)).save(png)
    assert is_dicom(dcm) and is_dicom(tmp_path / "x.DCM") and not is_dicom(png)
    assert np.array_equal(read_image(dcm, 1, "h1"), read_image(_ct(tmp_path), 1, "h1"))
    assert np.allclose(read_image(png, 1, "h1"), 0.2)


def _mpeg(path):
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = uid.MPEG2MPML
    ds.PixelData = encapsulate([b"\0" * 64])
    ds["PixelData"].VR = "OB"
    ds.save_as(path)


def _bad_j2k(path):
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = uid.JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\0" * 64])
    ds["PixelData"].VR = "OB"
    ds.save_as(path)


def _edit(path, **attrs):
    ds = pydicom.dcmread(path)
    for k, v in attrs.items():
        if v is None:
            delattr(ds, k)
        else:
            setattr(ds, k, v)
    ds.save_as(path)


BROKEN = {  # case: (how the file is broken, what the reason says)
    "not_dicom": (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 300), "not a DICOM file"),
    "header_cut": (lambda p: p.write_bytes(p.read_bytes()[:141]), "the DICOM header is damaged or truncated"),
    "pixels_cut": (lambda p: p.write_bytes(p.read_bytes()[:-100]), "the pixel data is truncated"),
    "no_pixels": (lambda p: _edit(p, PixelData=None), "holds no pixel data"),
    "unsupported": (_mpeg, "unsupported transfer syntax 'MPEG2 Main Profile / Main Level'"),
    "undecodable": (_bad_j2k, "the pixel data cannot be decoded"),
    "multi_frame": (lambda p: _edit(p, NumberOfFrames=2, Rows=16), "holds 2 frames (a multi-frame file)"),
    "bad_window": (lambda p: _edit(p, WindowCenter=40, WindowWidth=0.5), "its VOI window cannot be applied"),
    "colour_kind": (lambda p: _edit(p, PhotometricInterpretation="YBR_PARTIAL_420"), "photometric interpretation"),
}


def _broken(tmp_path, case):
    path = write_dicom(tmp_path / f"{case}.dcm", np.arange(32 * 32, dtype=np.uint16).reshape(32, 32),
                       bits_stored=12, **PHI)
    BROKEN[case][0](path)
    return path


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_refusals_name_the_file_and_reason_and_no_patient(tmp_path, case):
    path = _broken(tmp_path, case)
    with pytest.raises(UnreadableFile) as e:
        read_image(path, 1, "h1")
    text = str(e.value)
    assert f"'{path}'" in text and "site 'h1'" in text and BROKEN[case][1] in e.value.reason, text
    assert not [v for v in PHI.values() if v in text], text


def test_missing_decoder_plugin_names_what_to_install(tmp_path, monkeypatch):
    class NoPlugin:
        is_available = False
        missing_dependencies = ("pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1",)

    path = write_dicom(tmp_path / "l.dcm", np.zeros((32, 32), np.uint16), bits_stored=12, syntax=uid.RLELossless)
    monkeypatch.setattr("pydicom.pixels.get_decoder", lambda _uid: NoPlugin())
    with pytest.raises(UnreadableFile, match=r"unsupported transfer syntax 'RLE Lossless'.*install one of: "
                                             r"pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg"):
        read_image(path, 1, "h1")


def test_scrub_blanks_header_text_values_out_of_messages(tmp_path):
    from medfed.data.readers.dicom_common import scrub

    ds = pydicom.dcmread(write_dicom(tmp_path / "p.dcm", np.zeros((2, 2), np.uint8), **PHI))
    message = f"decoder failed near {PHI['PatientName']} / {PHI['PatientID']} for {PHI['AccessionNumber']}"
    scrubbed = scrub(message, ds)
    assert scrubbed.startswith("decoder failed near") and not [v for v in PHI.values() if v in scrubbed], scrubbed


# --------------------------------------------------------------------------- folder jobs


def _folder_job(tmp_path, rows, **cfg):
    csv = tmp_path / "labels.csv"
    csv.write_text("file,label\n" + "".join(f"{f},{y}\n" for f, y in rows))
    return FolderData(source="folder", sites=[{"name": "h1", "images": tmp_path / "img", "csv": csv}],
                      label_columns=["label"], **cfg)


def test_folder_job_mixes_png_and_dicom(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    Image.fromarray(np.full((4, 6), 51, np.uint8)).save(img / "a.png")
    write_dicom(img / "b.dcm", np.full((4, 6), 2048, np.uint16), bits_stored=12, **PHI)
    write_dicom(img / "c.dicom", np.full((5, 5, 3), 255, np.uint8), "RGB")
    _ct(img, "IM0004")
    (site,) = read_folder(_folder_job(tmp_path, [("a.png", 0), ("b.dcm", 1), ("c.dicom", 0), ("IM0004", 1)]),
                          TaskConfig(labels="binary"))
    assert [r.name for r in site.records] == ["a.png", "b.dcm", "c.dicom", "IM0004"]
    assert [int(r.target) for r in site.records] == [0, 1, 0, 1]
    images = [r.image for r in site.records]
    assert [i.shape for i in images] == [(1, 4, 6), (1, 4, 6), (1, 5, 5), (1, 1, 4)]
    assert np.allclose(images[0], 0.2) and np.allclose(images[1], 2048 / 4095) and np.allclose(images[2], 1.0)


def test_folder_job_applies_its_dicom_window(tmp_path):
    _ct(tmp_path / "img", "ct.dcm", WindowCenter=40, WindowWidth=400)
    cfg = _folder_job(tmp_path, [("ct.dcm", 0)], dicom_window={"preset": "ct_lung"})
    (site,) = read_folder(cfg, TaskConfig(labels="binary"))
    assert np.allclose(site.records[0].image[0], _exact(HU, -600, 1500), atol=1e-6)


def test_dicom_window_option_is_checked():
    from medfed.config import parse_job
    from medfed.core.errors import ConfigError

    ok = FolderData(source="folder", images="i", csv="c.csv", label_columns=["y"],
                    partition={"method": "iid", "sites": ["a"]}, dicom_window={"center": -600, "width": 1500})
    assert ok.dicom_window.center_width == DicomWindow(preset="ct_lung").center_width == (-600, 1500)
    body = {"name": "w", "output": "run", "model": {"name": "small_cnn"}, "task": {"labels": "binary"},
            "data": {"source": "folder", "images": "i", "csv": "c.csv", "label_columns": ["y"],
                     "partition": {"method": "iid", "sites": ["a"]}}}
    for window, message in [({"center": 40}, "data.dicom_window: give center and width"),
                            ({"preset": "lung"}, "data.dicom_window.preset: must be one of 'ct_abdomen'"),
                            ({"center": 0, "width": 0}, "data.dicom_window.width: must be > 0"),
                            ({"preset": "ct_bone", "width": 9}, "give a preset or center and width, not both")]:
        with pytest.raises(ConfigError) as e:
            parse_job({**body, "data": {**body["data"], "dicom_window": window}})
        assert message in str(e.value), str(e.value)
