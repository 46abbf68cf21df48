"""Networks beyond medfed's own: any class of ``monai.networks.nets`` (``model: {monai:
SwinUNETR, args: {...}}``) and the user's factories (``model: {import:
"package.module:factory", args: {...}}``).

Both are checked against their signature before anything is built
(:func:`check_network`, called by ``medfed validate`` and before a run starts): an unknown
class names the closest ones, an argument the class does not take names the field
(``model.args.X``) and the accepted names, a required argument medfed does not fill must be
in ``args``. :func:`build_network` then fills the sizes the data and the task fix
(:data:`SIZE_NAMES`) unless ``args`` sets them, and builds the network.

Code never travels: a factory is imported where the run happens (the server and every
site), from what is installed there or on ``PYTHONPATH``.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import nn

from medfed.config import ArgValue, ImportModelConfig, MonaiModelConfig
from medfed.core.errors import ConfigError, ModelError

CustomModelConfig = MonaiModelConfig | ImportModelConfig

# The sizes medfed fills, each under the names networks use for it, in order of preference:
# the first one a signature takes is filled, unless ``args`` sets any of them.
SIZE_NAMES: dict[str, tuple[str, ...]] = {
    "spatial_dims": ("spatial_dims", "dimensions"),
    "in_channels": ("in_channels", "n_input_channels", "in_chans", "input_channels"),
    "out_channels": ("out_channels", "num_classes", "n_classes", "out_classes", "output_channels"),
}

MONAI_DOCS = "https://docs.monai.io/en/stable/networks.html#nets"


@dataclass(frozen=True)
class Network:
    """A network constructor found from the job, with what its signature says.

    ``where``: the job field that names it (``model.monai`` or ``model.import``);
    ``label``: how messages name it; ``names``: the keyword arguments it takes;
    ``open``: it also takes any other keyword (``**kwargs``), or has no readable
    signature; ``required``: the arguments without a default."""

    where: str
    label: str
    build: Callable[..., object]
    names: tuple[str, ...]
    open: bool
    required: tuple[str, ...]

    def filled(self, args: Mapping[str, ArgValue]) -> dict[str, str]:
        """For each size (:data:`SIZE_NAMES`) medfed fills: the argument name it goes under
        (none when ``args`` sets the size itself, or the signature takes none of its names)."""
        out = {}
        for size, names in SIZE_NAMES.items():
            if any(n in args for n in names):
                continue
            name = next((n for n in names if n in self.names), None)
            if name is not None:
                out[size] = name
        return out


def _close(name: str, candidates: list[str]) -> list[str]:
    """The candidates closest to ``name``, case ignored (of names that differ only in case,
    such as MONAI's aliases DynUNet, DynUnet, Dynunet, the first in sorted order)."""
    by_lower: dict[str, str] = {}
    for c in sorted(candidates):
        by_lower.setdefault(c.lower(), c)
    return [by_lower[c] for c in difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.5)]


def _signature(where: str, label: str, build: Callable[..., object]) -> Network:
    try:
        sig = inspect.signature(build)
    except (TypeError, ValueError):  # a builtin or an extension type: nothing to check against
        return Network(where, label, build, (), True, ())
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = [p for p in sig.parameters.values() if p.kind in kinds]
    return Network(
        where, label, build,
        names=tuple(p.name for p in params),
        open=any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()),
        required=tuple(p.name for p in params if p.default is inspect.Parameter.empty),
    )


def _monai_class(cfg: MonaiModelConfig) -> Network:
    from monai.networks import nets  # imported here: MONAI costs ~1 s to import

    classes = sorted(n for n, v in vars(nets).items()
                     if inspect.isclass(v) and issubclass(v, nn.Module) and not n.startswith("_"))
    found = getattr(nets, cfg.monai, None)
    if found is None:
        close = _close(cfg.monai, classes)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; the classes are listed at {MONAI_DOCS}"
        raise ConfigError(f"model.monai: monai.networks.nets has no network class '{cfg.monai}'{hint}")
    if not (inspect.isclass(found) and issubclass(found, nn.Module)):
        raise ConfigError(
            f"model.monai: monai.networks.nets.{cfg.monai} is of type {type(found).__name__}, not a network class; "
            f"to call it as a factory write model: {{import: \"monai.networks.nets:{cfg.monai}\"}}"
        )
    return _signature("model.monai", cfg.label, found)


