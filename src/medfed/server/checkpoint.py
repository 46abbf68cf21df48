"""Model checkpoints: safetensors plus a JSON sidecar, each written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from medfed.core.types import Params


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_checkpoint(stem: Path, params: Params, meta: dict[str, Any]) -> None:
    """Write ``stem.safetensors`` and ``stem.json`` (e.g. round, metric, job hash)."""
    tmp = stem.with_name(stem.name + ".tmp.safetensors")
    save_file({k: v.contiguous() for k, v in params.items()}, str(tmp), metadata={"medfed": json.dumps(meta)})
    os.replace(tmp, stem.with_suffix(".safetensors"))
    atomic_write_text(stem.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")


def load_checkpoint(stem: Path) -> tuple[Params, dict[str, Any]]:
    params = load_file(str(stem.with_suffix(".safetensors")))
    meta = json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))
    return params, meta
