from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medfed.config import FolderData, SegmentationTaskConfig, TaskConfig
from medfed.core.errors import DataError
from medfed.data.readers.folder import read_folder, read_image

BINARY = TaskConfig(labels="binary")
MULTI = TaskConfig(labels="multiclass", num_classes=3)
MULTILABEL = TaskConfig(labels="multilabel", num_classes=3)


def _png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(path)
    return path


def _csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(",".join(str(c) for c in r) for r in [header, *rows]) + "\n")
    return path


def _grey_set(folder: Path, n: int, label=lambda i: i % 2, extra=lambda i: []) -> list[list]:
    """n grey 8x6 images x_i.png of constant value 10*i; rows [file, label, *extra]."""
    rows = []
    for i in range(n):
        _png(folder / f"x_{i}.png", np.full((8, 6), 10 * i, np.uint8))
        rows.append([f"x_{i}.png", label(i), *extra(i)])
    return rows


def _one_site(tmp_path, rows, header=("file", "label"), task=BINARY, **cfg):
    csv = _csv(tmp_path / "labels.csv", list(header), rows)
    data = FolderData(source="folder", sites=[{"name": "h1", "images": tmp_path / "img", "csv": csv}],
                      label_columns=cfg.pop("label_columns", ["label"]), **cfg)
    return read_folder(data, task)


def _error(tmp_path, rows, *expected, header=("file", "label"), task=BINARY, **cfg):
    with pytest.raises(DataError) as e:
        _one_site(tmp_path, rows, header, task, **cfg)
    msg = str(e.value)
    assert all(text in msg for text in expected), msg
    return msg


# --------------------------------------------------------------------------- images


def test_grey_images_class_indices_and_split_column(tmp_path):
    rows = _grey_set(tmp_path / "img", 4, extra=lambda i: [["train", "val", "TEST", "train"][i]])
    (site,) = _one_site(tmp_path, rows, ("file", "label", "split"), split_column="split")
    assert site.name == "h1" and site.skipped == []
    assert [r.name for r in site.records] == ["x_0.png", "x_1.png", "x_2.png", "x_3.png"]
    assert [r.split for r in site.records] == ["train", "val", "test", "train"]
    r = site.records[3]
    assert r.image.shape == (1, 8, 6) and r.image.dtype == np.float32
    assert np.allclose(r.image, 30 / 255) and r.spacing is None
    assert r.target.shape == () and r.target.dtype == np.int64 and int(r.target) == 1


def test_no_split_column_leaves_split_unset(tmp_path):
    (site,) = _one_site(tmp_path, _grey_set(tmp_path / "img", 2))
    assert [r.split for r in site.records] == [None, None]


