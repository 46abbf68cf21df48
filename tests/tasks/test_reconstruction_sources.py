"""Reconstruction from the ``folder`` source and from 2D slices of a ``volumes`` source: the
images (or slices) read as their source reads them become ground truth; volumes are split
by volume before they are cut; a site's own acceleration; a short run of each; the jobs
refused naming the field; the real PROMISE12 volume and the real prostate slices of three
sites at 4x, 6x and 8x."""

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from shared_data import shared
from tasks.test_reconstruction import _job

from medfed.core.errors import ConfigError, DataError
from medfed.data.kspace import draw_masks, example_seeds, zero_filled
from medfed.data.kspace_input import MASK
from medfed.data.phantoms import make_phantoms
from medfed.data.sites import build_sites

SPLITS = ("train", "val", "test")


def _scaled(a: np.ndarray) -> np.ndarray:
    """A 2D image scaled to [0, 1] by its own minimum and maximum."""
    a = a.astype(np.float64)
    return (a - a.min()) / (a.max() - a.min())


# --------------------------------------------------------------------------- folder


def _folder(root: Path, sites=("a", "b"), n=8, size=32) -> dict:
    """Grey PNG phantoms of ``size`` at each site, with a CSV of 0/1 labels (the last row
    without one)."""
    rng = np.random.default_rng(0)
    out = []
    for s in sites:
        folder = root / s
        folder.mkdir(parents=True)
        rows = ["file,y"]
        for i in range(n):
            img = (make_phantoms(1, size, 5, rng)[0, 0].numpy() * 200 + 20).astype(np.uint8)
            Image.fromarray(img).save(folder / f"{i}.png")
            rows.append(f"{i}.png,{'' if i == n - 1 else i % 2}")
        (folder / "labels.csv").write_text("\n".join(rows) + "\n")
        out.append({"name": s, "images": str(folder), "csv": str(folder / "labels.csv")})
    return {"source": "folder", "label_columns": ["y"], "sites": out}


def test_folder_images_become_ground_truth_at_each_sites_acceleration(tmp_path):
    data = _folder(tmp_path)
    data["sites"][1]["acceleration"] = 8
    job = _job(tmp_path, data=data, task={"acceleration": 4})
    a, b = build_sites(job)
    for site in (a, b):
        assert sum(len(site.split(s)) for s in SPLITS) == 8  # the row without a label kept: its labels are dropped
        for s in SPLITS:
            split = site.split(s)
            assert split.images.shape == split.labels.shape == (len(split), 1, 32, 32)
            for name, truth in zip(split.names, split.labels[:, 0]):
                png = np.asarray(Image.open(tmp_path / site.name / name))
                assert np.allclose(truth.numpy(), _scaled(png), atol=1e-6)
    for i, (site, acceleration) in enumerate(((a, 4.0), (b, 8.0))):
        seeds = example_seeds(job.seed, i, "test", len(site.test))
        assert torch.equal(site.test.images, zero_filled(site.test.labels, acceleration, 0.08, "equispaced", seeds))


def test_folder_images_of_another_size_or_colour_are_refused(tmp_path):
    data = _folder(tmp_path, n=6)
    Image.fromarray(np.full((30, 32), 9, np.uint8)).save(tmp_path / "a" / "0.png")
    with pytest.raises(DataError, match=r"differ in size.*resize"):
        build_sites(_job(tmp_path, data=data))
    with pytest.raises(ConfigError, match=r"data\.channels: reconstruction undersamples grey images"):
        _job(tmp_path, data=data | {"channels": 3})


def test_a_constant_image_is_left_out_and_all_constant_is_refused(tmp_path):
    data = _folder(tmp_path, sites=("a",), n=6)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "a" / "3.png")  # black: nothing to reconstruct
    (site,) = build_sites(_job(tmp_path, data=data))
    names = [n for s in SPLITS for n in site.split(s).names]
    assert sorted(names) == ["0.png", "1.png", "2.png", "4.png", "5.png"]
    for s in SPLITS:
        truth = site.split(s).labels
        assert bool(torch.isfinite(truth).all()) and bool((truth.flatten(1).amax(1) == 1).all())
    for i in range(6):
        Image.fromarray(np.full((32, 32), 40, np.uint8)).save(tmp_path / "a" / f"{i}.png")
    with pytest.raises(DataError, match=r"site 'a' \w+ split: all \d+ image\(s\) are constant"):
        build_sites(_job(tmp_path, data=data))


