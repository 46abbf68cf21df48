"""examples/own-model: a job naming the user's own network factory runs with the command
line its README gives, ``PYTHONPATH=examples/own-model medfed run examples/own-model/job.yaml -o DIR``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medfed.tracking.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = Path("examples") / "own-model"
FACTORY = "mynets.nets:build"


def _medfed() -> str:
    """The ``medfed`` command of this environment (the console script beside its Python)."""
    here = Path(sys.executable).parent / ("medfed.exe" if os.name == "nt" else "medfed")
    found = str(here) if here.is_file() else shutil.which("medfed")
    if found is None:
        pytest.skip("the medfed command is not installed (pip install -e .)")
    return found


def _medfed_run(*args: str, pythonpath: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = str(EXAMPLE)  # relative, as the README writes it: the command runs at the root
    return subprocess.run([_medfed(), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                          check=False)


def test_example_job_validates():
    out = _medfed_run("validate", str(EXAMPLE / "job.yaml"))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"model {FACTORY}" in out.stdout


def test_example_job_without_its_package_is_refused():
    out = _medfed_run("validate", str(EXAMPLE / "job.yaml"), pythonpath=False)
    assert out.returncode != 0
    assert "model.import: no module named 'mynets.nets'" in out.stdout + out.stderr


def test_example_runs_with_the_readme_command(tmp_path):
    run_dir = tmp_path / "own-model"
    out = _medfed_run("run", str(EXAMPLE / "job.yaml"), "-o", str(run_dir), "-q")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]

    marker = json.loads((run_dir / "run.json").read_text())
    assert marker["status"] == "complete" and marker["rounds"] == 10

    records = read_metrics(run_dir / "metrics.jsonl")
    test_auc = {(r["arm"], r["site"]): r["value"] for r in records  # the last round's value wins
                if r["split"] == "test" and r["metric"] == "auc" and r["round"] == 10}
    for arm in ("federated", "local"):
        for site in ("hospital_a", "hospital_b", "hospital_c", "all"):
            assert 0.0 <= test_auc[(arm, site)] <= 1.0, (arm, site)

    # the run names the network it trained: the resolved job and the report hold the factory
    assert f"import: {FACTORY}" in (run_dir / "job.yaml").read_text()
    assert FACTORY in (run_dir / "report.html").read_text()
    assert (run_dir / "model_final.safetensors").is_file()
