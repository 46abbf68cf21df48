"""The job's network: by name (a small CNN for CPU runs and MONAI networks for real work),
any class of ``monai.networks.nets`` or the user's factory (both built by
:mod:`medfed.networks`), with the job's frozen parameters fixed (:mod:`medfed.weights`).

Every network works on 2D images (B, C, H, W) and on 3D volumes (B, C, D, H, W), as
``spatial_dims`` says. Classifiers return logits of shape (B, K), K being 1 for a binary
task and the number of classes or labels otherwise. Segmenters return logits of shape
(B, K, *spatial), one per class (background included) per pixel or voxel; their input
sides must be multiples of 8 (three halvings), which a training patch or a resize step
should ensure.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import torch
from torch import nn

from medfed.config import (
    CLASSIFIERS,
    SEGMENTERS,
    BundleModelConfig,
    ModelConfig,
    ModelSettings,
    SegmentationTaskConfig,
    TaskConfig,
    reads_kspace,
)
from medfed.core.errors import ModelError
from medfed.weights import freeze

AnyTask = TaskConfig | SegmentationTaskConfig

# the network of a run driven from Python (``medfed.run(..., model=...)``): called with no
# arguments, once per model the run needs, in place of the job's ``model`` section
ModelFactory = Callable[[], nn.Module]

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_BN = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_MAXPOOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
_AVGPOOL = {2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}

# SegResNet's encoder: residual blocks per level (MONAI's default is (1, 2, 2, 4)). One
# block at each of the four levels keeps it cheap enough for CPU runs; the decoder has one
# block per level as in MONAI's default.
SEGRESNET_BLOCKS_DOWN = (1, 1, 1, 1)
SEGRESNET_BLOCKS_UP = (1, 1, 1)


class SmallCNN(nn.Module):
    """Three conv-norm-ReLU-maxpool blocks, a global average pool and a linear head; about
    25k parameters at width 16 in 2D. ``spatial_dims`` 3 uses the 3D layers; the module
    names (``features``, ``pool``, ``head``) and so the state-dict keys are the same.

    ``norm`` "batch" (default) uses batch norm, there on purpose: federated methods that
    treat BN layers specially (FedBN) must have something to act on. "group" uses
    ``GroupNorm(gcd(8, c), c)`` on c channels instead, which normalises each example on its
    own (sample-level DP-SGD needs that); its state dict has no running statistics.
    """

    def __init__(
        self, in_channels: int, out_features: int, width: int = 16, spatial_dims: int = 2,
        norm: str = "batch",
    ):
        super().__init__()
        if norm not in ("batch", "group"):
            raise ValueError(f"norm must be 'batch' or 'group', got {norm!r}")
        w = width
        conv, bn, maxpool = _CONV[spatial_dims], _BN[spatial_dims], _MAXPOOL[spatial_dims]

        def block(cin: int, cout: int) -> nn.Sequential:
            layers: list[nn.Module] = [conv(cin, cout, 3, padding=1, bias=False)]
            if norm == "group":
                # ReLU not in place: Opacus' backward hook on the norm layer (DP-SGD)
                # forbids modifying its output in place.
                layers += [nn.GroupNorm(math.gcd(8, cout), cout), nn.ReLU()]
            else:
                layers += [bn(cout), nn.ReLU(inplace=True)]
            return nn.Sequential(*layers, maxpool(2))

        self.features = nn.Sequential(block(in_channels, w), block(w, 2 * w), block(2 * w, 4 * w))
        self.pool = _AVGPOOL[spatial_dims](1)
        self.head = nn.Linear(4 * w, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


def is_segmentation(task: AnyTask) -> bool:
    return getattr(task, "kind", "classification") == "segmentation"


def num_outputs(task: AnyTask) -> int:
    """Logits per example (classification: 1 for binary, else the number of classes or
    labels) or per pixel (segmentation: the number of classes, background included)."""
    if is_segmentation(task):
        return task.num_classes
    if getattr(task, "kind", None) == "reconstruction":  # one image out, as one in
        return 1
    return 1 if task.labels == "binary" else task.num_classes  # type: ignore[union-attr]


def build_model(cfg: ModelSettings, task: AnyTask, in_channels: int, spatial_dims: int = 2) -> nn.Module:
    """An untrained network of ``cfg`` for ``in_channels``-channel images of ``spatial_dims``
    (2 or 3) spatial dimensions and ``task``, with the parameters under ``cfg.freeze``
    fixed (``requires_grad`` off; a prefix matching none is a ConfigError).

    A MONAI class or a factory is built by :func:`medfed.networks.build_network` (its
    arguments checked against its signature first); a MONAI Bundle's ``network_def`` by
    :func:`medfed.bundles.build_bundle_network`; a network by name by :func:`build_named`. The weights of ``cfg.init`` are not loaded here: the server loads
    them into its first model (:func:`medfed.weights.load_init`) and sends them."""
    if in_channels < 1:
        raise ModelError(f"model '{cfg.label}': input must have at least 1 channel, got {in_channels}")
    if spatial_dims not in (2, 3):
        raise ModelError(f"model '{cfg.label}': images must have 2 or 3 spatial dimensions, got {spatial_dims}")
    if isinstance(cfg, ModelConfig):
        model = build_named(cfg, task, in_channels, spatial_dims)
    elif isinstance(cfg, BundleModelConfig):
        from medfed.bundles import build_bundle_network

        model = build_bundle_network(cfg)  # the bundle fixes its own sizes
    else:
        from medfed.networks import build_network

        model = build_network(cfg, in_channels, num_outputs(task), spatial_dims)
    if cfg.freeze:
        freeze(model, cfg.freeze)
    if getattr(task, "kind", None) == "reconstruction" and task.residual and not reads_kspace(cfg):  # type: ignore[union-attr]
        make_residual(model)  # (varnet refines the measured k-space in each cascade: it is residual already)
    return model


RESIDUAL_SCALE = "residual_scale"


def make_residual(model: nn.Module) -> nn.Module:
    """Make ``model`` return ``input + residual_scale * network(input)``, with the learned
    scalar ``residual_scale`` starting at 0 (ReZero, Bachlechner et al. 2021): a
    reconstruction network then starts from the zero-filled image and learns the correction
    to it (``task.residual``). A forward hook and one parameter on the network itself, not
    a wrapper, so the state dict keeps the network's own names (``model.freeze`` names them
    as usual) plus ``residual_scale``."""
    model.register_parameter(RESIDUAL_SCALE, nn.Parameter(torch.zeros(())))
    model.register_forward_hook(_add_input)
    return model


def _add_input(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return args[0] + getattr(module, RESIDUAL_SCALE) * output


def build_user_model(factory: ModelFactory) -> nn.Module:
    """The network of a user's factory: a ModelError when it raises or returns something
    other than a ``torch.nn.Module``."""
    try:
        model = factory()
    except Exception as e:  # the user's code: any failure is theirs to fix, said in one line
        raise ModelError(f"model: the factory given to medfed.run raised {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"model: the factory given to medfed.run must return a torch.nn.Module, got {type(model).__name__}"
        )
    return model


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the state dict's entry names, shapes and dtypes (not the values): which
    network a run trained, when the job's ``model`` section does not say."""
    text = "\n".join(f"{k} {tuple(v.shape)} {v.dtype}" for k, v in model.state_dict().items())
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_model(cfg: ModelSettings) -> None:
    """What can be checked of ``cfg`` without data or building it: a MONAI class or a
    factory is found and its arguments checked against its signature (ConfigError naming
    the field); a bundle's config is found and holds a ``network_def``. Nothing to do for a
    network by name, which the job schema checks."""
    if isinstance(cfg, BundleModelConfig):
        from medfed.bundles import check_bundle

        check_bundle(cfg)
    elif not isinstance(cfg, ModelConfig):
        from medfed.networks import check_network

        check_network(cfg)


