from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared_data import shared

from medfed.config import PairsData
from medfed.core.errors import DataError
from medfed.data.readers.pairs import load_pairs, match_pairs, read_pair_sites


def _write(folder: Path, name: str, array: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(folder / name)
    return folder / name


def _case(tmp_path, n=3, size=(16, 12), rgb=False):
    for i in range(n):
        img = np.full((*size, 3) if rgb else size, 40 * i, dtype=np.uint8)
        mask = np.zeros(size, dtype=np.uint8)
        mask[2:5, 3:7] = 255
        mask[0, 0] = 128
        _write(tmp_path / "image", f"case_{i}.png", img)
        _write(tmp_path / "mask", f"case_{i}.png", mask)
    return tmp_path / "image", tmp_path / "mask"


def _cfg(tmp_path, mask_values=(0, 128, 255), **kw) -> PairsData:
    return PairsData(source="pairs", sites=[{"name": "h1", "images": tmp_path / "image", "masks": tmp_path / "mask"}],
                     mask_values=list(mask_values), **kw)


def test_pairs_load_with_class_indices(tmp_path):
    images, masks = _case(tmp_path)
    split = load_pairs(match_pairs(images, masks, "h1"), "h1", (0, 128, 255))
    assert split.images.shape == (3, 1, 16, 12) and split.masks.shape == (3, 16, 12)
    assert split.names == ("case_0", "case_1", "case_2")
    assert int((split.masks == 2).sum()) == 3 * 12 and float(split.images[2].max()) == pytest.approx(80 / 255)


def test_read_pair_sites_records(tmp_path):
    _case(tmp_path)
    (site,) = read_pair_sites(_cfg(tmp_path, mask_values=(255, 0, 128)))  # class order as listed
    assert site.name == "h1" and site.skipped == [] and len(site.records) == 3
    r = site.records[1]
    assert r.name == "case_1.png" and r.split is None and r.spacing is None
    assert r.image.shape == (1, 16, 12) and r.image.dtype == np.float32 and np.allclose(r.image, 40 / 255)
    assert r.target.shape == (16, 12) and r.target.dtype == np.int64
    assert int(r.target[0, 0]) == 2 and int(r.target[3, 4]) == 0 and int(r.target[10, 10]) == 1


def test_channels_grey_from_rgb_and_rgb(tmp_path):
    _case(tmp_path, n=1, rgb=True)
    img = tmp_path / "image" / "case_0.png"
    rgb = np.zeros((16, 12, 3), np.uint8)
    rgb[..., 0] = 200
    _write(tmp_path / "image", "case_0.png", rgb)
    (grey,) = read_pair_sites(_cfg(tmp_path, channels=1))
    expected = np.asarray(Image.open(img).convert("L"), np.float32) / 255
    assert grey.records[0].image.shape == (1, 16, 12) and np.array_equal(grey.records[0].image[0], expected)
    (colour,) = read_pair_sites(_cfg(tmp_path, channels=3))
    assert colour.records[0].image.shape == (3, 16, 12) and np.allclose(colour.records[0].image[0], 200 / 255)


def test_train_test_sets_give_the_split(tmp_path):
    _case(tmp_path / "tr", n=2)
    _case(tmp_path / "te", n=1)
    cfg = PairsData(source="pairs", mask_values=[0, 128, 255], sites=[{
        "name": "h1",
        "train": {"images": tmp_path / "tr" / "image", "masks": tmp_path / "tr" / "mask"},
        "test": {"images": tmp_path / "te" / "image", "masks": tmp_path / "te" / "mask"}}])
    (site,) = read_pair_sites(cfg)
    assert [(r.name, r.split) for r in site.records] == [
        ("train/case_0.png", "train"), ("train/case_1.png", "train"), ("test/case_0.png", "test")]


def test_unmatched_files_are_named_even_with_skip(tmp_path):
    images, masks = _case(tmp_path)
    (masks / "case_1.png").rename(masks / "case_9.png")
    with pytest.raises(DataError) as e:
        read_pair_sites(_cfg(tmp_path, on_bad_file="skip"))
    msg = str(e.value)
    assert "site 'h1'" in msg and "images without a mask: case_1.png" in msg and "masks without an image: case_9.png" in msg


def test_two_files_of_one_stem_are_an_error(tmp_path):
    images, _ = _case(tmp_path, n=1)
    _write(images, "case_0.tif", np.zeros((16, 12), np.uint8))
    with pytest.raises(DataError, match="image files 'case_0.png' and 'case_0.tif' .* share the name 'case_0'"):
        read_pair_sites(_cfg(tmp_path))


def test_hidden_and_other_files_are_ignored(tmp_path):
    images, masks = _case(tmp_path, n=1)
    (images / "._case_0.png").write_bytes(b"resource fork")
    (masks / "notes.txt").write_text("x")
    assert len(read_pair_sites(_cfg(tmp_path))[0].records) == 1


def test_size_mismatch_and_undeclared_mask_values_are_named(tmp_path):
    images, masks = _case(tmp_path, n=1)
    _write(masks, "case_0.png", np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(DataError) as e:
        read_pair_sites(_cfg(tmp_path, on_bad_file="skip"))
    assert f"site 'h1': '{images / 'case_0.png'}': image is 12x16 (width x height) but its mask" in str(e.value)
    assert f"'{masks / 'case_0.png'}' is 8x8" in str(e.value)
    bad = np.zeros((16, 12), dtype=np.uint8)
    bad[0, :3] = [7, 9, 128]
    _write(masks, "case_0.png", bad)
    with pytest.raises(DataError) as e:
        read_pair_sites(_cfg(tmp_path, on_bad_file="skip"))
    assert f"site 'h1': mask '{masks / 'case_0.png'}' holds value(s) [7, 9] outside mask_values [0, 128, 255]" in str(e.value)


def test_rgb_and_one_bit_masks(tmp_path):
    images, masks = _case(tmp_path, n=2)
    grey = np.asarray(Image.open(masks / "case_0.png"))
    _write(masks, "case_0.png", np.dstack([grey] * 3))
    bits = Image.new("1", (12, 16))
    bits.putpixel((1, 1), 1)
    bits.save(masks / "case_1.png")
    a, b = read_pair_sites(_cfg(tmp_path))[0].records
    assert int((a.target == 2).sum()) == 12 and int(b.target.sum()) == 2 * 1 and int(b.target[1, 1]) == 2
    colour = np.dstack([grey, grey, np.zeros_like(grey)])
    _write(masks, "case_0.png", colour)
    with pytest.raises(DataError, match="case_0.png': colour mask: its channels differ at 13 pixel"):
        read_pair_sites(_cfg(tmp_path))


def test_corrupt_files_error_or_are_skipped(tmp_path):
    images, masks = _case(tmp_path)
    (images / "case_0.png").write_bytes(b"\x89PNG not really")
    (masks / "case_2.png").write_bytes((masks / "case_2.png").read_bytes()[:60])
    with pytest.raises(DataError, match=f"site 'h1': '{images / 'case_0.png'}': cannot be read as an image"):
        read_pair_sites(_cfg(tmp_path))
    (site,) = read_pair_sites(_cfg(tmp_path, on_bad_file="skip"))
    assert [r.name for r in site.records] == ["case_1.png"]
    assert [p for p, _ in site.skipped] == [str(images / "case_0.png"), str(masks / "case_2.png")]
    assert "cannot be read as a mask image" in site.skipped[1][1]


def test_empty_or_missing_site_folder(tmp_path):
    (tmp_path / "image").mkdir()
    (tmp_path / "mask").mkdir()
    with pytest.raises(DataError, match="site 'h1': no image files in '.*image'"):
        read_pair_sites(_cfg(tmp_path))
    (tmp_path / "mask").rmdir()
    with pytest.raises(DataError, match="site 'h1': mask folder '.*mask' not found"):
        read_pair_sites(_cfg(tmp_path))


def test_every_pair_skipped_is_an_error(tmp_path):
    images, _ = _case(tmp_path, n=1)
    (images / "case_0.png").write_bytes(b"junk")
    with pytest.raises(DataError, match="site 'h1': no examples in its image/mask pairs; all 1 file"):
        read_pair_sites(_cfg(tmp_path, on_bad_file="skip"))


# --------------------------------------------------------------------------- real data

PROSTATE_SITES = ("BIDMC", "BMC", "HK", "I2CVB", "RUNMC", "UCL")


def _prostate(names):
    root = shared("multisite", "prostate")
    sites = [{"name": n, **{s: {"images": root / n / s / "image", "masks": root / n / s / "mask"}
                            for s in ("train", "test")}} for n in names]
    return PairsData(source="pairs", sites=sites, mask_values=[0, 255])


def test_real_prostate_i2cvb_mismatch_is_reported_by_name():
    with pytest.raises(DataError) as e:
        read_pair_sites(_prostate(PROSTATE_SITES))
    msg = str(e.value)
    assert "site 'I2CVB'" in msg and "images without a mask: 00_01.png" in msg and "masks without an image: 00_00.png" in msg


def test_real_prostate_other_five_sites_load():
    out = read_pair_sites(_prostate([s for s in PROSTATE_SITES if s != "I2CVB"]))
    assert [s.name for s in out] == ["BIDMC", "BMC", "HK", "RUNMC", "UCL"]
    for site in out:
        assert [r.split for r in site.records] == ["train", "test"] and site.skipped == []
        for r in site.records:
            assert r.image.shape == (1, 384, 384) and r.target.shape == (384, 384)
            assert 0 <= r.image.min() and r.image.max() <= 1 and r.image.max() > 0.2
            assert set(np.unique(r.target).tolist()) == {0, 1}


def test_real_fundus_four_domains():
    root = shared("multisite", "fundus")
    domains = [f"Domain{i}" for i in range(1, 5)]
    sites = [{"name": d, **{s: {"images": root / d / s / "ROIs" / "image", "masks": root / d / s / "ROIs" / "mask"}
                            for s in ("train", "test")}} for d in domains]
    # the masks are RGB with equal channels: 0 cup, 128 disc rim, 255 background
    out = read_pair_sites(PairsData(source="pairs", sites=sites, mask_values=[0, 128, 255], channels=3))
    assert [s.name for s in out] == domains
    for site in out:
        assert len(site.records) == 2
        for r in site.records:
            assert r.image.shape == (3, 800, 800) and r.target.shape == (800, 800)
            counts = np.bincount(r.target.ravel(), minlength=3)
            assert set(np.unique(r.target).tolist()) == {0, 1, 2} and counts.argmax() == 2  # background is 255
