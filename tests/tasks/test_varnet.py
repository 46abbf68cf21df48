"""VarNet (``model: {name: varnet}``): the packed k-space input through the site data
(phantoms and fastMRI files), the data consistency of MONAI's cascades on it, a short
federated run with the zero_filled arm, and the jobs refused at load time."""

import numpy as np
import pytest
import torch
from monai.apps.reconstruction.networks.nets.coil_sensitivity_model import CoilSensitivityModel
from monai.data.fft_utils import fftn_centered, ifftn_centered
from torch import nn

from medfed.config import parse_job
from medfed.core.codec import decode_params, encode_params
from medfed.core.errors import ConfigError
from medfed.data.kspace import draw_masks, example_seeds, to_kspace, undersample_packed
from medfed.data.kspace_input import KSPACE_CHANNELS, ZeroFilledImage, unpack, window_size
from medfed.data.phantoms import make_phantoms
from medfed.data.sites import build_sites
from medfed.models import build_model, get_params
from medfed.tasks.reconstruction import image_metrics
from medfed.varnet import VarNetReconstructor

from tasks.test_reconstruction import _fastmri_job, _job

VARNET = {"name": "varnet", "width": 4, "cascades": 1}


class _Zero(nn.Module):
    """A refinement network that proposes no change."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


class _Constant(nn.Module):
    """A refinement network that proposes one fixed complex image (1, 1, H, W, 2)."""

    def __init__(self, image: torch.Tensor):
        super().__init__()
        self.image = image

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.image.expand_as(x)


class _UnitSensitivity(nn.Module):
    """Coil sensitivity 1 everywhere (real 1, imaginary 0)."""

    def forward(self, masked_kspace: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.ones_like(masked_kspace[..., 0]), torch.zeros_like(masked_kspace[..., 1])], -1)


def _images(n: int, size: int = 32) -> torch.Tensor:
    """Phantoms (n, size, size) made lopsided (no point symmetry: a real/imaginary swap,
    which mirrors the image, shows)."""
    truth = make_phantoms(n, size, 5, np.random.default_rng(1))[:, 0]
    truth[:, : size // 4, : size // 3] += 0.5
    return truth


# --------------------------------------------------------------------------- the packed input


def test_phantom_sites_give_varnet_the_masked_kspace_the_mask_and_the_zero_filled_image(tmp_path):
    unet_sites = build_sites(_job(tmp_path))
    job = _job(tmp_path, model=VARNET)
    sites = build_sites(job)
    for i, (site, plain, acceleration) in enumerate(zip(sites, unet_sites, (4.0, 8.0))):
        x = site.test.images
        assert x.shape == (4, KSPACE_CHANNELS, 32, 32) and site.test.labels.shape == (4, 1, 32, 32)
        assert torch.equal(site.test.labels, plain.test.labels)
        # the zero_filled arm scores exactly the U-Net's input
        assert torch.equal(ZeroFilledImage()(x), plain.test.images)
        masked, lines, size = unpack(x)
        expected_lines = draw_masks(32, acceleration, 0.08, "equispaced", example_seeds(job.seed, i, "test", 4))
        assert size == (32, 32) and torch.equal(lines, expected_lines.bool())
        full = to_kspace(site.test.labels[:, 0])
        assert torch.allclose(masked[:, 0], full * expected_lines[:, None, :, None], atol=1e-6)


def test_images_of_other_sources_are_packed_too(tmp_path):
    rng = np.random.default_rng(0)
    npz = tmp_path / "tiny.npz"
    arrays = {f"{s}_images": (make_phantoms(n, 28, 4, rng)[:, 0].numpy() * 255).astype(np.uint8)
              for s, n in (("train", 8), ("val", 4), ("test", 4))}
    arrays |= {f"{s}_labels": np.zeros(len(arrays[f"{s}_images"]), dtype=np.int64) for s in ("train", "val", "test")}
    np.savez(npz, **arrays)
    data = {"source": "medmnist", "path": str(npz), "partition": {"method": "iid", "sites": ["a", "b"]}}
    plain = build_sites(_job(tmp_path, data=data))
    packed = build_sites(_job(tmp_path, data=data, model=VARNET))
    for site, own in zip(packed, plain):
        assert site.train.images.shape[1:] == (KSPACE_CHANNELS, 28, 28)
        assert torch.equal(site.train.labels, own.train.labels)
        assert torch.equal(ZeroFilledImage()(site.train.images), own.train.images)


def test_with_no_refinement_varnet_returns_the_image_of_its_kspace():
    truth = _images(3)
    model = VarNetReconstructor(cascades=2, features=(4, 4, 8, 16, 32, 4), sens_features=(4, 4, 8, 16, 32, 4)).eval()
    for cascade in model.varnet.cascades:
        cascade.model = _Zero()
    seeds = [11, 12, 13]
    with torch.no_grad():
        # every line kept (acceleration 1, random mask): the output is the ground truth
        full = undersample_packed(to_kspace(truth), 1.0, 0.08, "random", seeds)
        assert bool(full[:, 3].all())
        assert torch.allclose(model(full)[:, 0], truth, atol=1e-5)
        # undersampled: the zero-filled image, packed beside the k-space
        x = undersample_packed(to_kspace(truth), 4.0, 0.08, "random", seeds)
        assert torch.allclose(model(x), ZeroFilledImage()(x), atol=1e-5)
        assert not torch.allclose(model(x)[:, 0], truth, atol=1e-2)
        swapped = full.clone()
        swapped[:, [1, 2]] = full[:, [2, 1]]  # real and imaginary parts in the wrong order: a mirrored image
        assert not torch.allclose(model(swapped)[:, 0], truth, atol=1e-2)


def test_data_consistency_keeps_the_measured_lines_of_each_examples_own_mask():
    truth = _images(4)
    seeds = [1, 2, 3, 4]
    x = undersample_packed(to_kspace(truth), 4.0, 0.08, "equispaced", seeds)
    masked, lines, _ = unpack(x)
    assert len(torch.unique(lines, dim=0)) > 1  # several masks in one batch, each example's its own
    model = VarNetReconstructor(cascades=2, features=(4, 4, 8, 16, 32, 4), sens_features=(4, 4, 8, 16, 32, 4)).eval()
    proposal = torch.randn(1, 1, 32, 32, 2, generator=torch.Generator().manual_seed(0))
    model.varnet.coil_sensitivity_model = _UnitSensitivity()
    model.varnet.cascades[0].model = _Constant(proposal)
    model.varnet.cascades[1].model = _Zero()
    with torch.no_grad():
        out = model(x)[:, 0]
    # cascade 1: k1 = k0 - F(c); cascade 2 pulls the measured lines back: k2 = k0 - (1 - mask) F(c)
    c = fftn_centered(proposal[0, 0], spatial_dims=2, is_complex=True)
    keep = lines.float()[:, None, :, None]
    k2 = masked[:, 0] - (1 - keep) * c
    expected = torch.linalg.vector_norm(ifftn_centered(k2, spatial_dims=2, is_complex=True), dim=-1)
    assert torch.allclose(out, expected, atol=1e-5)
    wrong_axis = masked[:, 0] - (1 - lines.float()[:, :, None, None]) * c  # the mask laid along H
    assert not torch.allclose(out, torch.linalg.vector_norm(ifftn_centered(wrong_axis, spatial_dims=2, is_complex=True), dim=-1), atol=1e-3)
    # a batch of masks gives each example what it gets alone, and the coil sensitivities of
    # one example are those of MONAI's own model
    real = VarNetReconstructor(cascades=1, features=(4, 4, 8, 16, 32, 4), sens_features=(4, 4, 8, 16, 32, 4)).eval()
    sens = real.varnet.coil_sensitivity_model
    with torch.no_grad():
        together = real(x)
        alone = torch.cat([real(x[i:i + 1]) for i in range(4)])
        maps = sens(masked, lines[:, None, None, :, None])
        for i in range(4):
            monai_maps = CoilSensitivityModel.forward(sens, masked[i:i + 1], lines[i].view(1, 1, 1, -1, 1))
            assert torch.allclose(maps[i:i + 1], monai_maps, atol=1e-6)
    assert torch.allclose(together, alone, atol=1e-5)


def test_varnet_state_goes_through_the_codec_and_has_no_residual(tmp_path):
    job = _job(tmp_path, model=VARNET)
    model = build_model(job.model, job.task, KSPACE_CHANNELS)
    params = get_params(model)
    assert params and all(v.dtype == torch.float32 for v in params.values())
    assert "residual_scale" not in params  # task.residual: varnet's cascades refine the measured k-space already
    assert not any(k.endswith(".zeros") for k in params)  # MONAI's constant is not state the sites share
    back = decode_params(bytes(encode_params(params)))
    assert back.keys() == params.keys() and all(torch.equal(back[k], params[k]) for k in params)
    assert sum(k.startswith("varnet.cascades.0.") for k in params) and not any(k.startswith("varnet.cascades.1.") for k in params)
    # in float32 under a site's autocast too (half-precision FFTs take power-of-two sizes only)
    x = build_sites(job)[0].test.images
    model.eval()
    with torch.no_grad():
        plain = model(x)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            mixed = model(x)
    assert mixed.dtype == torch.float32 and torch.equal(mixed, plain)


# --------------------------------------------------------------------------- fastMRI files


def test_fastmri_files_give_varnet_their_whole_kspace_and_the_truths_window(tmp_path):
    plain_job = _fastmri_job(tmp_path / "plain", task={"acceleration": 4})
    plain = build_sites(plain_job)
    job = parse_job(plain_job.model_dump(mode="json") | {"model": VARNET})
    sites = build_sites(job)
    a = sites[0]
    assert a.train.images.shape == (3, KSPACE_CHANNELS, 36, 40) and a.train.labels.shape == (3, 1, 32, 32)
    assert window_size(a.train.images) == (32, 32)
    assert torch.equal(a.train.labels, plain[0].train.labels)
    for site, own in zip(sites, plain):  # the zero_filled arm: the U-Net's cropped, scaled input
        assert torch.allclose(ZeroFilledImage()(site.test.images), own.test.images, atol=1e-6)
    model = build_model(job.model, job.task, KSPACE_CHANNELS).eval()
    with torch.no_grad():
        assert model(a.test.images).shape == (3, 1, 32, 32)
    # every line kept and no refinement: the network's cropped output is the scaled ground truth
    full = build_sites(parse_job(job.model_dump(mode="json") | {"task": {"kind": "reconstruction", "acceleration": 1,
                                                                          "mask": "random"}}))
    for cascade in model.varnet.cascades:
        cascade.model = _Zero()
    with torch.no_grad():
        assert torch.allclose(model(full[0].test.images), full[0].test.labels, atol=1e-5)


# --------------------------------------------------------------------------- a short run


def test_a_short_federated_varnet_run_scores_the_zero_filled_and_federated_arms(tmp_path):
    from medfed.server.runner import run_job
    from medfed.tracking.metrics import read_metrics

    job = _job(tmp_path, model=VARNET, rounds=2, task={"save_predictions": 2},
               train={"local_epochs": 1, "batch_size": 4, "lr": 0.003, "optimizer": "adam"})
    run = run_job(job).run_dir
    rec = read_metrics(run / "metrics.jsonl")
    test = {(r["arm"], r["site"], r["metric"], r["round"]): r["value"] for r in rec if r["split"] == "test"}
    for arm in ("zero_filled", "federated"):
        for metric in ("psnr", "ssim", "nmse"):
            value = test[(arm, "all", metric, 2)]
            assert value is not None and np.isfinite(value)
    # the zero_filled arm scored the zero-filled images themselves
    site = build_sites(_job(tmp_path))[0]
    expected = image_metrics(site.test.images, site.test.labels)
    assert test[("zero_filled", "a", "psnr", 2)] == pytest.approx(float(expected["psnr"].double().mean()), rel=1e-5)
    assert test[("federated", "a", "psnr", 2)] != pytest.approx(test[("zero_filled", "a", "psnr", 2)], rel=1e-4)
    loss = [r["value"] for r in rec if (r["arm"], r["site"], r["split"], r["metric"]) == ("federated", "a", "train", "loss")]
    assert len(loss) == 2 and all(np.isfinite(loss))
    assert len(list((run / "reconstructions").glob("*/*.png"))) == 2 * 2


# --------------------------------------------------------------------------- refused at load time


def test_varnet_outside_reconstruction_and_its_fields_elsewhere_are_refused(tmp_path):
    synthetic = {"source": "synthetic", "sites": [{"name": "a", "n_train": 4, "n_test": 2}]}
    with pytest.raises(ConfigError, match=r"model\.name: 'varnet'.*task\.kind: reconstruction, got task\.kind "
                                          r"'classification'"):
        _job(tmp_path, data=synthetic, model=VARNET, task={"kind": "classification", "labels": "binary"})
    with pytest.raises(ConfigError, match=r"model\.cascades.*'varnet'.*'unet'"):
        _job(tmp_path, model={"name": "unet", "cascades": 2})
    with pytest.raises(ConfigError, match=r"model\.features"):
        _job(tmp_path, model={**VARNET, "features": [4, 4, 8]})
    unet = _job(tmp_path)
    assert unet.model.cascades is None
    from medfed.config import hashed_model

    assert "cascades" not in hashed_model(unet.model_dump(mode="json")["model"])  # older jobs keep their hash
