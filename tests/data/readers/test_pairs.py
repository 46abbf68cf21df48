from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared_data import SHARED_DATA

from medfed.core.errors import DataError
from medfed.data.readers.pairs import load_pairs, match_pairs

PROSTATE = SHARED_DATA / "multisite" / "prostate"
FUNDUS = SHARED_DATA / "multisite" / "fundus"


def _write(folder: Path, name: str, array: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(folder / name)


def _case(tmp_path, n=3, size=(16, 12)):
    for i in range(n):
        img = np.full(size, 40 * i, dtype=np.uint8)
        mask = np.zeros(size, dtype=np.uint8)
        mask[2:5, 3:7] = 255
        _write(tmp_path / "image", f"case_{i}.png", img)
        _write(tmp_path / "mask", f"case_{i}.png", mask)
    return tmp_path / "image", tmp_path / "mask"


def test_pairs_load_with_class_indices(tmp_path):
    images, masks = _case(tmp_path)
    split = load_pairs(match_pairs(images, masks, "h1"), "h1", (0, 255))
    assert split.images.shape == (3, 1, 16, 12) and split.masks.shape == (3, 16, 12)
    assert split.names == ("case_0", "case_1", "case_2")
    assert int(split.masks.sum()) == 3 * 12 and float(split.images[2].max()) == pytest.approx(80 / 255)


def test_unmatched_files_are_named(tmp_path):
    images, masks = _case(tmp_path)
    (masks / "case_1.png").rename(masks / "case_9.png")
    with pytest.raises(DataError) as e:
        match_pairs(images, masks, "h1")
    msg = str(e.value)
    assert "site 'h1'" in msg and "images without a mask: case_1.png" in msg and "masks without an image: case_9.png" in msg


def test_size_mismatch_and_undeclared_mask_values_are_named(tmp_path):
    images, masks = _case(tmp_path, n=1)
    _write(masks, "case_0.png", np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(DataError, match="image 'case_0.png' is 12x16 but its mask is 8x8"):
        load_pairs(match_pairs(images, masks, "h1"), "h1", (0, 255))
    _write(masks, "case_0.png", np.full((16, 12), 7, dtype=np.uint8))
    with pytest.raises(DataError, match=r"mask 'case_0.png' holds value\(s\) \[7\] outside the declared \[0, 255\]"):
        load_pairs(match_pairs(images, masks, "h1"), "h1", (0, 255))


def test_corrupt_image_is_named(tmp_path):
    images, masks = _case(tmp_path, n=1)
    (images / "case_0.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="cannot read .*case_0.png"):
        load_pairs(match_pairs(images, masks, "h1"), "h1", (0, 255))


@pytest.mark.skipif(not PROSTATE.is_dir(), reason=f"multi-site prostate slices not present at {PROSTATE}")
def test_real_prostate_sites_and_the_i2cvb_mismatch():
    for site in sorted(p.name for p in PROSTATE.iterdir() if p.is_dir()):
        for split in ("train", "test"):
            folder = PROSTATE / site / split
            if site == "I2CVB" and split == "train":
                with pytest.raises(DataError) as e:
                    match_pairs(folder / "image", folder / "mask", site)
                assert "images without a mask: 00_01.png" in str(e.value)
                assert "masks without an image: 00_00.png" in str(e.value)
                continue
            data = load_pairs(match_pairs(folder / "image", folder / "mask", site), site, (0, 255))
            assert data.images.shape[2:] == (384, 384) and set(data.masks.unique().tolist()) <= {0, 1}


@pytest.mark.skipif(not FUNDUS.is_dir(), reason=f"multi-site fundus images not present at {FUNDUS}")
def test_real_fundus_domain_has_three_classes():
    folder = FUNDUS / "Domain1" / "train" / "ROIs"
    data = load_pairs(match_pairs(folder / "image", folder / "mask", "Domain1"), "Domain1", (0, 128, 255))
    assert data.images.shape[1] == 3 and data.images.shape[2:] == (800, 800)
    assert set(data.masks.unique().tolist()) <= {0, 1, 2}
