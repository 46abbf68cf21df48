import pytest
import torch
from torch import nn

from medfed.algorithms.base import SiteHook
from medfed.config import ModelConfig, TaskConfig
from medfed.core.errors import ModelError
from medfed.core.types import TrainSettings
from medfed.data.base import ArraySplit
from medfed.models import build_model, get_params
from medfed.privacy.dpsgd import (
    SampleDP,
    dp_sgd,
    expected_batch_size,
    noise_step,
    poisson_batches,
    sample_rate,
    steps_per_epoch,
    steps_per_round,
)
from medfed.site.train import make_optimizer, train_local
from medfed.tasks.classification import ClassificationTask

TASK = TaskConfig(labels="binary")
CPU = torch.device("cpu")

# PyTorch's note on Opacus' backward hook of a first layer whose input needs no gradient
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


def _data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.rand(n, 1, 16, 16, generator=g) * 0.2
    x[y == 1, :, 6:10, 6:10] += 0.8
    return ArraySplit(x, y)


def _settings(**kw):
    base = dict(local_epochs=2, batch_size=16, lr=0.05, optimizer="sgd", momentum=0.9, weight_decay=0.0, seed=7)
    base.update(kw)
    return TrainSettings(**base)


def _cnn(norm="group", seed=0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(name="small_cnn", width=4, norm=norm), TASK, 1)


def _plain_sgd(model, lr=1.0):
    s = _settings(lr=lr, momentum=0.0)
    return make_optimizer(model, s)


def _is_plain(model, fresh):
    """No Opacus attribute or hook left: every module's attributes and hooks are a fresh
    model's, and no parameter carries extra attributes."""
    for (_, m), (_, f) in zip(model.named_modules(), fresh.named_modules()):
        if set(vars(m)) != set(vars(f)) or m._forward_hooks or m._backward_hooks:
            return False
        if m._is_full_backward_hook != f._is_full_backward_hook:
            return False
    return all(not vars(p) for p in model.parameters())


# ---- sampling and step counts


def test_sample_rate_and_step_counts():
    assert sample_rate(100, 10) == 0.1
    assert sample_rate(5, 10) == 1.0
    assert expected_batch_size(100, 10) == 10 and expected_batch_size(5, 10) == 5
    assert steps_per_epoch(100, 10) == 10
    assert steps_per_epoch(105, 10) == 10 and steps_per_epoch(106, 10) == 11  # rounded
    assert steps_per_epoch(5, 10) == 1  # at least one
    assert steps_per_round(100, 10, 3) == 30
    with pytest.raises(ValueError, match="batch_size"):
        sample_rate(10, 0)
    with pytest.raises(ValueError, match="local_epochs"):
        steps_per_round(10, 2, 0)


def test_poisson_batches_have_the_expected_size_and_valid_indices():
    n, b = 200, 20
    g = torch.Generator().manual_seed(0)
    drawn = [idx for _ in range(300) for idx in poisson_batches(n, b, g)]
    assert len(drawn) == 300 * steps_per_epoch(n, b)
    sizes = torch.tensor([len(i) for i in drawn], dtype=torch.float64)
    # Binomial(200, 0.1): mean 20, std 4.2; the mean of 3000 batches is within 0.1 of 20
    assert abs(sizes.mean().item() - b) < 0.3
    assert 3.5 < sizes.std().item() < 5.0  # Poisson sampling, not fixed-size batches
    for idx in drawn:
        assert idx.dtype == torch.int64
        assert len(set(idx.tolist())) == len(idx)
        assert all(0 <= i < n for i in idx.tolist())


def test_poisson_batches_are_deterministic_for_a_seed():
    def draw(seed):
        return [i.tolist() for i in poisson_batches(50, 8, torch.Generator().manual_seed(seed))]

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


def test_poisson_batches_take_everyone_at_rate_one_and_may_be_empty():
    g = torch.Generator().manual_seed(0)
    assert [i.tolist() for i in poisson_batches(4, 10, g)] == [[0, 1, 2, 3]]
    sizes = [len(i) for _ in range(200) for i in poisson_batches(3, 1, g)]  # q = 1/3
    assert 0 in sizes  # (2/3)^3 = 30% of the batches are empty


@pytest.mark.parametrize("field,kw", [
    ("noise_multiplier", dict(noise_multiplier=0.0, max_grad_norm=1.0)),
    ("noise_multiplier", dict(noise_multiplier=float("nan"), max_grad_norm=1.0)),
    ("max_grad_norm", dict(noise_multiplier=1.0, max_grad_norm=-1.0)),
    ("max_grad_norm", dict(noise_multiplier=1.0, max_grad_norm=float("inf"))),
])
def test_sample_dp_refuses_bad_values_naming_the_field(field, kw):
    with pytest.raises(ValueError, match=field):
        SampleDP(**kw)