# --------------------------------------------------------------------------- volumes


def _volumes(root: Path, sites=("a", "b", "c"), n=4, shape=(16, 16, 6), seed=0) -> dict:
    """``n`` NIfTI volumes of ``shape`` at each site (random intensities, no slice
    constant), each with a label volume."""
    rng = np.random.default_rng(seed)
    out = []
    for s in sites:
        images, masks = root / s / "images", root / s / "masks"
        images.mkdir(parents=True)
        masks.mkdir(parents=True)
        for i in range(n):
            volume = (rng.random(shape) * 300 + 10).astype(np.float32)
            nib.save(nib.Nifti1Image(volume, np.eye(4)), str(images / f"v{i}.nii.gz"))
            nib.save(nib.Nifti1Image((volume > 200).astype(np.uint8), np.eye(4)), str(masks / f"v{i}.nii.gz"))
        out.append({"name": s, "images": str(images), "masks": str(masks)})
    return {"source": "volumes", "sites": out}


def _volume(root: Path, site: str, name: str) -> np.ndarray:
    return np.asarray(nib.load(str(root / site / "images" / f"{name}.nii.gz")).get_fdata())


def test_volumes_are_split_by_volume_then_cut_into_slices_of_ground_truth(tmp_path):
    data = _volumes(tmp_path)
    job = _job(tmp_path, data=data)
    assert job.data_dims == 2  # the job's examples are 2D slices, its network 2D
    sites = build_sites(job)
    assert [s.name for s in sites] == ["a", "b", "c"]
    for site in sites:
        by_split = {s: {n.split("#")[0] for n in site.split(s).names} for s in SPLITS}
        assert all(by_split.values())
        assert sorted(set.union(*by_split.values())) == ["v0", "v1", "v2", "v3"]
        assert sum(map(len, by_split.values())) == 4  # each volume, all its slices, in one split only
        assert sum(len(site.split(s)) for s in SPLITS) == 4 * 6  # volumes x slices along the last axis
        for s in SPLITS:
            split = site.split(s)
            assert split.images.shape == split.labels.shape == (6 * len(by_split[s]), 1, 16, 16)
            for name, truth in zip(split.names, split.labels[:, 0]):
                volume, k = name.split("#")
                expected = _scaled(_volume(tmp_path, site.name, volume)[:, :, int(k)])
                assert np.allclose(truth.numpy(), expected, atol=1e-5)
    # another axis: 16 slices of 16 x 6 per volume, the same volumes in the same splits
    along0 = build_sites(_job(tmp_path, data=data, task={"slice_axis": 0}))
    for site, other in zip(sites, along0):
        for s in SPLITS:
            assert len(other.split(s)) == len(site.split(s)) // 6 * 16
            assert other.split(s).images.shape[2:] == (16, 6)
            assert {n.split("#")[0] for n in other.split(s).names} == {n.split("#")[0] for n in site.split(s).names}
        name, truth = other.test.names[3], other.test.labels[3, 0]
        volume, k = name.split("#")
        assert np.allclose(truth.numpy(), _scaled(_volume(tmp_path, site.name, volume)[int(k)]), atol=1e-5)


def test_volume_slices_take_each_sites_acceleration(tmp_path):
    data = _volumes(tmp_path, sites=("a", "b"), n=3, shape=(16, 32, 4))
    data["sites"][1]["acceleration"] = 8
    job = _job(tmp_path, data=data, task={"acceleration": 4}, model={"name": "varnet", "width": 4})
    a, b = build_sites(job)  # varnet's packed input holds each slice's mask
    fractions = {}
    for i, (site, acceleration) in enumerate(((a, 4.0), (b, 8.0))):
        seeds = example_seeds(job.seed, i, "train", len(site.train))
        lines = site.train.images[:, MASK, 0]  # (N, W): the lines kept
        assert torch.equal(lines, draw_masks(32, acceleration, 0.08, "equispaced", seeds))
        fractions[site.name] = float(lines.mean())
    assert abs(fractions["a"] - 1 / 4) < 0.05 and abs(fractions["b"] - 1 / 8) < 0.05


