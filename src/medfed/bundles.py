"""MONAI Bundles (``model: {bundle: FOLDER}``): the network, the preprocessing and the
trainer a bundle's configs define, read with ``monai.bundle.ConfigParser``.

- :func:`build_bundle_network`: the bundle's ``network_def``.
- :func:`bundle_preprocess`: with ``bundle_transforms: true``, the bundle's deterministic
  preprocessing as medfed's reading step (its loading steps left out: medfed's readers have
  read the files, with their checks and their DICOM and NIfTI handling).
- :class:`BundleTrainer`: ``train.engine: bundle``, one site's local training by the
  bundle's own ``SupervisedTrainer`` through MONAI's federated client
  (``monai.fl.client.MonaiAlgo``), on the site's examples as medfed read them.

A bundle's configs are code: a ``_target_`` names any importable callable and a ``$``
value is evaluated as Python. medfed therefore never sends a bundle: the server and every
site read their own copy (a deployed site only the one its operator names with ``medfed
site --bundle``), and the copies must have the digest the job carries
(``model.bundle_sha256``, of ``configs/`` and ``scripts/``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from medfed.config import BundleModelConfig
from medfed.core.errors import ConfigError, DataError, ModelError
from medfed.data.base import Batch, Planned, Record

if TYPE_CHECKING:
    from medfed.data.base import Examples

log = logging.getLogger("medfed")

CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
# steps that read files or add the channel axis: medfed's readers have done both
LOADING_STEPS = ("LoadImage", "LoadImaged", "EnsureChannelFirst", "EnsureChannelFirstd")
IMAGE_KEY, LABEL_KEY = "image", "label"  # the keys a bundle's transforms and trainer read (MONAI's defaults)
# the bundle's handlers that would validate on its own data or write into its folder: medfed
# evaluates every round itself and keeps the models in the run folder

# MONAI's loggers that would print every iteration and every weight load of every site (medfed
# reports each site's loss per round); their warnings still show
QUIET_LOGGERS = {"monai.fl.client.monai_algo": logging.WARNING, "monai.networks.utils": logging.WARNING,
                 "monai.handlers.StatsHandler": logging.WARNING, "monai.bundle.workflows": logging.ERROR}
SKIPPED_HANDLERS = ("ValidationHandler", "CheckpointSaver", "CheckpointLoader", "TensorBoardStatsHandler",
                    "TensorBoardImageHandler", "MLFlowHandler", "ClearMLStatsHandler", "ClearMLImageHandler")


def _where(cfg: BundleModelConfig) -> str:
    return f"model.bundle ('{cfg.bundle}')"


def config_file(cfg: BundleModelConfig, stem: str | None = None) -> Path:
    """The bundle config that holds the network: ``configs/<cfg.config>`` when the job names
    one, else ``configs/train.*``, else ``configs/inference.*`` (``stem``: only that one)."""
    configs = cfg.bundle / "configs"
    if cfg.config is not None and stem is None:
        path = configs / cfg.config
        if not path.is_file():
            have = sorted(p.name for p in configs.glob("*") if p.suffix in CONFIG_SUFFIXES)
            raise ConfigError(f"model.config: the bundle '{cfg.bundle}' has no configs/{cfg.config} (it has: "
                              f"{', '.join(have) or 'no config'})")
        return path
    for name in (stem,) if stem else ("train", "inference"):
        for suffix in CONFIG_SUFFIXES:
            if (configs / f"{name}{suffix}").is_file():
                return configs / f"{name}{suffix}"
    wanted = " or ".join(f"configs/{name}.json" for name in ((stem,) if stem else ("train", "inference")))
    raise ConfigError(f"{_where(cfg)}: the bundle has no {wanted} (nor .yaml); name its config with model.config")


def read_bundle(cfg: BundleModelConfig, path: Path | None = None) -> Any:
    """A ``monai.bundle.ConfigParser`` of the bundle's config ``path`` (default
    :func:`config_file`) with its metadata, ``bundle_root`` set to the bundle's folder."""
    from monai.bundle import ConfigParser

    path = path or config_file(cfg)
    parser = ConfigParser()
    try:
        parser.read_meta(str(cfg.bundle / "configs" / "metadata.json"))
        parser.read_config(str(path))
    except Exception as e:  # a malformed JSON or YAML file
        raise ConfigError(f"{_where(cfg)}: cannot read '{path.name}': {type(e).__name__}: {_one_line(e)}") from None
    parser["bundle_root"] = str(cfg.bundle)
    return parser


