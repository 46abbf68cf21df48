"""The job's ``model`` and ``task`` sections: the network (one of medfed's by name, any
class of ``monai.networks.nets``, or the user's own factory), where its weights start, which
stay fixed, and the task (classification or segmentation) that fixes its outputs, loss and
metrics.

Only names and settings are checked here (no torch, no MONAI: loading a job stays fast).
Whether a MONAI class or a factory takes the job's arguments is checked against its
signature by :func:`medfed.networks.check_network` when the job is validated and before a
run starts; the init file's keys and shapes when the run builds its first model
(:mod:`medfed.weights`).
"""

# No `from __future__ import annotations`: pydantic would parse every field type from a string
# at import, which lengthens start-up (see the package docstring).

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)
from typing_extensions import TypeAliasType

from medfed.core.schema import Count, Frozen, Real
from medfed.config.reconstruction import ReconstructionTaskConfig

CLASSIFIERS = ("small_cnn", "densenet121", "resnet18", "resnet50")
SEGMENTERS = ("unet", "segresnet")
INIT_SUFFIXES = (".safetensors", ".pt", ".pth")

# A value of ``model.args``: what YAML and JSON can hold (a list stands for a tuple).
ArgValue = TypeAliasType(
    "ArgValue", Union[None, bool, int, float, str, list["ArgValue"], dict[str, "ArgValue"]]  # type: ignore[misc]
)

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_IMPORT_PATH = re.compile(rf"^{_IDENT}(\.{_IDENT})*:{_IDENT}(\.{_IDENT})*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _sha256_or_none(v: str | None) -> str | None:
    """A field validator: None, or a SHA-256 in lowercase hex."""
    if v is not None and not _SHA256.match(v):
        raise ValueError(f"must be 64 lowercase hex digits (a SHA-256), got {v!r}")
    return v


class _Weights(Frozen):
    """What every ``model`` form shares: where the weights start and which stay fixed.

    ``init``: a weights file (``.safetensors``, or a PyTorch checkpoint ``.pt``/``.pth``
    read with ``torch.load(weights_only=True)``: a state dict, or a dict holding one under
    ``state_dict`` or ``model``) that round 1 starts from, at every site and in every arm;
    a relative path is read against the job file's folder. In a deployment the server reads
    it and sends the weights: sites need not have it. ``init_sha256``: the file's SHA-256,
    filled in when the job is loaded (give it to pin the file: a file with another content
    is then refused); it, not the path, goes into the job hash and ``run.json``.
    ``init_keys``: ``strict`` (default) needs every entry of the model in the file with its
    shape and nothing else; ``partial`` loads the entries that match in name and shape and
    keeps the others as built (a new head on a pretrained encoder), with a table of what did
    not match in run.log. ``freeze``: parameter-name prefixes (``encoder.`` or
    ``features.0``) whose parameters no site trains, in any arm; a prefix matching no
    parameter is an error. (A prefix is matched as text: ``layer1`` also matches
    ``layer10.weight``; ``layer1.`` does not.)
    """

    init: Path | None = None
    init_sha256: str | None = None
    init_keys: Literal["strict", "partial"] = "strict"
    freeze: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(default_factory=list, max_length=1000)

    @field_validator("init")
    @classmethod
    def _init_format(cls, v: Path | None) -> Path | None:
        if v is not None and v.suffix.lower() not in INIT_SUFFIXES and v.name != "<site-local>":
            raise ValueError(
                f"must be a .safetensors file or a PyTorch checkpoint (.pt, .pth), got '{v}'"
            )
        return v

    _init_sha_format = field_validator("init_sha256")(_sha256_or_none)

    @model_validator(mode="after")
    def _init_given(self) -> "_Weights":
        if self.init is None and self.init_sha256 is not None:
            raise ValueError("init_sha256 pins the init file, but init is not set: give model.init too")
        return self


# Each form's own fields sit in a base listed after _Weights, so that they come first in a
# dumped job (job.yaml reads ``name: unet`` before ``init: null``).


VARNET_FIELDS = ("cascades", "features", "sens_features")  # model fields for varnet alone
# six feature counts of a MONAI ComplexUnet (its BasicUNet: five levels and the last layer)
UNetFeatures = Annotated[list[Annotated[Count, Field(ge=1, le=1024)]], Field(min_length=6, max_length=6)]


class _ByName(Frozen):
    name: Literal["small_cnn", "densenet121", "resnet18", "resnet50", "unet", "segresnet", "varnet"]
    width: Count = Field(16, ge=1, le=512)
    norm: Literal["batch", "group"] = "batch"
    cascades: Count | None = Field(None, ge=1, le=32)
    features: UNetFeatures | None = None
    sens_features: UNetFeatures | None = None

    @model_validator(mode="after")
    def _varnet_fields(self) -> "_ByName":
        if self.name != "varnet":
            for field in VARNET_FIELDS:
                if getattr(self, field) is not None:
                    raise ValueError(f"model.{field} is a setting of model 'varnet'; leave it out for '{self.name}'")
        elif self.norm != "batch":
            raise ValueError("model.norm: varnet uses MONAI's instance norm; leave norm out")
        return self

    @property
    def label(self) -> str:
        """How messages and summaries name the network."""
        return self.name


class ModelConfig(_Weights, _ByName):
    """A network by name, 2D or 3D as the data is. Classifiers: ``small_cnn`` (for CPU
    runs), MONAI ``densenet121``, ``resnet18``, ``resnet50``. Segmenters: MONAI ``unet``
    and ``segresnet``.

    Input channels and output size come from the data and the task; ``width`` sets the
    channel count of the first layer of ``small_cnn``, ``unet`` (then doubled at each of
    its levels) and ``segresnet``. ``norm`` picks the normalization layers of ``small_cnn``
    and ``unet``: ``batch`` (default) or ``group`` (needed by sample-level DP-SGD, whose
    per-example gradients batch norm would mix; segresnet always uses group norm).

    ``varnet`` (reconstruction only): MONAI's end-to-end ``VariationalNetworkModel``, which
    reads the undersampled k-space and its mask, not the zero-filled image
    (:mod:`medfed.varnet`): ``cascades`` data-consistency and refinement blocks (default 4),
    each refining with a MONAI ``ComplexUnet`` of ``features`` (six counts, default
    (w, w, 2w, 4w, 8w, w)), and a ``CoilSensitivityModel`` whose ComplexUnet has
    ``sens_features`` (default: ``features``). These three fields are for varnet alone.
    Then the fields every form shares (:class:`_Weights`: ``init``, ``init_keys``,
    ``freeze``).
    """


class _Monai(Frozen):
    monai: Annotated[str, Field(min_length=1, max_length=128)]
    args: dict[str, ArgValue] = Field(default_factory=dict)

    @field_validator("monai")
    @classmethod
    def _identifier(cls, v: str) -> str:
        if not re.fullmatch(_IDENT, v):
            raise ValueError(f"must be a class name of monai.networks.nets such as SwinUNETR, got {v!r}")
        return v

    @property
    def label(self) -> str:
        return f"monai.networks.nets.{self.monai}"


class MonaiModelConfig(_Weights, _Monai):
    """Any network class of ``monai.networks.nets`` (``SwinUNETR``, ``DynUNet``,
    ``DenseNet``...), built with ``args``. medfed fills the class's spatial dimensions
    (``spatial_dims``, or ``dimensions``), input channels (``in_channels``,
    ``n_input_channels``...) and outputs (``out_channels``, ``num_classes``...) from the data
    and the task, unless ``args`` sets them; every other required argument (e.g.
    ``img_size`` of UNETR) comes from ``args``. A YAML list stands for a tuple."""


class _Import(Frozen):
    factory: str = Field(alias="import", min_length=3, max_length=256)
    args: dict[str, ArgValue] = Field(default_factory=dict)

    @field_validator("factory")
    @classmethod
    def _import_path(cls, v: str) -> str:
        if not _IMPORT_PATH.match(v):
            raise ValueError(f"must be 'package.module:factory' (a module path, a colon, a name in it), got {v!r}")
        return v

    @property
    def label(self) -> str:
        return self.factory


class ImportModelConfig(_Weights, _Import):
    """A network from the user's own code: ``import: "package.module:factory"`` names a
    class or function that returns a ``torch.nn.Module``, called with ``args``, plus the
    sizes (as for MONAI classes) when its signature takes them. The package must be
    installed, or on ``PYTHONPATH``, wherever the run happens (the server and every site):
    medfed never sends code."""

    # written ``import:`` (a Python keyword, so the field has another name), read and dumped so
    model_config = ConfigDict(serialize_by_alias=True)


class _Bundle(Frozen):
    bundle: Path
    bundle_sha256: str | None = None
    config: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    bundle_transforms: bool = False

    _bundle_sha_format = field_validator("bundle_sha256")(_sha256_or_none)

    @field_validator("config")
    @classmethod
    def _config_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+\.(json|yaml|yml)", v):
            raise ValueError(f"must be a file name in the bundle's configs folder such as train.json, got {v!r}")
        return v

    @property
    def label(self) -> str:
        return f"MONAI Bundle '{self.bundle.name}'"


class BundleModelConfig(_Weights, _Bundle):
    """A MONAI Bundle: ``bundle`` is its folder (``configs/metadata.json`` and a train or
    inference config), read with ``monai.bundle.ConfigParser``. Its ``network_def`` is the
    network, taken from ``configs/<config>`` when ``config`` names a file, else from
    ``configs/train.json`` (or ``.yaml``), else ``configs/inference.json``.

    ``bundle_sha256``: the SHA-256 of the bundle's code-bearing files (``configs/`` and
    ``scripts/``; not its weights), filled in when the job is loaded; give it to pin the
    bundle. It, not the path, goes into the job hash; in a deployment every site checks its
    own copy of the bundle against it. A bundle runs the code its configs name, so a
    deployed site runs only the bundle its operator gives (``medfed site --bundle``): the
    server never sends one.

    ``bundle_transforms``: read every example through the bundle's deterministic
    preprocessing (``validate#preprocessing`` of the config, else ``preprocessing`` of
    ``configs/inference.json``) in place of ``transforms.preprocess``; its loading steps
    (``LoadImage``, ``EnsureChannelFirst``) are left out, medfed's readers having read the
    files. With ``train.engine: bundle`` the bundle's own trainer trains (see
    :class:`~medfed.config.job.TrainConfig`)."""


def model_kind(v: Any) -> str:
    """The form of a ``model`` section: ``named`` (``name:``), ``monai``, ``import`` or
    ``bundle``."""
    if isinstance(v, dict):
        for kind in ("monai", "import", "bundle"):
            if kind in v:
                return kind
        return "named"
    return {MonaiModelConfig: "monai", ImportModelConfig: "import", BundleModelConfig: "bundle"}.get(type(v), "named")


AnyModelConfig = Annotated[
    Union[
        Annotated[ModelConfig, Tag("named")],
        Annotated[MonaiModelConfig, Tag("monai")],
        Annotated[ImportModelConfig, Tag("import")],
        Annotated[BundleModelConfig, Tag("bundle")],
    ],
    Discriminator(model_kind),
]
"""The job's ``model``: a network by name (:class:`ModelConfig`), a MONAI class
(:class:`MonaiModelConfig`), the user's factory (:class:`ImportModelConfig`) or a MONAI
Bundle (:class:`BundleModelConfig`)."""

ModelSettings = Union[ModelConfig, MonaiModelConfig, ImportModelConfig, BundleModelConfig]
"""Any of the four, as code that takes a validated ``model`` section types it."""


def hashed_model(dumped: dict[str, Any]) -> dict[str, Any]:
    """The part of a dumped ``model`` section that goes into the job hash: the init file's
    and the bundle's content (their SHA-256), not their paths; the new fields left out when
    unused, so that a job written before they existed keeps its hash."""
    out = {k: v for k, v in dumped.items() if k not in ("init", "bundle")}
    if dumped.get("init") is None:
        out.pop("init_sha256", None)
        out.pop("init_keys", None)
    if not dumped.get("freeze"):
        out.pop("freeze", None)
    for field in VARNET_FIELDS:
        if dumped.get(field, 0) is None:
            out.pop(field)
    return out


class ImportLossConfig(_Import):
    """The user's own loss: ``import: "package.module:factory"`` names a class or function
    that, called with ``args``, returns a callable ``(logits, target) -> scalar tensor``
    (targets as medfed holds them: class indices (B,), 0/1 rows (B, K) or masks (B, *sp)).
    Imported where the run happens, like a model factory: medfed never sends code."""

    model_config = ConfigDict(serialize_by_alias=True)


def _loss_kind(v: Any) -> str:
    return "import" if isinstance(v, (dict, ImportLossConfig)) else "named"


SEGMENTATION_LOSSES = ("dice_ce", "dice", "dice_focal", "focal", "tversky")
ClassificationLoss = Annotated[
    Union[Annotated[Literal["cross_entropy"], Tag("named")], Annotated[ImportLossConfig, Tag("import")]],
    Discriminator(_loss_kind),
]
SegmentationLoss = Annotated[
    Union[
        Annotated[Literal["dice_ce", "dice", "dice_focal", "focal", "tversky"], Tag("named")],
        Annotated[ImportLossConfig, Tag("import")],
    ],
    Discriminator(_loss_kind),
]


class TaskConfig(Frozen):
    """Classification. ``binary`` uses one logit; ``multiclass`` one logit per class with
    softmax; ``multilabel`` one independent logit per label. ``num_classes`` is the number
    of classes (2 for binary) or of labels. ``monitor`` picks the best model on val.

    ``loss``: ``cross_entropy`` (binary cross-entropy on the one logit or on each label,
    softmax cross-entropy for multi-class), or ``{import: ...}`` (:class:`ImportLossConfig`).
    ``class_weights``: one weight > 0 per class (per label for multi-label) for
    cross-entropy: a weighted mean over the batch, each example weighted by its class
    (binary, multi-class), or each label's term by its weight (multi-label)."""

    kind: Literal["classification"] = "classification"
    labels: Literal["binary", "multiclass", "multilabel"]
    num_classes: Count = Field(2, ge=2, le=1000)
    monitor: Literal["auc", "accuracy"] = "auc"
    loss: ClassificationLoss = "cross_entropy"
    class_weights: list[Annotated[Real, Field(gt=0, le=1e6)]] | None = Field(None, max_length=1000)

    @model_validator(mode="after")
    def _binary_has_two(self) -> "TaskConfig":
        if self.labels == "binary" and self.num_classes != 2:
            raise ValueError(f"num_classes must be 2 for binary labels, got {self.num_classes}")
        if self.class_weights is not None:
            if len(self.class_weights) != self.num_classes:
                raise ValueError(
                    f"class_weights: one weight per class ({self.num_classes}), got {len(self.class_weights)}"
                )
            if not isinstance(self.loss, str):
                raise ValueError("class_weights: weights cross_entropy; an imported loss takes its own in loss.args")
        return self


class SegmentationTaskConfig(Frozen):
    """Segmentation, 2D or 3D: one softmax logit per class per pixel, class 0 the
    background. ``loss``: one of MONAI's on softmax outputs, the background left out of
    the Dice terms and the Dice taken over the whole batch: ``dice_ce`` (Dice +
    cross-entropy, the default), ``dice``, ``dice_focal``, ``focal`` (all classes),
    ``tversky``; or ``{import: ...}`` (:class:`ImportLossConfig`). Metrics: Dice per class and their mean over
    the foreground classes (``dice``), and on the test split the 95% Hausdorff distance
    (``hd95``, in mm when the data's spacing is known, else in pixels or voxels; costly,
    ``hd95: false`` turns it off).
    ``save_predictions``: how many predicted test masks per site to keep from the final
    federated model (PNG overlays shown in the report for 2D, NIfTI files for 3D)."""

    kind: Literal["segmentation"]
    num_classes: Count = Field(2, ge=2, le=255)
    monitor: Literal["dice"] = "dice"
    hd95: bool = True
    save_predictions: Count = Field(4, ge=0, le=1000)
    loss: SegmentationLoss = "dice_ce"


def hashed_task(dumped: dict[str, Any]) -> dict[str, Any]:
    """The part of a dumped ``task`` section that goes into the job hash: ``loss`` and
    ``class_weights`` left out at their defaults, so a job written before they existed
    keeps its hash."""
    default = {"segmentation": "dice_ce", "reconstruction": "l1"}.get(dumped.get("kind"), "cross_entropy")
    out = dict(dumped)
    if out.get("loss") == default:
        out.pop("loss")
    if out.get("class_weights", 0) is None:
        out.pop("class_weights")
    return out


def task_kind(v: Any) -> str:
    if isinstance(v, dict):
        return v.get("kind", "classification")
    return getattr(v, "kind", "classification")


AnyTaskConfig = Annotated[
    Union[
        Annotated[TaskConfig, Tag("classification")],
        Annotated[SegmentationTaskConfig, Tag("segmentation")],
        Annotated[ReconstructionTaskConfig, Tag("reconstruction")],
    ],
    Discriminator(task_kind),
]