def test_constant_slices_are_left_out_and_never_divide_by_zero(tmp_path):
    data = _volumes(tmp_path, sites=("a",), n=3, shape=(16, 16, 4))
    path = tmp_path / "a" / "images" / "v1.nii.gz"
    volume = _volume(tmp_path, "a", "v1").astype(np.float32)
    volume[:, :, 0] = 0  # empty
    volume[:, :, 2] = 7  # constant
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(path))
    (site,) = build_sites(_job(tmp_path, data=data))
    names = [n for s in SPLITS for n in site.split(s).names]
    assert len(names) == 3 * 4 - 2 and "v1#0" not in names and "v1#2" not in names and "v1#1" in names
    assert all(bool(torch.isfinite(site.split(s).labels).all()) for s in SPLITS)
    volume[:] = 0
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(path))
    with pytest.raises(DataError, match=r"site 'a' \w+ split: every slice of its 1 volume\(s\) along axis 2 is constant"):
        build_sites(_job(tmp_path, data=data))


def test_bad_slicing_is_refused_naming_the_field(tmp_path):
    volumes = _volumes(tmp_path / "v", sites=("a",), n=3, shape=(16, 16, 5))
    with pytest.raises(ConfigError, match=r"task\.slice_axis: cuts volumes into 2D slices.*'folder'"):
        _job(tmp_path, data=_folder(tmp_path / "f", n=3), task={"slice_axis": 0})
    with pytest.raises(ConfigError, match=r"task\.slice_axis"):
        _job(tmp_path, task={"slice_axis": 1})  # phantoms
    with pytest.raises(ConfigError, match=r"task\.slice_axis"):
        _job(tmp_path, data=volumes, task={"slice_axis": 3})
    with pytest.raises(ConfigError, match=r"transforms\.preprocess\[0\]: resize needs 3 sizes"):
        _job(tmp_path, data=volumes, transforms={"preprocess": [{"name": "resize", "size": [16, 16]}]})
    assert len(build_sites(_job(tmp_path, data=volumes))[0].train.names) > 0  # 16 x 16 slices along axis 2
    with pytest.raises(DataError, match=r"site 'a' train split: the images of even size.*got 16x5"):
        build_sites(_job(tmp_path, data=volumes, task={"slice_axis": 1}))
    with pytest.raises(DataError, match=r"site 'a' train split: .*streams its files; set data\.cache: memory"):
        build_sites(_job(tmp_path, data=volumes | {"cache": "none"}))


def test_volumes_resized_in_3d_before_they_are_cut(tmp_path):
    data = _volumes(tmp_path, sites=("a",), n=3, shape=(16, 16, 6))
    job = _job(tmp_path, data=data, transforms={"preprocess": [{"name": "resize", "size": [8, 12, 4]}]})
    (site,) = build_sites(job)
    assert site.train.images.shape[1:] == (1, 8, 12) and sum(len(site.split(s)) for s in SPLITS) == 3 * 4


# --------------------------------------------------------------------------- short runs


@pytest.mark.parametrize("source", ["folder", "volumes"])
def test_a_one_round_run_of_each_source(tmp_path, source):
    from medfed.server.runner import run_job
    from medfed.tracking.metrics import read_metrics

    data = _folder(tmp_path / "f", n=6, size=16) if source == "folder" else _volumes(tmp_path / "v", n=3)
    data["sites"][0]["acceleration"] = 8
    run = run_job(_job(tmp_path, data=data, compare=["local"])).run_dir
    rec = read_metrics(run / "metrics.jsonl")
    arms = {r["arm"] for r in rec}
    assert arms == {"federated", "local", "zero_filled"}
    ssim = [r["value"] for r in rec if (r["arm"], r["site"], r["split"], r["metric"]) == ("federated", "all", "test", "ssim")]
    assert len(ssim) == 1 and np.isfinite(ssim[0])