def import_callable(path: str, field: str) -> Callable[..., object]:
    """The class or function that ``path`` ("package.module:name") names, imported here;
    a ConfigError naming ``field`` when the module or name is missing or not callable."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ConfigError(
                f"{field}: no module named '{module_name}' here (missing: '{e.name}'); install the package "
                "that holds it, or put its folder on PYTHONPATH, wherever the run happens (the server and every "
                "site): medfed never sends code from the server"
            ) from None
        raise ConfigError(
            f"{field}: importing '{module_name}' failed: it needs module '{e.name}', which is not installed "
            "here; install it where the run happens"
        ) from None
    except Exception as e:  # the user's module failed while it was imported
        said = " ".join(str(e).split())
        raise ConfigError(f"{field}: importing '{module_name}' failed: {type(e).__name__}: {said}") from None
    found: object = module
    for i, part in enumerate(attr.split(".")):
        if not hasattr(found, part):
            owner = module_name + "".join(f".{p}" for p in attr.split(".")[:i])
            public = [n for n in dir(found) if not n.startswith("_")]
            close = _close(part, public)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"{field}: '{owner}' has no attribute '{part}'{hint}")
        found = getattr(found, part)
    if not callable(found):
        raise ConfigError(f"{field}: '{path}' is of type {type(found).__name__}, not a class or function")
    return found


def _factory(cfg: ImportModelConfig) -> Network:
    return _signature("model.import", f"factory '{cfg.factory}'", import_callable(cfg.factory, "model.import"))


def resolve_network(cfg: CustomModelConfig) -> Network:
    """The class or factory ``cfg`` names, with its signature. Raises ConfigError naming
    the field: no such MONAI class (with the closest names), a module that cannot be
    imported here, no such attribute in it."""
    return _monai_class(cfg) if isinstance(cfg, MonaiModelConfig) else _factory(cfg)


def check_args(net: Network, args: Mapping[str, ArgValue]) -> None:
    """Refuse an argument the signature does not take, and a required one that is neither
    in ``args`` nor filled by medfed: ConfigError naming ``model.args.X`` and the accepted
    names."""
    if not net.open:
        for name in args:
            if name not in net.names:
                close = _close(name, list(net.names))
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise ConfigError(
                    f"model.args.{name}: {net.label} takes no argument '{name}'{hint}; it takes: "
                    f"{', '.join(net.names) or 'no arguments'}"
                )
    filled = set(net.filled(args).values())
    missing = [n for n in net.required if n not in args and n not in filled]
    if missing:
        raise ConfigError(
            f"model.args.{missing[0]}: {net.label} needs {', '.join(repr(m) for m in missing)} (no default), which "
            f"medfed does not fill (it fills only the sizes: {', '.join(n[0] for n in SIZE_NAMES.values())} "
            "or their other names); add it under model.args"
        )


def check_network(cfg: CustomModelConfig) -> Network:
    """Resolve ``cfg``'s class or factory and check its arguments, without building it
    (``medfed validate`` and the start of a run). Returns what :func:`build_network` uses."""
    net = resolve_network(cfg)
    check_args(net, cfg.args)
    return net


def _tuples(v: ArgValue) -> object:
    """YAML lists as tuples, as MONAI's signatures and defaults have them."""
    if isinstance(v, list):
        return tuple(_tuples(x) for x in v)
    if isinstance(v, dict):
        return {k: _tuples(x) for k, x in v.items()}
    return v


def build_network(cfg: CustomModelConfig, in_channels: int, out_channels: int, spatial_dims: int) -> nn.Module:
    """The network ``cfg`` names, built with ``cfg.args`` plus the sizes it takes and the job
    leaves to medfed: ``spatial_dims``, ``in_channels`` (from the data) and
    ``out_channels`` (from the task: one logit for a binary task, else one per class or
    label, background included for segmentation). For MONAI classes YAML lists become
    tuples; a factory gets them as given.

    Raises ConfigError for what :func:`check_network` refuses and ModelError when the
    class or factory raises (its exception type and message, no traceback) or a factory
    returns something other than a ``torch.nn.Module``."""
    net = check_network(cfg)
    sizes = {"spatial_dims": spatial_dims, "in_channels": in_channels, "out_channels": out_channels}
    monai = isinstance(cfg, MonaiModelConfig)
    kwargs: dict[str, object] = {k: (_tuples(v) if monai else v) for k, v in cfg.args.items()}
    kwargs.update({name: sizes[size] for size, name in net.filled(cfg.args).items()})
    try:
        model = net.build(**kwargs)
    except Exception as e:  # the user's or MONAI's code refused the arguments
        shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        shown = (shown if len(shown) <= 300 else shown[:297] + "...") or "no arguments"
        said = " ".join(str(e).split())  # on one line: some messages span several
        raise ModelError(
            f"{net.where}: {net.label} raised {type(e).__name__}: {said} (called with {shown}); check model.args"
        ) from None
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"{net.where}: {net.label} returned an object of type {type(model).__name__}, not a torch.nn.Module"
        )
    return model