def test_grey_and_rgb_conversions(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    p_rgb, p_grey = _png(tmp_path / "c.png", rgb), _png(tmp_path / "g.png", grey)
    luma = np.asarray(Image.open(p_rgb).convert("L"), np.float32) / 255
    assert np.array_equal(read_image(p_rgb, 1, "h1"), luma[None])
    assert np.array_equal(read_image(p_rgb, 3, "h1"), np.moveaxis(rgb, -1, 0).astype(np.float32) / 255)
    assert np.array_equal(read_image(p_grey, 3, "h1"), np.repeat(grey[None].astype(np.float32) / 255, 3, 0))
    rgba = np.dstack([rgb, np.zeros((5, 7), np.uint8)])  # alpha is dropped, not blended
    assert np.array_equal(read_image(_png(tmp_path / "a.png", rgba), 3, "h1"), read_image(p_rgb, 3, "h1"))


def test_16_bit_1_bit_float_jpeg_and_tiff(tmp_path):
    wide = np.array([[0, 1000, 65535]], np.uint16)
    for suffix in ("png", "tif"):
        out = read_image(_png(tmp_path / f"w.{suffix}", wide), 1, "h1")
        assert out.dtype == np.float32 and np.allclose(out[0], wide / 65535.0)
        assert np.allclose(read_image(tmp_path / f"w.{suffix}", 3, "h1"), np.repeat(wide[None] / 65535.0, 3, 0))
    bits = Image.new("1", (2, 1))
    bits.putpixel((0, 0), 1)
    bits.save(tmp_path / "b.png")
    bits = tmp_path / "b.png"
    assert read_image(bits, 1, "h1").tolist() == [[[1.0, 0.0]]]
    fl = np.array([[0.0, 0.25, 1.0]], np.float32)
    assert np.array_equal(read_image(_png(tmp_path / "f.tif", fl), 1, "h1")[0], fl)
    jpg = _png(tmp_path / "j.jpg", np.full((8, 8, 3), 200, np.uint8))
    assert read_image(jpg, 3, "h1").shape == (3, 8, 8) and abs(float(read_image(jpg, 1, "h1").mean()) - 200 / 255) < 0.02


@pytest.mark.parametrize("case, expected", [
    ("float_range", "float images must lie in [0, 1]"),
    ("float_nan", "1 pixel value(s) are NaN or Inf"),
    ("multipage", "holds 2 images (a multi-page file)"),
    ("int32", "32-bit integer image with values in -5..70000"),
    ("text", "cannot be read as an image"),
])
def test_unusable_images_are_named(tmp_path, case, expected):
    path = tmp_path / f"{case}.tif"
    if case == "float_range":
        _png(path, np.array([[0.0, 2.5]], np.float32))
    elif case == "float_nan":
        _png(path, np.array([[0.0, np.nan]], np.float32))
    elif case == "multipage":
        frames = [Image.fromarray(np.zeros((4, 4), np.uint8)) for _ in range(2)]
        frames[0].save(path, save_all=True, append_images=frames[1:])
    elif case == "int32":
        _png(path, np.array([[-5, 70000]], np.int32), "I")
    else:
        path.write_text("not an image")
    with pytest.raises(DataError) as e:
        read_image(path, 1, "h1")
    assert f"site 'h1': '{path}': " in str(e.value) and expected in str(e.value)


def test_images_of_different_sizes_are_kept(tmp_path):
    _png(tmp_path / "img" / "a.png", np.zeros((8, 8), np.uint8))
    _png(tmp_path / "img" / "b.png", np.zeros((20, 10), np.uint8))
    (site,) = _one_site(tmp_path, [["a.png", 0], ["b.png", 1]])
    assert [r.image.shape for r in site.records] == [(1, 8, 8), (1, 20, 10)]


def test_files_in_sub_folders_and_csv_quirks(tmp_path):
    _png(tmp_path / "img" / "sub" / "a.png", np.zeros((4, 4), np.uint8))
    _png(tmp_path / "img" / "b c.png", np.zeros((4, 4), np.uint8))
    csv = tmp_path / "labels.csv"
    csv.write_text('\ufeff file , label ,note\n"sub/a.png", 2.0 ,"x, y"\n\n"b c.png",0,\n', encoding="utf-8")
    data = FolderData(source="folder", sites=[{"name": "h1", "images": tmp_path / "img", "csv": csv}],
                      label_columns=["label"])
    (site,) = read_folder(data, MULTI)
    assert [(r.name, int(r.target)) for r in site.records] == [("sub/a.png", 2), ("b c.png", 0)]


# --------------------------------------------------------------------------- labels


def test_multilabel_columns(tmp_path):
    rows = _grey_set(tmp_path / "img", 3, label=lambda i: 1, extra=lambda i: [0, i % 2])
    (site,) = _one_site(tmp_path, rows, ("file", "a", "b", "c"), MULTILABEL, label_columns=["a", "b", "c"])
    assert site.records[1].target.dtype == np.float32
    assert [r.target.tolist() for r in site.records] == [[1, 0, 0], [1, 0, 1], [1, 0, 0]]


def test_label_columns_must_fit_the_task(tmp_path):
    rows = _grey_set(tmp_path / "img", 2)
    _error(tmp_path, rows, "a multilabel task takes one 0/1 column per label", "num_classes=3",
           "got 1 column(s) ['label']", task=MULTILABEL)
    _error(tmp_path, rows, "a multiclass task takes one column of class indices", "['a', 'b']",
           task=MULTI, label_columns=["a", "b"])
    _error(tmp_path, rows, "got 2 column(s)", task=MULTILABEL, label_columns=["a", "b"])
    with pytest.raises(DataError, match="for classification, not segmentation"):
        _one_site(tmp_path, rows, task=SegmentationTaskConfig(kind="segmentation"))


@pytest.mark.parametrize("value, task, expected", [
    ("2", BINARY, "label '2' in column 'label' is outside 0..1"),
    ("-1", MULTI, "label '-1' in column 'label' is outside 0..2"),
    ("0.5", BINARY, "label '0.5' in column 'label' is not a class index"),
    ("benign", BINARY, "label 'benign' in column 'label' is not a class index"),
])  # an empty label is an unlabeled row (tests/data/test_labels.py)
def test_bad_class_label_names_site_file_line_and_value(tmp_path, value, task, expected):
    rows = _grey_set(tmp_path / "img", 3)
    rows[1][1] = value
    _error(tmp_path, rows, f"site 'h1': '{tmp_path / 'labels.csv'}' line 3: ", expected, task=task)


def test_bad_multilabel_value(tmp_path):
    rows = _grey_set(tmp_path / "img", 2, extra=lambda i: [0, 2 * i])
    _error(tmp_path, rows, "line 3: label '2' in column 'c' must be 0 or 1", header=("file", "a", "b", "c"),
           task=MULTILABEL, label_columns=["a", "b", "c"])


def test_bad_split_value_names_line_and_value(tmp_path):
    rows = _grey_set(tmp_path / "img", 3, extra=lambda i: ["train" if i != 2 else "validation"])
    _error(tmp_path, rows, "site 'h1'", "line 4: split 'validation' in column 'split' must be train, val or test",
           header=("file", "label", "split"), split_column="split")


def test_missing_columns_list_the_columns_found(tmp_path):
    rows = _grey_set(tmp_path / "img", 2)
    _error(tmp_path, rows, "site 'h1'", "labels.csv': missing column(s) ['split']",
           "the columns found are ['file', 'label']", split_column="split")
    _error(tmp_path, rows, "missing column(s) ['path']", file_column="path")


def test_missing_duplicate_and_empty_files(tmp_path):
    rows = _grey_set(tmp_path / "img", 2)
    _error(tmp_path, [*rows, ["gone.png", 0]], f"site 'h1': '{tmp_path / 'img' / 'gone.png'}': image file not found",
           "line 4")
    _error(tmp_path, [*rows, ["./x_0.png", 1]], "line 4: file './x_0.png' is listed twice (lines 2 and 4)")
    _error(tmp_path, [], "labels.csv': the CSV has a header but no rows")
    (tmp_path / "labels2.csv").write_text("")
    data = FolderData(source="folder", sites=[{"name": "h1", "images": tmp_path / "img", "csv": tmp_path / "labels2.csv"}],
                      label_columns=["label"])
    with pytest.raises(DataError, match="site 'h1': .*labels2.csv': the CSV is empty"):
        read_folder(data, BINARY)
    data = FolderData(source="folder", sites=[{"name": "h1", "images": tmp_path / "nope", "csv": tmp_path / "labels.csv"}],
                      label_columns=["label"])
    with pytest.raises(DataError, match="site 'h1': images folder '.*nope' not found"):
        read_folder(data, BINARY)


# --------------------------------------------------------------------------- bad files


def test_unreadable_image_is_an_error_or_skipped(tmp_path):
    rows = _grey_set(tmp_path / "img", 3)
    bad = tmp_path / "img" / "x_1.png"
    bad.write_bytes(bad.read_bytes()[:40])
    _error(tmp_path, rows, f"site 'h1': '{bad}': cannot be read as an image")
    (site,) = _one_site(tmp_path, rows, on_bad_file="skip")
    assert [r.name for r in site.records] == ["x_0.png", "x_2.png"]
    assert len(site.skipped) == 1 and site.skipped[0][0] == str(bad) and "cannot be read" in site.skipped[0][1]
    # skip covers unreadable files only: CSV problems and missing files stay errors
    _error(tmp_path, [*rows[:2], ["x_2.png", 7]], "outside 0..1", on_bad_file="skip")
    _error(tmp_path, [*rows, ["gone.png", 0]], "image file not found", on_bad_file="skip")
    _error(tmp_path, rows[1:2], "site 'h1': no examples", "all 1 file(s) were skipped", on_bad_file="skip")


# --------------------------------------------------------------------------- site layouts


def test_sites_with_train_val_test_sets(tmp_path):
    sites = []
    for name in ("a", "b"):
        sets = {}
        for split in ("train", "test"):
            folder = tmp_path / name / split
            rows = _grey_set(folder, 2 if split == "train" else 1, extra=lambda i: ["val"])
            sets[split] = {"images": folder, "csv": _csv(folder / "l.csv", ["file", "label", "split"], rows)}
        sites.append({"name": name, **sets})
    data = FolderData(source="folder", sites=sites, label_columns=["label"], split_column="split")
    out = read_folder(data, BINARY)
    assert [s.name for s in out] == ["a", "b"]
    # the set's name is the split; the split column is not consulted for named sets
    assert [(r.name, r.split) for r in out[1].records] == [("train/x_0.png", "train"), ("train/x_1.png", "train"),
                                                           ("test/x_0.png", "test")]


def _shared_csv(tmp_path, hospitals):
    rows = _grey_set(tmp_path / "img", len(hospitals), extra=lambda i: [hospitals[i]])
    return _csv(tmp_path / "all.csv", ["file", "label", "hospital"], rows)


def test_sites_by_column(tmp_path):
    csv = _shared_csv(tmp_path, ["b", "a", "b", "a", "b"])
    data = FolderData(source="folder", images=tmp_path / "img", csv=csv, label_columns=["label"],
                      sites_by={"column": "hospital", "sites": ["a", "b"]})
    a, b = read_folder(data, BINARY)
    assert (a.name, [r.name for r in a.records]) == ("a", ["x_1.png", "x_3.png"])
    assert (b.name, [r.name for r in b.records]) == ("b", ["x_0.png", "x_2.png", "x_4.png"])


def test_sites_by_unknown_values_and_empty_sites(tmp_path):
    csv = _shared_csv(tmp_path, ["a", "z", "y", "z"])
    data = FolderData(source="folder", images=tmp_path / "img", csv=csv, label_columns=["label"],
                      sites_by={"column": "hospital", "sites": ["a"]})
    with pytest.raises(DataError) as e:
        read_folder(data, BINARY)
    assert "column 'hospital' holds value(s) that are not sites" in str(e.value)
    assert "'y' (1 row), 'z' (2 rows)" in str(e.value) and str(csv) in str(e.value)
    csv = _shared_csv(tmp_path, ["a", "a"])
    data = FolderData(source="folder", images=tmp_path / "img", csv=csv, label_columns=["label"],
                      sites_by={"column": "hospital", "sites": ["a", "b", "c"]})
    with pytest.raises(DataError, match=r"site\(s\) \['b', 'c'\] of data.sites_by.sites have no rows"):
        read_folder(data, BINARY)


def test_sites_by_error_names_the_rows_site(tmp_path):
    (tmp_path / "img").mkdir()
    csv = _csv(tmp_path / "all.csv", ["file", "label", "hospital"], [["x.png", 5, "b"]])
    data = FolderData(source="folder", images=tmp_path / "img", csv=csv, label_columns=["label"],
                      sites_by={"column": "hospital", "sites": ["b"]})
    with pytest.raises(DataError, match=r"site 'b': '.*all.csv' line 2: label '5'"):
        read_folder(data, BINARY)


def test_partition_returns_one_unnamed_site(tmp_path):
    csv = _shared_csv(tmp_path, ["a", "b", "c"])
    data = FolderData(source="folder", images=tmp_path / "img", csv=csv, label_columns=["label"],
                      partition={"method": "iid", "sites": ["s1", "s2"]}, channels=3)
    (site,) = read_folder(data, BINARY)
    assert site.name == "" and len(site.records) == 3 and site.records[0].image.shape == (3, 8, 6)
