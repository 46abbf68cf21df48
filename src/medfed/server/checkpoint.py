"""Model checkpoints: safetensors plus a JSON sidecar, each written atomically (see
core/files.py); and the resume point of a run (``state.safetensors``): the global model
and the server rule's state after the last completed round."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from medfed.config import Job
from medfed.core.errors import RunDirError
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


STATE_FILE = "state.safetensors"


def save_state(run_dir: Path, rnd: int, params: Params, algorithm_state: Params, job_hash: str) -> None:
    """The global model and the server rule's state after round ``rnd``, in one file
    replaced atomically, so they always belong to the same round."""
    tensors = {f"params/{k}": v.contiguous() for k, v in params.items()}
    tensors |= {f"algorithm/{k}": v.contiguous() for k, v in algorithm_state.items()}
    with replacing(run_dir / STATE_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"medfed": json.dumps({"round": rnd, "job_hash": job_hash})})


def load_state(run_dir: Path, job_hash: str) -> tuple[int, Params, Params]:
    """(round, params, algorithm state) of the last completed round."""
    path = run_dir / STATE_FILE
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {})["medfed"])
        tensors = load_file(str(path))
    except (OSError, SafetensorError, KeyError, ValueError) as e:
        raise RunDirError(f"cannot read the saved state '{path}': {e}") from None
    if meta.get("job_hash") != job_hash:
        raise RunDirError(f"'{path}' belongs to job {meta.get('job_hash')}, not to this job ({job_hash})")
    groups: dict[str, Params] = {"params": {}, "algorithm": {}}
    for key, t in tensors.items():
        prefix, _, name = key.partition("/")
        groups.setdefault(prefix, {})[name] = t
    return int(meta["round"]), groups["params"], groups["algorithm"]


def model_record(job: Job) -> dict[str, Any]:
    """What run.json says of the job's network: how the job names it, and the content
    hashes of the weights round 1 started from and of a MONAI Bundle's code."""
    out: dict[str, Any] = {"model": job.model.label}
    if job.model.init is not None:
        out["init_sha256"] = job.model.init_sha256
    if getattr(job.model, "bundle", None) is not None:
        out["bundle_sha256"] = job.model.bundle_sha256  # type: ignore[union-attr]
    return out
