"""Model checkpoints: safetensors plus a JSON sidecar, each written atomically (see
core/files.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from medfed.config import Job
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


def model_record(job: Job) -> dict[str, Any]:
    """What run.json says of the job's network: how the job names it, and the content
    hashes of the weights round 1 started from and of a MONAI Bundle's code."""
    out: dict[str, Any] = {"model": job.model.label}
    if job.model.init is not None:
        out["init_sha256"] = job.model.init_sha256
    if getattr(job.model, "bundle", None) is not None:
        out["bundle_sha256"] = job.model.bundle_sha256  # type: ignore[union-attr]
    return out
