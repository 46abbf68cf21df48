"""Segmentation and real-format jobs end to end: tiny data, a couple of rounds."""

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from medfed.config import parse_job
from medfed.core.errors import DataError, ModelError
from medfed.data.sites import build_sites
from medfed.server.runner import run_job
from medfed.tracking.metrics import read_metrics


def _seg_job(tmp_path, dims=2, **overrides):
    size = 32 if dims == 2 else 16
    body = {
        "name": f"seg{dims}", "seed": 1, "output": str(tmp_path / "run"), "rounds": 2, "threads": 1,
        "data": {"source": "synthetic_segmentation", "dims": dims, "image_size": size, "sites": [
            {"name": "a", "n_train": 12, "n_val": 4, "n_test": 4},
            {"name": "b", "n_train": 8, "n_val": 4, "n_test": 4, "scanner": {"noise": 0.05, "resolution": 0.5}},
        ]},
        "model": {"name": "unet", "width": 4},
        "task": {"kind": "segmentation", "num_classes": 3, "save_predictions": 2},
        "train": {"batch_size": 4, "lr": 0.01, "optimizer": "adam"},
        "compare": ["local"],
    }
    body.update(overrides)
    return parse_job(body)


def test_2d_segmentation_run_writes_dice_hd95_predictions_and_report(tmp_path):
    job = _seg_job(tmp_path, transforms={"augment": [{"name": "flip", "axes": [0, 1]}, {"name": "rotate90"}]})
    run = run_job(job).run_dir
    rec = read_metrics(run / "metrics.jsonl")
    metrics = {r["metric"] for r in rec if r["split"] == "test" and r["arm"] == "federated"}
    assert {"dice", "dice_class_1", "dice_class_2", "hd95", "loss"} <= metrics
    val_metrics = {r["metric"] for r in rec if r["split"] == "val" and r["arm"] == "federated"}
    assert "dice" in val_metrics and not any(m.startswith("hd95") for m in val_metrics)  # test only
    dice = [r["value"] for r in rec if r["metric"] == "dice" and r["site"] == "all" and r["split"] == "test"]
    assert all(v is not None and 0.0 <= v <= 1.0 for v in dice)
    pngs = sorted((run / "predictions").glob("*/*.png"))
    assert [p.parent.name for p in pngs] == ["a", "a", "b", "b"]
    assert np.asarray(Image.open(pngs[0])).shape[2] == 3
    html = (run / "report.html").read_text()
    assert "Predicted masks" in html and "data:image/png;base64" in html
    best = json.loads((run / "model_best.json").read_text())
    assert best["metric"] == "val_dice"
    sites = json.loads((run / "sites.json").read_text())["sites"]
    assert sites[0]["shape"] == [1, 32, 32] and len(sites[0]["class_counts"]["train"]) == 3


def test_3d_segmentation_trains_on_patches_and_evaluates_by_sliding_window(tmp_path):
    job = _seg_job(tmp_path, dims=3, transforms={"patch": [8, 8, 8]}, compare=[])
    calls = []
    from medfed.tasks import segmentation

    original = segmentation.SegmentationTask.infer

    def spy(self, model, images):
        calls.append(tuple(images.shape[2:]))
        return original(self, model, images)

    segmentation.SegmentationTask.infer = spy
    try:
        run = run_job(job).run_dir
    finally:
        segmentation.SegmentationTask.infer = original
    assert calls and all(c == (16, 16, 16) for c in calls)  # whole volumes go in; the window is inside
    preds = sorted((run / "predictions" / "a").glob("*_pred.nii.gz"))
    assert len(preds) == 2 and nib.load(str(preds[0])).shape == (16, 16, 16)


def test_a_segmenter_refuses_sides_that_are_not_multiples_of_8(tmp_path):
    job = _seg_job(tmp_path, data={"source": "synthetic_segmentation", "image_size": 20,
                                   "sites": [{"name": "a", "n_train": 4, "n_test": 2}]})
    with pytest.raises(ModelError, match=r"multiple of 8, but the images are \[20, 20\]; add a crop_or_pad"):
        run_job(job)
    assert not (tmp_path / "run").exists()
    fixed = _seg_job(tmp_path, data={"source": "synthetic_segmentation", "image_size": 20,
                                     "sites": [{"name": "a", "n_train": 4, "n_test": 2}]},
                     transforms={"preprocess": [{"name": "crop_or_pad", "size": [16, 16]}]}, rounds=1, compare=[])
    assert build_sites(fixed)[0].train.images.shape[2:] == (16, 16)


def _pairs(root: Path, site: str, n: int, size: int = 16) -> Path:
    rng = np.random.default_rng(len(site))
    for sub in ("image", "mask"):
        (root / site / sub).mkdir(parents=True)
    for i in range(n):
        img = rng.integers(0, 120, (size, size), dtype=np.uint8)
        mask = np.zeros((size, size), np.uint8)
        mask[4:10, 5:12] = 255
        img[mask > 0] += 100
        Image.fromarray(img).save(root / site / "image" / f"{i:02d}.png")
        Image.fromarray(mask).save(root / site / "mask" / f"{i:02d}.png")
    return root / site


