"""Reconstruction: MONAI's k-space masks, the zero-filled input, the metrics, a short
federated run on phantoms, and the jobs refused at load time."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medfed.config import parse_job
from medfed.core.errors import ConfigError, DataError
from medfed.data.kspace import draw_masks, example_seeds, undersample, zero_filled
from medfed.data.phantoms import make_phantoms
from medfed.data.readers.fastmri import read_fastmri_file
from medfed.data.sites import build_sites
from medfed.models import build_model
from medfed.tasks.reconstruction import PSNR_CAP_DB, image_metrics

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "reconstruction.yaml"


def _job(tmp_path, task=None, data=None, model=None, **top):
    body = {
        "name": "recon", "seed": 3, "output": str(tmp_path / "run"), "rounds": 1, "threads": 1,
        "data": data or {"source": "synthetic_phantoms", "image_size": 32, "sites": [
            {"name": "a", "n_train": 8, "n_val": 4, "n_test": 4},
            {"name": "b", "n_train": 8, "n_val": 4, "n_test": 4, "acceleration": 8},
        ]},
        "model": model or {"name": "unet", "width": 4},
        "task": {"kind": "reconstruction"} | (task or {}),
    } | top
    return parse_job(body)


# --------------------------------------------------------------------------- masks and k-space


@pytest.mark.parametrize("kind", ["equispaced", "random"])
@pytest.mark.parametrize("acceleration", [4, 8])
def test_monai_masks_sample_one_line_in_acceleration_and_keep_the_centre(kind, acceleration):
    width, centre = 64, 0.08
    masks = draw_masks(width, acceleration, centre, kind, range(200))
    assert masks.shape == (200, width)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert abs(float(masks.mean()) - 1 / acceleration) < 0.03  # the sampled fraction, over many draws
    n_low = round(width * centre)
    pad = (width - n_low + 1) // 2
    assert bool((masks[:, pad:pad + n_low] == 1).all())  # the centre of k-space always kept


def test_masks_are_drawn_from_each_examples_seed():
    seeds = example_seeds(0, 1, "train", 6)
    assert len(set(seeds)) == 6 and seeds == example_seeds(0, 1, "train", 6)
    assert seeds != example_seeds(0, 1, "test", 6) and seeds != example_seeds(1, 1, "train", 6)
    a = draw_masks(32, 4, 0.08, "random", seeds)
    assert torch.equal(a, draw_masks(32, 4, 0.08, "random", seeds))
    assert not all(torch.equal(a[0], a[i]) for i in range(1, 6))  # examples get different masks


def test_zero_filled_of_a_fully_sampled_image_is_the_image():
    images = make_phantoms(3, 32, 5, np.random.default_rng(0))
    out = zero_filled(images, 1.0, 0.08, "random", [1, 2, 3])
    assert torch.allclose(out, images, atol=1e-5)
    # MONAI's equispaced mask stops one line short of the edge of k-space, even at 1x
    assert float(draw_masks(32, 1.0, 0.08, "equispaced", [1]).sum()) == 31
    under = zero_filled(images, 4.0, 0.08, "equispaced", [1, 2, 3])
    assert float((under - images).abs().mean()) > 0.01  # undersampling does lose something


def test_zero_filled_refuses_odd_sizes():
    with pytest.raises(DataError, match="even size"):
        zero_filled(torch.zeros(1, 1, 31, 32), 4.0, 0.08, "random", [0])


# --------------------------------------------------------------------------- metrics and model


def test_perfect_reconstruction_scores_top_psnr_ssim_one_nmse_zero():
    images = make_phantoms(4, 32, 5, np.random.default_rng(1))
    m = image_metrics(images, images)
    assert torch.all(m["psnr"] == PSNR_CAP_DB)
    assert torch.allclose(m["ssim"], torch.ones(4), atol=1e-5)
    assert torch.all(m["nmse"] == 0)
    worse = image_metrics(images + 0.1, images)
    assert torch.all(worse["psnr"] < 25) and torch.all(worse["ssim"] < 1) and torch.all(worse["nmse"] > 0)


def test_a_residual_network_starts_from_its_input(tmp_path):
    job = _job(tmp_path)
    model = build_model(job.model, job.task, 1).eval()
    x = torch.rand(2, 1, 32, 32)
    assert "residual_scale" in model.state_dict()
    assert torch.equal(model(x), x)
    plain = build_model(job.model, job.task.model_copy(update={"residual": False}), 1).eval()
    assert "residual_scale" not in plain.state_dict() and not torch.equal(plain(x), x)


def test_phantom_sites_are_zero_filled_inputs_with_ground_truth(tmp_path):
    job = _job(tmp_path)
    a, b = build_sites(job)
    assert a.train.images.shape == a.train.labels.shape == (8, 1, 32, 32)
    assert 0 <= float(a.train.labels.min()) and float(a.train.labels.max()) <= 1
    again = build_sites(job)[0]
    assert torch.equal(a.train.images, again.train.images)  # the same input every time the job is read
    # each example's mask from (job seed, site index, split, example index); site b at its own 8x
    for i, (site, acceleration) in enumerate(((a, 4.0), (b, 8.0))):
        seeds = example_seeds(job.seed, i, "test", 4)
        expected = zero_filled(site.test.labels, acceleration, 0.08, "equispaced", seeds)
        assert torch.equal(site.test.images, expected)
    assert not torch.equal(b.test.images, zero_filled(b.test.labels, 4.0, 0.08, "equispaced", seeds))


# --------------------------------------------------------------------------- a short run


def test_short_federated_run_beats_zero_filled(tmp_path):
    from medfed.server.runner import run_job
    from medfed.tracking.metrics import read_metrics

    body = yaml.safe_load(EXAMPLE.read_text())
    body["output"] = str(tmp_path / "run")
    body["rounds"] = 6
    body["compare"] = []
    body["train"]["local_epochs"] = 3
    for site, n in zip(body["data"]["sites"], (40, 30, 20)):
        site.update(n_train=n, n_val=8, n_test=8)
    job = parse_job(body)
    run = run_job(job).run_dir
    rec = read_metrics(run / "metrics.jsonl")

    def test_all(arm, metric, rnd):
        (value,) = [r["value"] for r in rec if (r["arm"], r["site"], r["split"], r["metric"], r["round"])
                    == (arm, "all", "test", metric, rnd)]
        return value

    assert test_all("federated", "ssim", 6) > test_all("zero_filled", "ssim", 6) + 0.03
    assert test_all("federated", "nmse", 6) < test_all("zero_filled", "nmse", 6)
    loss = [r["value"] for r in rec if (r["arm"], r["site"], r["split"], r["metric"]) == ("federated", "hospital_a", "train", "loss")]
    assert len(loss) == 6 and loss[-1] < loss[0]
    assert {r["arm"] for r in rec} == {"federated", "zero_filled"}
    assert len(list((run / "reconstructions").glob("*/*.png"))) == 3 * 4
    report = (run / "report.html").read_text()
    assert "Reconstructions" in report and "zero_filled" in report


# --------------------------------------------------------------------------- refused at load time


@pytest.mark.parametrize("task, field", [
    ({"acceleration": 0.5}, "task.acceleration"),
    ({"center_fraction": 0}, "task.center_fraction"),
    ({"center_fraction": 1.0}, "task.center_fraction"),
    ({"acceleration": 16, "center_fraction": 0.08}, "center_fraction"),
    ({"mask": "radial"}, "task.mask"),
])
def test_bad_task_settings_are_refused_naming_the_field(tmp_path, task, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        _job(tmp_path, task=task)


def test_odd_image_size_and_a_site_acceleration_too_high_are_refused(tmp_path):
    data = {"source": "synthetic_phantoms", "image_size": 33, "sites": [{"name": "a", "n_train": 4, "n_test": 2}]}
    with pytest.raises(ConfigError, match=r"data\.image_size.*even"):
        _job(tmp_path, data=data)
    data = {"source": "synthetic_phantoms", "sites": [{"name": "a", "n_train": 4, "n_test": 2, "acceleration": 0.5}]}
    with pytest.raises(ConfigError, match=r"data\.sites\[0\]\.acceleration: must be >= 1"):
        _job(tmp_path, data=data)
    data = {"source": "synthetic_phantoms", "sites": [{"name": "a", "n_train": 4, "n_test": 2, "acceleration": 20}]}
    with pytest.raises(ConfigError, match=r"data\.sites\[0\]\.acceleration"):
        _job(tmp_path, data=data)


def test_task_model_and_data_that_do_not_go_together_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.name.*reconstruction"):
        _job(tmp_path, model={"name": "small_cnn"})
    synthetic = {"source": "synthetic", "sites": [{"name": "a", "n_train": 4, "n_test": 2}]}
    with pytest.raises(ConfigError, match=r"data\.source.*reconstruction"):
        _job(tmp_path, data=synthetic)
    with pytest.raises(ConfigError, match=r"data\.source.*synthetic_phantoms"):
        _job(tmp_path, task={"kind": "classification", "labels": "binary"})
    with pytest.raises(ConfigError, match=r"transforms\.augment"):
        _job(tmp_path, transforms={"augment": [{"name": "flip", "axes": [0]}]})


# --------------------------------------------------------------------------- fastMRI HDF5 files


def _fastmri_file(path: Path, n: int, seed: int, kspace: bool = True) -> torch.Tensor:
    """A tiny single-coil fastMRI file: phantoms (n, 32, 32) as reconstruction_esc, their
    k-space of a 36x40 field of view (zero-padded, like fastMRI's oversampled readout)."""
    from monai.data.fft_utils import fftn_centered

    h5py = pytest.importorskip("h5py")
    truth = make_phantoms(n, 32, 5, np.random.default_rng(seed))[:, 0] * 3.0  # not scaled to [0, 1]
    field = torch.nn.functional.pad(truth, (4, 4, 2, 2))  # (n, 36, 40)
    k = torch.view_as_complex(fftn_centered(torch.stack([field, torch.zeros_like(field)], -1), spatial_dims=2).contiguous())
    with h5py.File(path, "w") as f:
        if kspace:
            f["kspace"] = k.numpy().astype(np.complex64)
        f["reconstruction_esc"] = truth.numpy()
        f.attrs["acquisition"] = "CORPD_FBK"
    return truth


def _fastmri_job(tmp_path, task=None, kspace=True):
    sites = []
    for i, name in enumerate(("a", "b")):
        folders = {}
        for j, split in enumerate(("train", "val", "test")):
            folder = tmp_path / name / split
            folder.mkdir(parents=True)
            _fastmri_file(folder / "file1.h5", 3, 10 * i + j, kspace=kspace or split != "val")
            folders[split] = str(folder)
        sites.append({"name": name, **folders} | ({"acceleration": 8} if name == "b" else {}))
    data = {"source": "fastmri", "sites": sites}
    return _job(tmp_path, task=task, data=data)


def test_fastmri_files_are_read_undersampled_cropped_and_scaled(tmp_path):
    full = build_sites(_fastmri_job(tmp_path, task={"acceleration": 1, "mask": "random"}))
    a = full[0]
    assert a.train.images.shape == a.train.labels.shape == (3, 1, 32, 32)
    assert torch.allclose(a.train.labels.flatten(1).amax(1), torch.ones(3))  # each slice's truth peaks at 1
    assert torch.allclose(a.train.images, a.train.labels, atol=1e-5)  # fully sampled: the input is the truth
    assert a.test.names == ("file1.h5#0", "file1.h5#1", "file1.h5#2")
    job = _fastmri_job(tmp_path / "u", task={"acceleration": 4})
    under = build_sites(job)
    assert float((under[0].train.images - under[0].train.labels).abs().mean()) > 0.01
    # site b at its own 8x: each slice's mask from (job seed, site index, split, slice index), then cropped, scaled
    kspace, truth = read_fastmri_file(Path(job.data.sites[1].test) / "file1.h5", "reconstruction_esc")
    zf = undersample(kspace, 8.0, 0.08, "equispaced", example_seeds(job.seed, 1, "test", 3))
    expected = zf[:, 2:34, 4:36] / truth.flatten(1).amax(1)[:, None, None]
    assert torch.allclose(under[1].test.images[:, 0], expected, atol=1e-6)


def test_a_fastmri_file_without_kspace_is_refused_naming_it(tmp_path):
    job = _fastmri_job(tmp_path, kspace=False)
    with pytest.raises(DataError, match=r"site 'a': fastMRI file '.*val/file1\.h5': has no 'kspace'"):
        build_sites(job)


# --------------------------------------------------------------------------- images of other sources


def test_pairs_and_medmnist_images_become_ground_truth_of_their_undersampling(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for site in ("a", "b"):
        for sub in ("images", "masks"):
            (tmp_path / site / sub).mkdir(parents=True)
        for i in range(8):
            img = (make_phantoms(1, 32, 5, rng)[0, 0].numpy() * 200 + 20).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / site / "images" / f"{i}.png")
            Image.fromarray(((img > 100) * 255).astype(np.uint8)).save(tmp_path / site / "masks" / f"{i}.png")
    data = {"source": "pairs", "mask_values": [0, 255], "sites": [
        {"name": s, "images": str(tmp_path / s / "images"), "masks": str(tmp_path / s / "masks")} for s in ("a", "b")]}
    job = _job(tmp_path, data=data, task={"acceleration": 6})
    a, b = build_sites(job)
    assert a.train.images.shape == a.train.labels.shape and a.train.images.shape[1:] == (1, 32, 32)
    lo, hi = a.train.labels.flatten(1).amin(1), a.train.labels.flatten(1).amax(1)
    assert torch.allclose(lo, torch.zeros_like(lo)) and torch.allclose(hi, torch.ones_like(hi))  # each image in [0, 1]
    seeds = example_seeds(job.seed, 1, "test", len(b.test))
    assert torch.equal(b.test.images, zero_filled(b.test.labels, 6.0, 0.08, "equispaced", seeds))
    # a site of a file source undersampled at its own acceleration (the task's for the other)
    own = _job(tmp_path, data={**data, "sites": [data["sites"][0], {**data["sites"][1], "acceleration": 8}]},
               task={"acceleration": 6})
    a8, b8 = build_sites(own)
    assert torch.equal(a8.test.images, a.test.images)
    assert torch.equal(b8.test.images, zero_filled(b8.test.labels, 8.0, 0.08, "equispaced", seeds))
    assert not torch.equal(b8.test.images, b.test.images)
    assert "acceleration" not in own.model_dump(mode="json")["data"]["sites"][0]  # unset: older jobs keep their hash
    with pytest.raises(ConfigError, match=r"data\.sites\[1\]\.acceleration: undersampling is for task.kind: "
                                          "reconstruction"):
        parse_job({**_job(tmp_path).model_dump(mode="json"), "task": {"labels": "binary"}, "model": {"name": "small_cnn"},
                   "data": {"source": "folder", "label_columns": ["y"], "sites": [
                       {"name": "a", "images": "i", "csv": "c.csv"},
                       {"name": "b", "images": "i", "csv": "c.csv", "acceleration": 4}]}})

    npz = tmp_path / "tiny.npz"
    arrays = {f"{s}_images": (make_phantoms(n, 28, 4, rng)[:, 0].numpy() * 255).astype(np.uint8)
              for s, n in (("train", 12), ("val", 6), ("test", 6))}
    arrays |= {f"{s}_labels": np.zeros(len(arrays[f"{s}_images"]), dtype=np.int64) for s in ("train", "val", "test")}
    np.savez(npz, **arrays)
    data = {"source": "medmnist", "path": str(npz), "partition": {"method": "iid", "sites": ["a", "b"]}}
    a, _ = build_sites(_job(tmp_path, data=data, model={"monai": "BasicUNet"}))
    assert a.train.images.shape[1:] == (1, 28, 28) and a.train.labels.dtype == torch.float32
    with pytest.raises(ConfigError, match=r"data\.dims: reconstruction undersamples 2D images"):
        _job(tmp_path, data=data | {"dims": 3})


def test_image_sources_still_serve_their_own_tasks(tmp_path):
    data = {"source": "pairs", "mask_values": [0, 255], "sites": [{"name": "a", "images": "i", "masks": "m"}]}
    job = _job(tmp_path, data=data, task={"kind": "segmentation"})
    assert job.task.kind == "segmentation"
