"""HarmoFL (algorithms/harmofl.py): amplitude normalization at each site, the weight
perturbation of the local step, the server's mean, and what the job refuses."""

import copy

import pytest
import torch
from torch import nn

from medfed.algorithms import build_algorithm
from medfed.algorithms.harmofl import HarmoFL, HarmoFLHook
from medfed.config import parse_job
from medfed.core.errors import ConfigError
from medfed.core.types import Arm, Split, TrainSettings, Update
from medfed.data.base import ArraySplit, Planned
from medfed.data.frequency import AmplitudeNormalized, band_half, normalize_amplitude, site_amplitude
from medfed.data.sites import build_sites
from medfed.models import build_model, get_params
from medfed.server.loop import make_plan
from medfed.site.app import SiteApp
from medfed.site.train import train_local


def _spectrum(x):
    return torch.fft.fftshift(torch.fft.fft2(x.to(torch.float64)), dim=(-2, -1))


def _images(n, seed, size=(12, 12), channels=2):
    return torch.rand(n, channels, *size, generator=torch.Generator().manual_seed(seed))


def test_the_site_amplitude_is_the_mean_of_its_images_amplitude_spectra():
    x = _images(10, 0)
    ref = site_amplitude(ArraySplit(x, torch.zeros(10, dtype=torch.long)), count=100, seed=0)
    assert torch.allclose(ref, _spectrum(x).abs().mean(0).float(), atol=1e-5)
    few = site_amplitude(ArraySplit(x, torch.zeros(10, dtype=torch.long)), count=3, seed=1)
    assert not torch.allclose(few, ref, atol=1e-3)  # drawn from 3 of them