def _one_line(e: BaseException) -> str:
    """``e``'s message on one line, with the exceptions it was raised from (MONAI's config
    errors wrap the one that says what is wrong), at most 500 characters."""
    parts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        parts.append(" ".join(str(e).split()))
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    said = "; caused by ".join(p for p in parts if p)
    return said if len(said) <= 500 else said[:497] + "..."


def _parsed(cfg: BundleModelConfig, parser: Any, key: str, what: str) -> Any:
    """``parser``'s ``key`` instantiated; a ModelError naming the bundle when its code raises."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return parser.get_parsed_content(key, instantiate=True)
    except Exception as e:  # the bundle's code or config refused
        raise ModelError(f"{_where(cfg)}: building its {what} ('{key}') raised {type(e).__name__}: {_one_line(e)}") from None


def check_bundle(cfg: BundleModelConfig) -> None:
    """Check a bundle's network as ``medfed validate`` and the start of a run do: its config
    is found and readable, holds ``network_def``, and that builds (a bundle's arguments have
    no signature to check against but its classes' own). ConfigError or ModelError naming
    the field."""
    build_bundle_network(cfg)


def _network_key(cfg: BundleModelConfig, parser: Any, path: Path) -> None:
    if "network_def" not in parser:
        keys = sorted(k for k in parser.get() if not k.startswith("_"))
        raise ConfigError(f"{_where(cfg)}: configs/{path.name} has no network_def, the network a bundle must define "
                          f"(its keys: {', '.join(keys[:20])}); give the bundle's config that defines it with "
                          "model.config")


def build_bundle_network(cfg: BundleModelConfig) -> nn.Module:
    """The bundle's ``network_def``, built. ConfigError when the config has none (naming
    the keys it has); ModelError when building raises or gives no ``torch.nn.Module``."""
    path = config_file(cfg)
    parser = read_bundle(cfg, path)
    _network_key(cfg, parser, path)
    model = _parsed(cfg, parser, "network_def", "network")
    if not isinstance(model, nn.Module):
        raise ModelError(f"{_where(cfg)}: network_def built a {type(model).__name__}, not a torch.nn.Module")
    return model


def _steps(compose: Any) -> list:
    return list(getattr(compose, "transforms", [compose]))


def _without_loading(steps: list) -> tuple[list, list[str]]:
    """``steps`` without the loading ones, and the names of those left out."""
    kept = [t for t in steps if type(t).__name__ not in LOADING_STEPS]
    return kept, [type(t).__name__ for t in steps if type(t).__name__ in LOADING_STEPS]


def bundle_preprocess(cfg: BundleModelConfig, spatial_dims: int, segmentation: bool) -> Callable[[Record], Record]:
    """The bundle's deterministic preprocessing as medfed's reading step (Record ->
    Record): ``validate#preprocessing`` of its config, else ``preprocessing`` of its
    inference config, without its loading steps (:data:`LOADING_STEPS`). Each example goes
    in as ``{"image": (C, *spatial), "label": (1, *spatial) mask or the class target}``,
    the image a MetaTensor whose affine carries the example's spacing (for ``Spacingd``).
    ConfigError when the bundle has none, or when it holds a random transform."""
    from monai.transforms import Compose, Randomizable

    parser, key = read_bundle(cfg), "validate#preprocessing"
    if key not in parser:
        try:
            inference = config_file(cfg, "inference")
        except ConfigError:
            inference = None
        parser = read_bundle(cfg, inference) if inference is not None else None
        key = "preprocessing"
        if parser is None or key not in parser:
            raise ConfigError(f"model.bundle_transforms: the bundle '{cfg.bundle}' defines no validate#preprocessing "
                              "(nor preprocessing in configs/inference.json) to read examples with; set "
                              "bundle_transforms: false and give transforms.preprocess")
    steps, left = _without_loading(_steps(_parsed(cfg, parser, key, "preprocessing")))
    random = [type(t).__name__ for t in steps if isinstance(t, Randomizable)]
    if random:
        raise ConfigError(f"model.bundle_transforms: the bundle's {key} holds random transforms ({', '.join(random)}); "
                          "reading must be deterministic (medfed caches what it reads)")
    log.info("%s: reading examples with the bundle's %s (%s), its loading steps (%s) left to medfed's readers",
             cfg.label, key, ", ".join(type(t).__name__ for t in steps) or "no steps", ", ".join(left) or "none")
    chain = Compose(steps)

    def apply(record: Record) -> Record:
        item = chain(_as_item(record.image, record.target, record.spacing, segmentation))
        image = _array(item[IMAGE_KEY])
        target = _array(item[LABEL_KEY]) if segmentation else record.target
        if segmentation:
            target = target[0].round().astype(np.int64)  # back to (*spatial) class indices
        spacing = _spacing(item[IMAGE_KEY], len(image.shape) - 1) or record.spacing
        return Record(record.name, image.astype(np.float32), target, spacing, record.split)

    return apply


def _as_item(image: Any, target: Any, spacing: tuple[float, ...] | None, segmentation: bool) -> dict:
    from monai.data import MetaTensor

    image = torch.as_tensor(np.asarray(image, dtype=np.float32))
    dims = image.ndim - 1
    affine = torch.diag(torch.tensor([*(spacing or (1.0,) * dims), 1.0], dtype=torch.float64))
    label = torch.as_tensor(np.asarray(target))
    if segmentation:
        label = MetaTensor(label[None].float(), affine=affine.clone())
    return {IMAGE_KEY: MetaTensor(image, affine=affine), LABEL_KEY: label}


def _array(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _spacing(x: Any, dims: int) -> tuple[float, ...] | None:
    pixdim = getattr(x, "pixdim", None)
    if pixdim is None:
        return None
    return tuple(float(v) for v in torch.as_tensor(pixdim).flatten()[:dims])


# ------------------------------------------------------------------- train.engine: bundle


class _SiteExamples(torch.utils.data.Dataset):
    """A site's training split as the bundle's trainer reads it: ``{"image", "label"}``
    per example (the label (1, *spatial) for segmentation), through the bundle's random
    transforms."""

    def __init__(self, split: Examples, transform: Callable | None, segmentation: bool, site: str):
        self.split, self.transform, self.segmentation, self.site = split, transform, segmentation, site

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> Any:
        load = getattr(self.split, "load", None)
        if load is not None:  # streamed: read through its store (cache) in this process
            batch = load((i,), None)
        else:
            batch = next(iter(self.split.batches([Planned(torch.tensor([i]))])))
        if not isinstance(batch, Batch):  # a LoadFailure: what the reader said
            raise DataError(batch.message)
        if len(batch) == 0:
            raise DataError(f"site '{self.site}': training example {i} cannot be read "
                            f"({'; '.join(f'{f}: {r}' for f, r in batch.skipped)}); train.engine: bundle trains on "
                            "every example of the split: fix or remove the file")
        label = batch.labels[0]
        item = {IMAGE_KEY: batch.images[0], LABEL_KEY: label[None] if self.segmentation else label}
        return self.transform(item) if self.transform is not None else item


class BundleTrainer:
    """One site's ``train.engine: bundle``: the bundle's train config as a MONAI
    ``ConfigWorkflow`` run by ``MonaiAlgo``, its ``train#dataset`` replaced by the site's
    training split (:class:`_SiteExamples`, through the bundle's ``train#preprocessing``
    from its first random transform on: the deterministic part is medfed's reading step),
    its ``device`` by the site's, and its handlers that validate or write files
    (:data:`SKIPPED_HANDLERS`) turned off. Built on the first round; the trainer, its
    optimizer and scheduler persist across rounds as they would in a long bundle run."""

    def __init__(self, cfg: BundleModelConfig, site: str, device: torch.device, segmentation: bool):
        self.cfg, self.site, self.device, self.segmentation = cfg, site, device, segmentation
        self._algo: Any = None
        self._transform: Any = None

    def _build(self, split: Examples) -> None:
        try:
            from monai.bundle import ConfigWorkflow
            from monai.fl.client import MonaiAlgo
            from monai.utils import OptionalImportError
        except ImportError as e:
            raise ConfigError(f"train.engine: bundle needs MONAI's federated client, which cannot be imported here "
                              f"({_one_line(e)}); install it with pip install -e \".[bundle]\"") from None
        path = config_file(self.cfg, None if self.cfg.config else "train")
        for name, level in QUIET_LOGGERS.items():
            logging.getLogger(name).setLevel(level)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI warns that a bundle runs code: this one is the site's own
            workflow = ConfigWorkflow(config_file=str(path), meta_file=None, logging_file=False, workflow_type="train")
        parser = workflow.parser
        parser["bundle_root"] = str(self.cfg.bundle)
        for key in ("train#trainer", "train#dataset", "train#dataloader"):
            if key not in parser:
                raise ConfigError(f"train.engine: the bundle '{self.cfg.bundle}' has no {key} in configs/{path.name}; "
                                  "engine: bundle runs the bundle's trainer on its train#dataloader")
        if "device" in parser:
            parser["device"] = self.device
        steps = _steps(_parsed(self.cfg, parser, "train#preprocessing", "training transforms")) \
            if "train#preprocessing" in parser else []
        from monai.transforms import Compose, Randomizable

        first = next((i for i, t in enumerate(steps) if isinstance(t, Randomizable)), len(steps))
        self._transform = Compose(steps[first:]) if steps[first:] else None
        parser["train#dataset"] = _SiteExamples(split, self._transform, self.segmentation, self.site)
        if "validate#dataset" in parser:  # never run (its handler is off), but built: not from the bundle's files
            parser["validate#dataset"] = _SiteExamples(split, None, self.segmentation, self.site)
        self._skip_handlers(parser)
        algo = MonaiAlgo(bundle_root=str(self.cfg.bundle), local_epochs=1, send_weight_diff=False,
                         train_workflow=workflow, config_evaluate_filename=None)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                algo.initialize(extra={"fl_client_name": self.site})
        except (ConfigError, DataError):
            raise
        except OptionalImportError as e:
            raise ConfigError(f"train.engine: bundle: {_one_line(e)}; install it with pip install -e \".[bundle]\"") from None
        except Exception as e:  # the bundle's code refused
            raise ModelError(f"{_where(self.cfg)}: setting up its trainer raised {type(e).__name__}: {_one_line(e)}") from None
        self._algo = algo

    @staticmethod
    def _skip_handlers(parser: Any) -> None:
        for key in ("train#handlers", "validate#handlers"):
            handlers = parser.get(key) if key in parser else None
            for h in handlers if isinstance(handlers, list) else []:
                if isinstance(h, dict) and str(h.get("_target_", "")).split(".")[-1] in SKIPPED_HANDLERS:
                    h["_disabled_"] = True

    def train(self, model: nn.Module, split: Examples, epochs: int, seed: int) -> tuple[int, float]:
        """Train ``model``'s weights for ``epochs`` epochs with the bundle's trainer, then
        load the result into ``model``. Returns (iterations run, mean loss over them; NaN
        when the trainer's output carries no ``loss``)."""
        from monai.fl.utils.constants import WeightType
        from monai.fl.utils.exchange_object import ExchangeObject

        if self._algo is None:
            self._build(split)
        algo = self._algo
        algo.local_epochs = epochs
        torch.manual_seed(seed)  # the bundle's shuffling and dropout
        if self._transform is not None:
            self._transform.set_random_state(seed=seed % 2**32)
        weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        losses: list[float] = []
        trainer = algo.trainer
        from ignite.engine import Events

        def keep_loss(engine: Any) -> None:
            out = engine.state.output
            loss = out[0].get("loss") if isinstance(out, list) and out and isinstance(out[0], dict) else (
                out.get("loss") if isinstance(out, dict) else None)
            if loss is not None:
                losses.append(float(loss))

        handle = trainer.add_event_handler(Events.ITERATION_COMPLETED, keep_loss)
        try:
            algo.train(ExchangeObject(weights=weights, weight_type=WeightType.WEIGHTS))
            result = algo.get_weights()
        except (ConfigError, DataError):
            raise
        except Exception as e:  # the bundle's trainer failed
            raise ModelError(f"{_where(self.cfg)}: its trainer raised {type(e).__name__}: {_one_line(e)}") from None
        finally:
            handle.remove()
        trained = {k: torch.as_tensor(v) for k, v in result.weights.items()}
        model.load_state_dict(trained, strict=True)
        steps = int((result.statistics or {}).get("num_executed_iterations", len(losses)))
        return steps, (sum(losses) / len(losses) if losses else float("nan"))
