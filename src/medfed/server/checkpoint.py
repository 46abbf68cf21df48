"""Model checkpoints: safetensors plus a JSON sidecar, each written atomically (see
core/files.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from medfed.core.files import atomic_write_text, replacing
from medfed.core.types import Params


def save_checkpoint(stem: Path, params: Params, meta: dict[str, Any]) -> None:
    """Write ``stem.safetensors`` and ``stem.json`` (e.g. round, metric, job hash)."""
    with replacing(stem.with_suffix(".safetensors")) as tmp:
        save_file({k: v.contiguous() for k, v in params.items()}, str(tmp), metadata={"medfed": json.dumps(meta)})
    atomic_write_text(stem.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")


def load_checkpoint(stem: Path) -> tuple[Params, dict[str, Any]]:
    params = load_file(str(stem.with_suffix(".safetensors")))
    meta = json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))
    return params, meta