@pytest.mark.parametrize("ratio,size", [(1.0, (12, 12)), (0.4, (12, 12)), (1.0, (11, 13)), (0.5, (10, 14))])
def test_normalized_images_keep_their_phase_and_take_the_site_amplitude(ratio, size):
    x = _images(4, 1, size)
    ref = _spectrum(_images(30, 2, size) * 3.0).abs().mean(0).float()  # another "scanner": brighter
    out = normalize_amplitude(x, ref, ratio)
    assert out.shape == x.shape and out.dtype == x.dtype
    before, after = _spectrum(x), _spectrum(out)
    h, w = size
    b = band_half(size, ratio)
    inside = torch.zeros(h, w, dtype=torch.bool)
    inside[max(h // 2 - b, 0): h // 2 + b + 1, max(w // 2 - b, 0): w // 2 + b + 1] = True
    amp = after.abs()
    # inside the band: the site's amplitude; outside: the image's own
    assert torch.allclose(amp[..., inside], ref.double().expand_as(amp)[..., inside], rtol=1e-4, atol=1e-4)
    assert torch.allclose(amp[..., ~inside], before.abs()[..., ~inside], rtol=1e-6, atol=1e-6)
    # the phase everywhere is the image's own (compared as unit vectors, where the amplitude is not ~0)
    ok = (before.abs() > 1e-6) & (amp > 1e-6)
    assert torch.allclose((after / amp)[ok], (before / before.abs())[ok], atol=1e-6)
    assert not torch.allclose(out, x, atol=1e-3)  # it did change the images


def test_a_normalized_split_normalizes_every_batch_and_its_subsets():
    x, y = _images(6, 3), torch.arange(6)
    ref = _spectrum(_images(5, 4)).abs().mean(0).float()
    split = AmplitudeNormalized(ArraySplit(x, y, names=tuple("abcdef")), ref, 1.0)
    (batch,) = split.batches([Planned(torch.tensor([1, 4]))])
    assert torch.allclose(batch.images, normalize_amplitude(x[[1, 4]], ref, 1.0))
    assert torch.equal(batch.labels, y[[1, 4]]) and split.names == tuple("abcdef") and len(split) == 6
    (sub,) = split.subset(torch.tensor([2])).batches([Planned(torch.tensor([0]))])
    assert torch.allclose(sub.images, normalize_amplitude(x[[2]], ref, 1.0))


class _Mse:
    def loss(self, out, y):
        return ((out.squeeze(1) - y) ** 2).mean()


def _step(alpha, w0, x, y, lr):
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(w0)
    settings = TrainSettings(local_epochs=1, batch_size=len(x), lr=lr, optimizer="sgd", momentum=0.0,
                             weight_decay=0.0, seed=0)
    train_local(model, ArraySplit(x, y), _Mse(), settings, HarmoFLHook(alpha), torch.device("cpu"))
    return model[1].weight.detach().clone()


def test_the_perturbed_step_matches_a_hand_computation():
    x = torch.tensor([[1.0, 2.0, 0.0, -1.0], [0.5, -1.0, 1.0, 2.0], [2.0, 0.0, -1.0, 1.0]]).view(3, 1, 2, 2)
    y = torch.tensor([1.0, -2.0, 0.5])
    w0 = torch.tensor([[0.3, -0.2, 0.1, 0.4]])
    alpha, lr = 0.5, 0.1
    a = x.view(3, 4)

    def grad(w):  # d/dw mean((a w - y)^2) = 2/n a^T (a w - y)
        return (2.0 / 3.0) * a.T @ (a @ w.view(4) - y)

    g0 = grad(w0)
    eps = alpha * g0 / g0.norm()
    expected = w0.view(4) - lr * grad(w0.view(4) + eps)
    got = _step(alpha, w0, x, y, lr).view(4)
    assert torch.allclose(got, expected, atol=1e-5)
    plain = w0.view(4) - lr * g0
    assert torch.allclose(_step(0.0, w0, x, y, lr).view(4), plain, atol=1e-6)  # alpha 0: plain SGD
    assert not torch.allclose(got, plain, atol=1e-3)


def test_the_hook_moves_by_alpha_along_the_gradient_and_back():
    model = nn.Linear(3, 1)
    model(torch.ones(2, 3)).sum().backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    moves = HarmoFLHook(0.2).perturb(model)
    norm = torch.sqrt(sum((m ** 2).sum() for m in moves.values()))
    assert norm == pytest.approx(0.2, rel=1e-5)
    HarmoFLHook(0.2).unperturb(model, moves)
    assert all(torch.allclose(p, before[n]) for n, p in model.named_parameters())
    model.weight.grad = torch.full_like(model.weight, float("inf"))
    assert HarmoFLHook(0.2).perturb(model) is None  # an overflowed mixed-precision step is not perturbed


def test_the_server_takes_the_weighted_mean():
    alg = HarmoFL(0.05)
    ups = [Update("a", 1, {"w": torch.tensor([1.0])}, 1, 1), Update("b", 1, {"w": torch.tensor([4.0])}, 3, 1)]
    assert torch.allclose(alg.aggregate({"w": torch.tensor([0.0])}, ups)["w"], torch.tensor([3.25]))


BASE = {
    "name": "harmo", "output": "o", "rounds": 1, "threads": 1, "device": "cpu", "seed": 3,
    "algorithm": {"name": "harmofl", "alpha": 0.05},
    "data": {"source": "synthetic", "image_size": 16, "sites": [
        {"name": "a", "n_train": 16, "n_val": 8, "n_test": 8}, {"name": "b", "n_train": 16, "n_val": 8, "n_test": 8},
        {"name": "c", "n_train": 16, "n_val": 8, "n_test": 8}]},
    "feature_shift": {"b": {"contrast": 1.6, "intensity_offset": 0.2}},
    "model": {"name": "small_cnn", "width": 4}, "task": {"labels": "binary"}, "train": {"batch_size": 8, "lr": 0.05},
}


def _job(**kw):
    return parse_job({**copy.deepcopy(BASE), **kw})


def test_nothing_of_the_spectrum_is_in_the_update_and_the_site_trains_on_normalized_images():
    job = _job()
    site = build_sites(job)[1]
    torch.manual_seed(0)
    init = get_params(build_model(job.model, job.task, 1))
    app = SiteApp(site, job, torch.device("cpu"))
    up = app.fit(init, make_plan(job, "j", Arm.FEDERATED, 1, 0))
    assert set(up.params) == set(init) and up.extras == {}  # the model's entries and nothing else
    ref = app.data_for(Arm.FEDERATED).train.reference
    assert ref.shape == (1, 16, 16)
    assert not any(t.shape == ref.shape or t.numel() == ref.numel() for t in up.params.values())
    # the federated model sees the normalized images; the local baseline the images as read
    assert app.data_for(Arm.LOCAL) is app.data
    (raw,) = app.data.test.batches([Planned(torch.arange(4))])
    (seen,) = app.data_for(Arm.FEDERATED).test.batches([Planned(torch.arange(4))])
    assert torch.allclose(seen.images, normalize_amplitude(raw.images, ref, 1.0))
    assert len(app.evaluate(init, (Split.TEST,), Arm.FEDERATED)) == 1


def test_a_short_run_end_to_end(tmp_path):
    import medfed

    job = copy.deepcopy(BASE) | {"output": str(tmp_path / "run"), "rounds": 2, "compare": ["local"]}
    records = medfed.run(job, progress=False).metrics
    aucs = [r for r in records if r["arm"] == "federated" and r["metric"] == "auc" and r["split"] == "test"
            and r["round"] == 2 and r["site"] in ("a", "b", "c")]
    assert len(aucs) == 3 and all(r["value"] is None or 0.0 <= r["value"] <= 1.0 for r in aucs)
    losses = [r["value"] for r in records if r["arm"] == "federated" and r["metric"] == "loss" and r["split"] == "train"
              and r["site"] in ("a", "b", "c")]
    assert len(losses) == 6 and all(v == v and v > 0 for v in losses)


def test_build_algorithm_takes_a_combiner_like_fedavg():
    job = _job()
    alg = build_algorithm(job.algorithm, build_model(job.model, job.task, 1), 3)
    assert isinstance(alg, HarmoFL) and alg.alpha == 0.05 and isinstance(alg.make_site_hook(), HarmoFLHook)


@pytest.mark.parametrize(
    "kw,expected",
    [({"topology": {"kind": "cyclic"}}, "topology.kind: harmofl is built for a server"),
     ({"generalization": {"method": "feddg", "share_amplitudes": True}}, "generalization: feddg shares"),
     ({"privacy": {"dp_sgd": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}}},
      "algorithm.name: 'harmofl' takes each gradient at weights perturbed"),
     ({"algorithm": {"name": "harmofl", "alpha": -1}}, "algorithm.alpha: must be >= 0"),
     ({"algorithm": {"name": "harmofl", "ratio": 0}}, "algorithm.ratio: must be > 0")],
)
def test_what_does_not_fit_is_refused_naming_the_field(kw, expected):
    with pytest.raises(ConfigError, match=expected):
        _job(**kw)


def test_volumes_are_refused():
    job = copy.deepcopy(BASE)
    job["data"] = {"source": "synthetic_segmentation", "dims": 3, "image_size": 16,
                   "sites": [{"name": s, "n_train": 4, "n_val": 2, "n_test": 2} for s in "abc"]}
    job["model"], job["task"] = {"name": "unet"}, {"kind": "segmentation", "num_classes": 2}
    job.pop("feature_shift")
    with pytest.raises(ConfigError, match="algorithm.name: harmofl normalizes the 2D amplitude spectra"):
        parse_job(job)


def test_the_second_pass_under_loss_scaling_gives_the_unscaled_gradient():
    from medfed.site.train import _perturbed_gradient

    x, y = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0.5, -1.0, 2.0])

    def grad_after(scaler):
        model = nn.Linear(4, 1, bias=False)
        with torch.no_grad():
            model.weight.copy_(torch.tensor([[0.3, -0.2, 0.1, 0.4]]))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = _Mse().loss(model(x), y)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        _perturbed_gradient(model, x, y, torch.ones(3, dtype=torch.bool), _Mse(), HarmoFLHook(0.5), opt, scaler)
        if scaler is not None:
            scaler.unscale_(opt)
        return model.weight.grad.clone(), model.weight.detach().clone()

    plain, w_plain = grad_after(None)
    scaled, w_scaled = grad_after(torch.amp.GradScaler("cpu", init_scale=1024.0))  # float16 autocast on the CPU
    assert torch.allclose(plain, scaled, rtol=1e-2, atol=1e-2)  # the direction g/||g|| ignores the scale
    assert torch.equal(w_plain, w_scaled) and torch.allclose(w_plain, torch.tensor([[0.3, -0.2, 0.1, 0.4]]))