def test_pairs_job_with_a_held_out_site_and_feature_shift(tmp_path):
    sites = [{"name": s, "images": str(_pairs(tmp_path, s, 8) / "image"), "masks": str(tmp_path / s / "mask")}
             for s in ("x", "y", "z")]
    job = parse_job({
        "name": "pairs", "output": str(tmp_path / "run"), "rounds": 2, "threads": 1,
        "data": {"source": "pairs", "mask_values": [0, 255], "sites": sites, "split": {"val": 0.25, "test": 0.25}},
        "feature_shift": {"z": {"intensity_scale": 0.7, "noise": 0.05}},
        "held_out": ["z"],
        "model": {"name": "unet", "width": 4},
        "task": {"kind": "segmentation", "num_classes": 2, "hd95": False, "save_predictions": 1},
        "train": {"batch_size": 4, "lr": 0.01, "optimizer": "adam"},
        "compare": ["local", "centralized"],
    })
    run = run_job(job).run_dir
    rec = read_metrics(run / "metrics.jsonl")
    trained = {r["site"] for r in rec if r["metric"] == "loss" and r["split"] == "train" and r["arm"] == "federated"}
    assert trained == {"x", "y"}
    assert {r["site"] for r in rec if r["arm"] == "local"} == {"x", "y", "all", "median"}
    assert {r["site"] for r in rec if r["arm"] == "centralized" and r["split"] == "test"} == {"x", "y", "z", "all", "median"}
    assert not any(r["metric"].startswith("hd95") for r in rec)
    described = json.loads((run / "sites.json").read_text())["sites"]
    assert [s["held_out"] for s in described] == [False, False, True]
    assert "z (held out)" in (run / "report.html").read_text()


def test_folder_job_natural_split_by_a_metadata_column(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(18):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
        rows.append({"file": f"{i}.png", "label": i % 2, "hospital": "north" if i < 10 else "south"})
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["file", "label", "hospital"])
        w.writeheader()
        w.writerows(rows)
    (tmp_path / "job").mkdir()
    body = {
        "name": "folder", "output": "run", "rounds": 1,
        "data": {"source": "folder", "images": "../img", "csv": "../labels.csv", "label_columns": ["label"],
                 "sites_by": {"column": "hospital", "sites": ["north", "south"]}, "split": {"val": 0.2, "test": 0.2}},
        "model": {"name": "small_cnn", "width": 4}, "task": {"labels": "binary"},
        "transforms": {"preprocess": [{"name": "resize", "size": [8, 8]}]},
    }
    job = parse_job(body, base_dir=tmp_path / "job")
    sites = build_sites(job)
    assert [s.name for s in sites] == ["north", "south"]
    assert [sum(len(s.split(k)) for k in ("train", "val", "test")) for s in sites] == [10, 8]
    assert sites[0].train.images.shape[1:] == (1, 8, 8)
    assert all(n.endswith(".png") for n in sites[0].train.names)
    with pytest.raises(DataError, match="south"):
        bad = dict(body, data=dict(body["data"], sites_by={"column": "hospital", "sites": ["north"]}))
        build_sites(parse_job(bad, base_dir=tmp_path / "job"))


def test_volumes_job_resamples_and_trains_one_round(tmp_path):
    for sub in ("img", "msk"):
        (tmp_path / sub).mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        vol = rng.normal(0, 1, (16, 16, 8)).astype(np.float32)
        mask = np.zeros((16, 16, 8), np.uint8)
        mask[4:12, 4:12, 2:6] = 1
        aff = np.diag([1.0, 1.0, 2.0, 1.0])
        nib.save(nib.Nifti1Image(vol + 2 * mask, aff), str(tmp_path / "img" / f"c{i}.nii.gz"))
        nib.save(nib.Nifti1Image(mask, aff), str(tmp_path / "msk" / f"c{i}.nii.gz"))
    job = parse_job({
        "name": "vol", "output": str(tmp_path / "run"), "rounds": 1, "threads": 1,
        "data": {"source": "volumes", "sites": [{"name": "a", "images": str(tmp_path / "img"), "masks": str(tmp_path / "msk")}],
                 "split": {"val": 0.25, "test": 0.25}},
        "transforms": {"preprocess": [{"name": "spacing", "pixdim": [2, 2, 2]}, {"name": "normalize"}]},
        "model": {"name": "unet", "width": 4},
        "task": {"kind": "segmentation", "num_classes": 2, "save_predictions": 1},
        "train": {"batch_size": 2},
    })
    (site,) = build_sites(job)
    assert site.train.images.shape[2:] == (8, 8, 8) and site.train.spacing == (2.0, 2.0, 2.0)
    assert torch.equal(torch.unique(site.train.labels), torch.tensor([0, 1]))
    run = run_job(job).run_dir
    assert (run / "predictions" / "a").is_dir()
