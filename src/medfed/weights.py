"""Where a network's weights start and which stay fixed: ``model.init``, ``init_keys`` and
``freeze`` (see :class:`medfed.config.model.ModelConfig`'s base for the job fields).

:func:`load_init` reads the init file (``.safetensors``, or a PyTorch checkpoint read with
``torch.load(weights_only=True)``, so loading it runs no code) and loads it into the first
model of a run, on the server: the weights the server sends in round 1, to every site and
every arm. :func:`freeze` fixes the parameters under the job's prefixes in every model
medfed builds, at the server and at the sites.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from medfed.config import ModelSettings
from medfed.core.errors import ConfigError, ModelError

MAX_ROWS = 50  # rows of a key table shown in an error (all of them go into run.log)

Shape = tuple[int, ...]


@dataclass(frozen=True)
class InitReport:
    """What loading an init file did: the model's entries ``loaded`` from it, those the file
    lacks (``missing``), the file's entries the model lacks (``unexpected``), and entries
    whose shapes differ (``mismatched``: name, the model's shape, the file's)."""

    path: Path
    sha256: str
    loaded: list[str]
    missing: list[tuple[str, Shape]] = field(default_factory=list)
    unexpected: list[tuple[str, Shape]] = field(default_factory=list)
    mismatched: list[tuple[str, Shape, Shape]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def rows(self) -> list[tuple[str, str, str, str]]:
        """(entry, shape in the model, shape in the file, what happened) for every entry
        that did not load as is, in the model's order then the file's."""
        def s(shape: Shape) -> str:
            return str(list(shape))

        out = [(k, s(m), s(f), "shapes differ: kept as built") for k, m, f in self.mismatched]
        out += [(k, s(m), "-", "not in the file: kept as built") for k, m in self.missing]
        out += [(k, "-", s(f), "not in the model: ignored") for k, f in self.unexpected]
        return out

    def table(self, limit: int | None = None) -> str:
        """The rows as an aligned text table (at most ``limit`` rows, then a count)."""
        rows = self.rows()
        shown = rows if limit is None else rows[:limit]
        head = ("entry", "model", "file", "")
        widths = [max(len(r[i]) for r in [head, *shown]) for i in range(3)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in [head, *shown]]
        if len(shown) < len(rows):
            lines.append(f"... and {len(rows) - len(shown)} more")
        return "\n".join("  " + line.rstrip() for line in lines)

    def summary(self, total: int) -> str:
        return (f"model.init '{self.path}' (sha256 {self.sha256[:12]}...): {len(self.loaded)} of the model's "
                f"{total} entries loaded; {len(self.mismatched)} with another shape, {len(self.missing)} not in "
                f"the file, {len(self.unexpected)} of the file's not in the model")


def read_weights(path: Path, sha256: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a weights file and the SHA-256 of the bytes read. ``sha256``: the hash
    the job was loaded with; a file that changed since is refused. Raises ConfigError
    naming ``model.init`` and the file."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"model.init: cannot read '{path}': {e.strerror or e}") from None
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256:
        raise ConfigError(
            f"model.init: '{path}' changed since the job was loaded (SHA-256 {sha256}, now {digest}); "
            "load the job again to use the new file"
        )
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            return load(data), digest
        except (SafetensorError, ValueError) as e:
            raise ConfigError(f"model.init: '{path}' is not a readable .safetensors file: {e}") from None
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # not a checkpoint, or one holding objects weights_only refuses
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(
            f"model.init: cannot read '{path}' as a PyTorch checkpoint with weights_only=True "
            f"({type(e).__name__}: {first}); save the state dict alone (torch.save(model.state_dict(), path)) "
            "or as .safetensors"
        ) from None
    return _state_dict(obj, path), digest


def _state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a checkpoint: the object itself, or under ``state_dict`` or ``model``."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ConfigError(
            f"model.init: '{path}' holds a {type(obj).__name__}, not a state dict (a mapping of names to "
            "tensors, itself or under 'state_dict' or 'model')"
        )
    bad = [str(k) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise ConfigError(f"model.init: '{path}' holds entries that are not named tensors: {', '.join(bad[:5])}")
    return dict(obj)


def match_weights(model: nn.Module, tensors: Mapping[str, torch.Tensor], path: Path, sha256: str) -> InitReport:
    """Compare the file's entries with the model's state dict, by name and shape."""
    own = model.state_dict()
    loaded = [k for k in own if k in tensors and tuple(tensors[k].shape) == tuple(own[k].shape)]
    return InitReport(
        path, sha256, loaded,
        missing=[(k, tuple(v.shape)) for k, v in own.items() if k not in tensors],
        unexpected=[(k, tuple(v.shape)) for k, v in tensors.items() if k not in own],
        mismatched=[(k, tuple(v.shape), tuple(tensors[k].shape)) for k, v in own.items()
                    if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)],
    )


def load_init(model: nn.Module, cfg: ModelSettings) -> InitReport:
    """Load ``cfg.init`` into ``model`` under ``cfg.init_keys``; return what was loaded.

    ``strict``: every entry of the model must be in the file with its shape, and the file
    must hold nothing else; otherwise a ModelError lists the entries key by key. ``partial``:
    the entries that match in name and shape are loaded, the others keep their built values
    (the report lists them); a file of which nothing matches is an error."""
    if cfg.init is None:
        raise ValueError("load_init needs model.init")
    tensors, digest = read_weights(cfg.init, cfg.init_sha256)
    report = match_weights(model, tensors, cfg.init, digest)
    total = len(model.state_dict())
    if cfg.init_keys == "strict" and not report.complete:
        raise ModelError(
            f"model.init: init_keys: strict needs every entry of the model in '{cfg.init}' with its shape, and "
            f"nothing else; {len(report.rows())} entries differ:\n{report.table(MAX_ROWS)}\n"
            "use init_keys: partial to load the entries that match and keep the others as built"
        )
    if not report.loaded:
        prefixes = sorted({k.split(".", 1)[0] for k in tensors})[:5]
        raise ModelError(
            f"model.init: none of the {len(tensors)} entries of '{cfg.init}' matches the model's {total} in name and "
            f"shape (the file's names start with {', '.join(prefixes)}; the model's with "
            f"{', '.join(n for n, _ in model.named_children())}): is it the weights of this network?"
        )
    model.load_state_dict({k: tensors[k] for k in report.loaded}, strict=False)
    return report


def frozen_parameters(model: nn.Module, prefixes: list[str]) -> frozenset[str]:
    """The names of the parameters that start with one of ``prefixes``. A prefix that
    matches no parameter is a ConfigError naming it and the model's top-level modules."""
    names = [n for n, _ in model.named_parameters()]
    out: set[str] = set()
    for prefix in prefixes:
        hit = [n for n in names if n.startswith(prefix)]
        if not hit:
            top = ", ".join(n for n, _ in model.named_children()) or "none"
            raise ConfigError(
                f"model.freeze: '{prefix}' matches no parameter of the model (parameter names start with one of "
                f"its top-level modules: {top})"
            )
        out.update(hit)
    return frozenset(out)


def freeze(model: nn.Module, prefixes: list[str]) -> frozenset[str]:
    """Stop gradients of the parameters under ``prefixes`` (see :func:`frozen_parameters`):
    no optimizer, at any site, takes them, and the server counts them with the buffers
    (they are not trainable). Returns their names."""
    frozen = frozen_parameters(model, prefixes)
    for n, p in model.named_parameters():
        if n in frozen:
            p.requires_grad_(False)
    return frozen