def build_named(cfg: ModelConfig, task: AnyTask, in_channels: int, spatial_dims: int = 2) -> nn.Module:
    """One of medfed's networks by name (no layer frozen).

    Segmenters, with w = ``cfg.width``:

    * ``unet``: MONAI ``UNet`` with channels (w, 2w, 4w, 8w), strides (2, 2, 2), one
      residual unit per level and batch norm (so FedBN has BN layers to keep local), or
      with ``cfg.norm`` "group" group norm with gcd(8, w, K) groups, K the number of
      classes: one group count for every norm layer, and the last upsampling block
      normalises K channels (so 2 groups for a binary task at w 16, 1 for K = 3);
    * ``segresnet``: MONAI ``SegResNet`` with ``init_filters`` w, encoder blocks
      :data:`SEGRESNET_BLOCKS_DOWN` and decoder blocks :data:`SEGRESNET_BLOCKS_UP`, and
      group norm with gcd(8, w) groups (MONAI's 8 groups when w is a multiple of 8).

    ``varnet`` (reconstruction only): MONAI's VariationalNetworkModel on the packed k-space
    input, not the zero-filled image (:func:`medfed.varnet.build_varnet`; ``in_channels``
    is not used).

    ``cfg.norm`` "group" swaps batch norm for group norm in ``small_cnn`` (see
    :class:`SmallCNN`) and ``unet``; ``segresnet`` always uses group norm. The MONAI
    classifiers have no such option: asking for it there raises ModelError.
    """
    kind = getattr(task, "kind", "classification")
    if cfg.name == "varnet":  # reads the packed k-space input (data/kspace_input.py), whatever in_channels says
        if kind != "reconstruction" or spatial_dims != 2:
            raise ModelError(f"model 'varnet' reconstructs 2D MRI from undersampled k-space; it needs task.kind: "
                             f"reconstruction, got a {spatial_dims}D {kind} task")
        from medfed.varnet import build_varnet

        return build_varnet(cfg.cascades, cfg.features, cfg.sens_features, cfg.width)
    seg = kind in ("segmentation", "reconstruction")  # image to image: the segmenters, K or 1 channels out
    if seg and cfg.name not in SEGMENTERS:
        raise ModelError(f"model '{cfg.name}' is a classifier; a {kind} task needs one of {list(SEGMENTERS)}")
    if not seg and cfg.name not in CLASSIFIERS:
        raise ModelError(f"model '{cfg.name}' segments; a classification task needs one of {list(CLASSIFIERS)}")
    if cfg.norm == "group" and cfg.name not in ("small_cnn", "unet", "segresnet"):
        raise ModelError(
            f"model.norm: 'group' is not available for model '{cfg.name}': only small_cnn and unet "
            "can switch to group norm; segresnet always uses it"
        )
    out = num_outputs(task)
    w = cfg.width
    if cfg.name == "small_cnn":
        return SmallCNN(in_channels, out, w, spatial_dims, cfg.norm)
    from monai.networks import nets  # imported here: MONAI costs ~1 s to import

    if cfg.name == "densenet121":
        return nets.DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out)
    if cfg.name == "resnet18":
        return nets.resnet18(spatial_dims=spatial_dims, n_input_channels=in_channels, num_classes=out)
    if cfg.name == "resnet50":
        return nets.resnet50(spatial_dims=spatial_dims, n_input_channels=in_channels, num_classes=out)
    if cfg.name == "unet":
        from monai.networks.layers import Norm

        return nets.UNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out,
            channels=(w, 2 * w, 4 * w, 8 * w),
            strides=(2, 2, 2),
            num_res_units=1,
            norm=Norm.BATCH if cfg.norm == "batch" else ("GROUP", {"num_groups": math.gcd(8, w, out)}),
        )
    if cfg.name == "segresnet":
        return nets.SegResNet(
            spatial_dims=spatial_dims,
            init_filters=w,
            in_channels=in_channels,
            out_channels=out,
            norm=("GROUP", {"num_groups": math.gcd(8, w)}),
            blocks_down=SEGRESNET_BLOCKS_DOWN,
            blocks_up=SEGRESNET_BLOCKS_UP,
        )
    raise ModelError(f"unknown model '{cfg.name}'")  # unreachable: the config schema checks it


def get_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the model's state dict (parameters and buffers)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


SEGMENTER_STRIDE = 8  # unet and segresnet halve the image three times


def check_input_size(cfg: ModelSettings, spatial_shape: tuple[int, ...], patch: tuple[int, ...] | None) -> None:
    """Refuse inputs a segmenter cannot take: it halves them three times, so every side it
    sees (the training patch, else the image) must be a multiple of 8. Raises ModelError."""
    if not isinstance(cfg, ModelConfig) or cfg.name not in ("unet", "segresnet"):
        return  # a MONAI class or a factory says itself what it cannot take, when it runs
    seen = tuple(patch) if patch is not None else tuple(spatial_shape)
    if any(int(s) % SEGMENTER_STRIDE for s in seen):
        what = "transforms.patch" if patch is not None else "the images"
        raise ModelError(
            f"model '{cfg.name}' halves its input three times: every side must be a multiple of "
            f"{SEGMENTER_STRIDE}, but {what} are {list(seen)}; add a crop_or_pad or resize step to "
            "transforms.preprocess, or train on patches (transforms.patch)"
        )