# --------------------------------------------------------------------------- real data


def test_real_promise12_volume_loads_as_axial_slices(tmp_path):
    root = shared("volumes")
    image, mask = root / "promise12_Case00.nii.gz", root / "promise12_Case00_segmentation.nii.gz"
    sets = {}
    for split in SPLITS:  # one volume cannot fill three splits: the case linked into each
        for sub, source in (("images", image), ("masks", mask)):
            (tmp_path / split / sub).mkdir(parents=True)
            os.symlink(source, tmp_path / split / sub / "Case00.nii.gz")
        sets[split] = {"images": str(tmp_path / split / "images"), "masks": str(tmp_path / split / "masks")}
    (site,) = build_sites(_job(tmp_path, data={"source": "volumes", "sites": [{"name": "promise12", **sets}]}))
    array = np.asarray(nib.load(str(image)).get_fdata())
    assert array.shape == (128, 128, 64)
    varies = [k for k in range(64) if array[:, :, k].max() > array[:, :, k].min()]
    for split in SPLITS:
        data = site.split(split)
        assert data.images.shape == (len(varies), 1, 128, 128)
        assert data.names == tuple(f"{split}/Case00#{k}" for k in varies)
    k = varies[len(varies) // 2]
    assert np.allclose(site.test.labels[varies.index(k), 0].numpy(), _scaled(array[:, :, k]), atol=1e-5)
    assert float((site.test.images - site.test.labels).abs().mean()) > 0.005  # undersampled at 4x


def test_dicom_volumes_are_cut_into_their_own_slices_by_default(tmp_path):
    import shutil

    from pydicom.data import get_testdata_file

    frames = get_testdata_file("rtdose.dcm")  # a multi-frame volume (15 frames of 10 x 10): (slice, row, column)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for name in ("d0", "d1", "d2"):
        shutil.copy(frames, tmp_path / "images" / f"{name}.dcm")
        nib.save(nib.Nifti1Image(np.zeros((15, 10, 10), np.uint8), np.eye(4)), str(tmp_path / "masks" / f"{name}.nii.gz"))
    data = {"source": "volumes", "format": "dicom",
            "sites": [{"name": "a", "images": str(tmp_path / "images"), "masks": str(tmp_path / "masks")}]}
    (site,) = build_sites(_job(tmp_path, data=data))
    assert site.train.images.shape[1:] == (1, 10, 10)
    assert {int(n.split("#")[1]) for s in SPLITS for n in site.split(s).names} <= set(range(15))


def test_real_prostate_slices_of_three_sites_at_their_own_accelerations(tmp_path):
    root = shared("multisite", "prostate")
    folders = {"train": "train", "val": "test", "test": "test"}  # one or two slices a site: its test slice validates too
    sites = [{"name": n, "acceleration": a, **{s: {"images": str(root / n / f / "image"), "masks": str(root / n / f / "mask")}
                                                for s, f in folders.items()}}
             for n, a in (("BIDMC", 4), ("BMC", 6), ("HK", 8))]
    job = _job(tmp_path, data={"source": "pairs", "sites": sites, "mask_values": [0, 255]})
    out = build_sites(job)
    assert [s.name for s in out] == ["BIDMC", "BMC", "HK"]
    for k, (site, acceleration) in enumerate(zip(out, (4.0, 6.0, 8.0))):
        for split in ("train", "test"):
            data = site.split(split)
            assert len(data) >= 1 and data.images.shape[1:] == (1, 384, 384)
            for name, truth in zip(data.names, data.labels[:, 0]):
                png = np.asarray(Image.open(root / site.name / split / "image" / Path(name).name).convert("L"))
                assert np.allclose(truth.numpy(), _scaled(png), atol=1e-5)
            seeds = example_seeds(job.seed, k, split, len(data))
            assert torch.equal(data.images, zero_filled(data.labels, acceleration, 0.08, "equispaced", seeds))
