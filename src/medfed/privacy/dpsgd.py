"""Sample-level differential privacy at a site: DP-SGD (Abadi et al., CCS 2016) with Opacus.

At every step of the local training (site/train.py) each example's gradient is clipped to
L2 norm ``max_grad_norm`` (C), the clipped gradients are summed, Gaussian noise of std
``noise_multiplier * C`` is added to every coordinate and the result is divided by the
expected batch size. Batches are Poisson-sampled: each example joins each batch on its own
with probability ``q = sample_rate(n, batch_size)``, which is what the RDP accountant
(privacy/accounting.py) assumes when it composes ``steps_per_round`` such steps per round.

What it protects: any one training example (patient) of a site, against everything the
site sends. It needs a model whose per-example gradients exist — no batch norm
(``model.norm: group``), no in-place change of a layer's output — and a loss that is the
batch mean of per-example terms. (Segmentation's Dice computed over the whole batch is
not: one image's term then depends on the others, and the bound on each example's
influence no longer holds.)

Opacus (~5 s to import) is imported only where DP-SGD runs.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from medfed.core.errors import ModelError

if TYPE_CHECKING:
    from opacus.optimizers import DPOptimizer


@dataclass(frozen=True)
class SampleDP:
    """DP-SGD settings of one site's local training.

    ``noise_multiplier`` (z > 0): noise std over the clipping bound. ``max_grad_norm``
    (C > 0): the L2 bound on each example's gradient, over all trained parameters
    together. ``secure`` (default False): False seeds the noise from the round's training
    seed, so a simulation is reproducible; True (deployments) draws it from a
    cryptographically secure generator (privacy/noise.py: ChaCha20 under fresh OS keys),
    each value the sum of four draws halved, as Opacus' ``secure_mode`` does against
    floating-point attacks (:func:`secure_dp_optimizer`).
    """

    noise_multiplier: float
    max_grad_norm: float
    secure: bool = False

    def __post_init__(self) -> None:
        for name in ("noise_multiplier", "max_grad_norm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                math.isfinite(value) and value > 0
            ):
                raise ValueError(f"{name}: must be a finite number > 0, got {value!r}")
        if not isinstance(self.secure, bool):
            raise ValueError(f"secure: must be true or false, got {self.secure!r}")

    def noise_generator(self, seed: int, device: torch.device) -> torch.Generator:
        """The generator of the Gaussian noise, on ``device`` (where the parameters are).

        Not secure: seeded from ``seed`` (the round's training seed) through a hash, so the
        noise stream differs from the batch-sampling stream seeded with ``seed`` itself.
        Secure: seeded with 63 bits from the operating system (then not used for the
        noise, which :func:`secure_dp_optimizer` draws).
        """
        if self.secure:
            noise_seed = secrets.randbits(63)
        else:
            digest = hashlib.sha256(f"medfed/dpsgd-noise/{int(seed)}".encode()).digest()
            noise_seed = int.from_bytes(digest[:8], "big") >> 1
        return torch.Generator(device=device).manual_seed(noise_seed)


def _check_sizes(n: int, batch_size: int) -> None:
    if n < 1:
        raise ValueError(f"n: DP-SGD needs at least one training example, got {n}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")


def sample_rate(n: int, batch_size: int) -> float:
    """Probability q in (0, 1] that an example joins a batch: ``min(1, batch_size / n)``."""
    _check_sizes(n, batch_size)
    return min(1.0, batch_size / n)


def expected_batch_size(n: int, batch_size: int) -> int:
    """The mean Poisson batch size, ``q * n`` = ``min(batch_size, n)`` examples: what the
    clipped, noised gradient sum is divided by (not the drawn batch's size, which would
    reveal who is in it)."""
    _check_sizes(n, batch_size)
    return min(batch_size, n)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Poisson batches per epoch: ``max(1, round(n / batch_size))``.

    Rounding (rather than Opacus' ``floor(1 / q)``) makes the expected number of examples
    an epoch sees, ``steps * q * n``, the closest to ``n`` of any whole number of steps,
    so an epoch is one pass over the data on average, as in non-private training.
    """
    _check_sizes(n, batch_size)
    return max(1, round(n / batch_size))


def steps_per_round(n: int, batch_size: int, local_epochs: int) -> int:
    """DP-SGD steps of one round of local training (each one a sampled Gaussian
    mechanism for the accountant): ``local_epochs * steps_per_epoch(n, batch_size)``."""
    if local_epochs < 1:
        raise ValueError(f"local_epochs: must be >= 1, got {local_epochs}")
    return local_epochs * steps_per_epoch(n, batch_size)


def poisson_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """:func:`steps_per_epoch` batches of indices into ``range(n)`` (int64, ascending, no
    repeats), each holding every example independently with probability
    :func:`sample_rate` (Poisson sampling, as the RDP accountant assumes).

    A batch may be empty, with probability ``(1 - q) ** n``; it is yielded all the same,
    as a tensor of shape (0,): the step still happens (and adds noise), or the accountant
    would be counting a step that was never taken.
    """
    q = sample_rate(n, batch_size)
    for _ in range(steps_per_epoch(n, batch_size)):
        # torch.rand is in [0, 1), so q = 1 takes every example
        yield torch.nonzero(torch.rand(n, generator=generator) < q).flatten()


def check_model(model: nn.Module) -> None:
    """Raise ModelError when ``model`` (in training mode) cannot give per-example
    gradients: Opacus' ``ModuleValidator`` findings, plus any batch-norm layer, trained or
    frozen (in training mode it normalises with its batch's statistics either way)."""
    from opacus.validators import ModuleValidator

    found = [str(e) for e in ModuleValidator.validate(model, strict=False)]
    problems = list(dict.fromkeys(found))  # Opacus repeats one message per offending layer
    batch_norms = [
        name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    if batch_norms:
        shown = ", ".join(batch_norms[:4]) + (f" and {len(batch_norms) - 4} more" if len(batch_norms) > 4 else "")
        problems.insert(0, (
            f"batch norm ({shown}) mixes the examples of a batch, so no example has a gradient "
            "of its own: set `model.norm: group` (small_cnn and unet)"
        ))
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise ModelError(f"the model cannot train with sample-level DP-SGD (dp_sgd):\n{listed}")


@contextmanager
def dp_sgd(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    dp: SampleDP,
    *,
    expected_batch_size: int,
    generator: torch.Generator,
    after_noise: Callable[[], None] | None = None,
) -> Iterator["DPOptimizer"]:
    """Train ``model`` with DP-SGD inside the block: yields Opacus' ``DPOptimizer`` over
    ``optimizer`` (from site/train.py's ``make_optimizer``); use it as the optimizer.

    ``model`` must be in training mode and pass :func:`check_model` (else ModelError).
    Its parameters gain per-example gradients (``grad_sample``) through Opacus'
    ``GradSampleModule`` hooks; the model is still called directly. The task loss must be
    the batch mean of per-example losses (Opacus' ``loss_reduction="mean"``): it divides
    by ``expected_batch_size`` examples (see :func:`expected_batch_size`). Noise comes
    from ``generator`` (see :meth:`SampleDP.noise_generator`), on the parameters' device.

    ``after_noise`` runs at every step after clipping and noising, before the parameters
    move (Opacus' step hook): a gradient correction (SCAFFOLD) made there acts on the
    private gradient instead of being overwritten by it.

    A model that modifies a layer's output in place fails at its first forward pass
    (ModelError): Opacus' hooks forbid it.

    On exit, even on error, the hooks and every attribute Opacus added to the parameters
    and layers are removed: the model is a plain ``nn.Module`` again, its state-dict keys
    unchanged.
    """
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    check_model(model)
    # PyTorch marks a module that ever had a full backward hook (Opacus adds them); restored
    # on exit, or the module would refuse a legacy backward hook afterwards
    marks = {m: m._is_full_backward_hook for m in model.modules()}
    gsm = None
    try:
        try:
            gsm = GradSampleModule(model)  # strict: Opacus refuses trained layers with buffers
        except NotImplementedError as e:
            raise ModelError(f"the model cannot train with sample-level DP-SGD (dp_sgd): {e}") from e
        dp_optimizer = (secure_dp_optimizer() if dp.secure else DPOptimizer)(
            optimizer,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            expected_batch_size=expected_batch_size,
            generator=generator,
        )
        if after_noise is not None:
            dp_optimizer.attach_step_hook(lambda _: after_noise())
        with warnings.catch_warnings():
            # the first layer's input needs no gradient, so torch says its full backward hook
            # sees outputs only: expected, and Opacus needs no more there
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            yield dp_optimizer
    except RuntimeError as e:
        if "BackwardHookFunction" in str(e) and "inplace" in str(e):
            raise ModelError(
                "the model cannot train with sample-level DP-SGD (dp_sgd): it modifies a layer's "
                "output in place (MONAI SegResNet's ReLU and residual add do), which Opacus' "
                "per-example gradient hooks forbid; use small_cnn or unet with `model.norm: group`"
            ) from e
        raise
    finally:
        if gsm is not None:
            gsm.remove_hooks()
        _strip(model)
        for m, mark in marks.items():
            m._is_full_backward_hook = mark


def secure_dp_optimizer() -> type:
    """Opacus' ``DPOptimizer`` with its Gaussian noise from a cryptographically secure
    generator (:class:`~medfed.privacy.noise.SecureNoise`) instead of PyTorch's: each noise
    value is the sum of four N(0, 1) draws halved (still N(0, 1)), Opacus' ``secure_mode``
    construction against floating-point attacks, times ``noise_multiplier *
    max_grad_norm``. Clipping, accumulation and scaling stay Opacus'."""
    from opacus.optimizers import DPOptimizer
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    from medfed.privacy.noise import SecureNoise

    class SecureNoiseDPOptimizer(DPOptimizer):
        def add_noise(self) -> None:
            source, std = SecureNoise(), self.noise_multiplier * self.max_grad_norm
            for p in self.params:
                _check_processed_flag(p.summed_grad)
                g = p.summed_grad
                z = source.normal((4, *g.shape), torch.float64).sum(0).mul_(0.5 * std)
                p.grad = (g + z.to(device=g.device, dtype=g.dtype)).view_as(p)
                _mark_as_processed(p.summed_grad)

    return SecureNoiseDPOptimizer


# What Opacus attaches to parameters (its GradSampleModule and DPOptimizer) and to layers
# (activations kept by a forward pass whose backward never ran)
_PARAM_ATTRS = ("grad_sample", "_forward_counter", "_current_grad_sample", "_norm_sample", "summed_grad")
_MODULE_ATTRS = ("activations", "max_batch_len")


def _strip(model: nn.Module) -> None:
    for p in model.parameters():
        for attr in _PARAM_ATTRS:
            if hasattr(p, attr):
                delattr(p, attr)
    for m in model.modules():
        for attr in _MODULE_ATTRS:
            if attr in m.__dict__:
                delattr(m, attr)


def noise_step(optimizer: "DPOptimizer") -> None:
    """One DP-SGD step on an empty Poisson batch: no forward pass; the clipped sum is zero
    so the parameters move by the noise alone (and by momentum and weight decay).

    Opacus' clipping takes a batch of zero per-example gradients (it has a branch for
    the empty batch its own Poisson data loader can draw), so each parameter is given a
    (0, *shape) ``grad_sample`` and the usual ``step`` adds and scales the noise.
    """
    optimizer.zero_grad(set_to_none=True)
    for p in optimizer.params:
        p.grad_sample = p.new_zeros((0, *p.shape))
    optimizer.step()