def test_noise_generator_is_seeded_from_the_round_unless_secure():
    def first(dp, seed):
        return torch.randn(4, generator=dp.noise_generator(seed, CPU))

    dp = SampleDP(1.0, 1.0)
    assert torch.equal(first(dp, 5), first(dp, 5))
    assert not torch.equal(first(dp, 5), first(dp, 6))
    assert not torch.equal(first(dp, 5), torch.randn(4, generator=torch.Generator().manual_seed(5)))
    secure = SampleDP(1.0, 1.0, secure=True)
    assert not torch.equal(first(secure, 5), first(secure, 5))


# ---- one DP-SGD step on a linear model


def _one_step(model, dp, x, y, seed=0, private=True):
    """One SGD step (lr 1, no momentum) on the MSE of ``model`` over the whole batch
    (x, y); the parameters' change, flattened."""
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    model.train()
    opt = _plain_sgd(model)

    def step(o):
        o.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        o.step()

    if private:
        with dp_sgd(model, opt, dp, expected_batch_size=len(x), generator=dp.noise_generator(seed, CPU)) as o:
            step(o)
    else:
        step(opt)
    return torch.cat([p.detach().flatten() for p in model.parameters()]) - before


def test_per_example_clipping_bounds_the_step():
    torch.manual_seed(0)
    x, y = torch.randn(16, 20) * 10, torch.randn(16, 1) * 100  # large gradients
    model = nn.Linear(20, 1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    c = 1e-3
    dp_move = _one_step(model, SampleDP(noise_multiplier=1e-6, max_grad_norm=c), x, y)
    model.load_state_dict(state)
    plain_move = _one_step(model, None, x, y, private=False)
    assert 0 < dp_move.norm() <= c * (1 + 1e-4)  # the mean of 16 clipped gradients
    assert plain_move.norm() > 1e4 * c


def test_noise_std_is_z_c_over_the_expected_batch_size():
    torch.manual_seed(0)
    x, y = torch.randn(8, 400), torch.randn(8, 250)
    model = nn.Linear(400, 250)  # 100k weights
    state = {k: v.clone() for k, v in model.state_dict().items()}
    z, c, b = 2.0, 1.0, 8
    moves = []
    for seed in (1, 2):
        model.load_state_dict(state)
        moves.append(_one_step(model, SampleDP(noise_multiplier=z, max_grad_norm=c), x, y, seed=seed))
    # same data and start: the clipped gradient cancels; two independent noises remain
    noise_std = (moves[0] - moves[1]).std().item() / 2**0.5
    assert noise_std == pytest.approx(z * c / b, rel=0.1)


def test_a_noise_step_on_an_empty_batch_moves_by_noise_alone():
    model = nn.Linear(400, 250).train()
    before = model.weight.detach().clone()
    dp = SampleDP(noise_multiplier=1.0, max_grad_norm=2.0)
    with dp_sgd(model, _plain_sgd(model), dp, expected_batch_size=4, generator=dp.noise_generator(0, CPU)) as opt:
        noise_step(opt)
    moved = model.weight.detach() - before
    assert moved.mean().abs() < 0.01
    assert moved.std().item() == pytest.approx(1.0 * 2.0 / 4, rel=0.05)
    assert not any(vars(p) for p in model.parameters())


def test_secure_noise_comes_from_the_cryptographic_generator_with_the_right_std(monkeypatch):
    """A deployment's DP-SGD noise is drawn by privacy/noise.SecureNoise, never by
    PyTorch's generator (Opacus' own noise function fails here if called), with std z C / B."""
    import opacus.optimizers.optimizer as opacus_optimizer

    from medfed.privacy import noise

    def refused(*args, **kwargs):
        raise AssertionError("Opacus' PyTorch-generator noise was used")

    monkeypatch.setattr(opacus_optimizer, "_generate_noise", refused)
    drawn = []
    normal = noise.SecureNoise.normal
    monkeypatch.setattr(noise.SecureNoise, "normal", lambda self, shape, dtype: drawn.append(shape) or normal(
        self, shape, dtype))
    model = nn.Linear(400, 250).train()
    before = model.weight.detach().clone()
    dp = SampleDP(noise_multiplier=1.0, max_grad_norm=2.0, secure=True)
    with dp_sgd(model, _plain_sgd(model), dp, expected_batch_size=4, generator=dp.noise_generator(0, CPU)) as opt:
        noise_step(opt)
    moved = model.weight.detach() - before
    assert (4, 250, 400) in drawn  # four draws per value, summed and halved
    assert moved.mean().abs() < 0.01
    assert moved.std().item() == pytest.approx(1.0 * 2.0 / 4, rel=0.05)
    assert not any(vars(p) for p in model.parameters())


# ---- DP-SGD in the local training loop


def test_train_local_with_dp_sgd_trains_reproducibly_and_leaves_a_plain_model():
    data, task, dp = _data(), ClassificationTask(TASK), SampleDP(noise_multiplier=0.5, max_grad_norm=1.0)
    settings = _settings(local_epochs=1)
    results = []
    for _ in range(2):
        model = _cnn()
        start = get_params(model)
        stats = train_local(model, data, task, settings, SiteHook(), CPU, private=dp)
        results.append((get_params(model), stats))
    (p1, s1), (p2, s2) = results
    assert s1 == s2 and s1.num_steps == steps_per_epoch(48, 16)
    assert list(p1) == list(start)  # state-dict keys unchanged
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    assert any(not torch.equal(p1[k], start[k]) for k in p1)
    other = _cnn()
    train_local(other, data, task, _settings(local_epochs=1, seed=8), SiteHook(), CPU, private=dp)
    assert any(not torch.equal(p1[k], v) for k, v in get_params(other).items())

    # what is left is a plain module: plain training on it matches a never-wrapped copy
    assert _is_plain(model, _cnn())
    twin = _cnn()
    twin.load_state_dict(model.state_dict())
    for m in (model, twin):
        train_local(m, data, task, _settings(local_epochs=1), SiteHook(), CPU)
    assert all(torch.equal(a, b) for a, b in zip(get_params(model).values(), get_params(twin).values()))


def test_empty_batches_take_noise_steps():
    data, task = _data(n=2), ClassificationTask(TASK)  # q = 1/2: a quarter of the batches are empty
    model = _cnn()
    stats = train_local(model, data, task, _settings(batch_size=1, local_epochs=10), SiteHook(), CPU,
                        private=SampleDP(1.0, 1.0))
    assert stats.num_steps == 20
    assert _is_plain(model, _cnn())


def test_after_backward_hook_acts_on_the_private_gradient():
    shift = 0.25

    class Correction(SiteHook):  # a SCAFFOLD-like gradient correction
        def on_after_backward(self, model):
            for p in model.parameters():
                p.grad.add_(shift)

    model = _cnn()
    start = get_params(model)
    dp = SampleDP(noise_multiplier=1e-6, max_grad_norm=1e-6)  # the private gradient is ~0
    settings = _settings(local_epochs=1, batch_size=48, lr=1.0, momentum=0.0)
    train_local(model, _data(), ClassificationTask(TASK), settings, Correction(), CPU, private=dp)
    moved = get_params(model)["head.weight"] - start["head.weight"]
    assert torch.allclose(moved, torch.full_like(moved, -shift), atol=1e-4)


def test_batch_norm_is_refused_naming_model_norm():
    model = _cnn(norm="batch")
    with pytest.raises(ModelError, match=r"model\.norm: group"):
        train_local(model, _data(), ClassificationTask(TASK), _settings(), SiteHook(), CPU, private=SampleDP(1.0, 1.0))
    assert _is_plain(model, _cnn(norm="batch"))


def test_a_hook_with_an_extra_loss_is_refused():
    class Prox(SiteHook):
        def extra_loss(self, model):
            return sum((p**2).sum() for p in model.parameters())

    model = _cnn()
    start = get_params(model)
    with pytest.raises(ValueError, match="extra loss"):
        train_local(model, _data(), ClassificationTask(TASK), _settings(), Prox(), CPU, private=SampleDP(1.0, 1.0))
    assert all(torch.equal(v, start[k]) for k, v in get_params(model).items())  # no step taken
    assert _is_plain(model, _cnn())


def test_a_model_with_in_place_outputs_is_refused_and_left_plain():
    from medfed.config import SegmentationTaskConfig

    seg = SegmentationTaskConfig(kind="segmentation", num_classes=2)
    model = build_model(ModelConfig(name="segresnet", width=4), seg, 1).train()  # in-place ReLU and residual add
    dp = SampleDP(1.0, 1.0)
    with pytest.raises(ModelError, match="in place"):
        with dp_sgd(model, _plain_sgd(model), dp, expected_batch_size=2, generator=dp.noise_generator(0, CPU)):
            model(torch.rand(2, 1, 16, 16))
    assert all(not vars(p) for p in model.parameters())
    assert not any(m._forward_hooks or m._backward_hooks or "activations" in vars(m) for m in model.modules())
