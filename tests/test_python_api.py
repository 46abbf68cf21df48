"""The Python API: ``medfed.run`` with the user's own datasets and network, its errors,
``medfed.validate`` and ``medfed.load_job``, and ``import medfed`` staying light."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import medfed
from medfed.core.errors import ConfigError, DataError, ModelError
from medfed.tracking.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def _ds(n: int, seed: int, size: int = 16) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 1, size, size, generator=g), (torch.rand(n, generator=g) < 0.5).long())


def _datasets(names=("a", "b", "c")) -> dict:
    return {n: {"train": _ds(12, 3 * i), "val": _ds(6, 3 * i + 1), "test": _ds(6, 3 * i + 2)} for i, n in enumerate(names)}


def _job(tmp_path: Path, **extra) -> dict:
    return {"name": "api", "output": str(tmp_path / "run"), "rounds": 2, "device": "cpu", "threads": 1,
            "task": {"kind": "classification", "labels": "binary", "num_classes": 2, "monitor": "auc"},
            "algorithm": {"name": "fedavg"}, "train": {"local_epochs": 1, "batch_size": 6, "lr": 0.05}, **extra}


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.head = nn.Linear(2, 1)

    def forward(self, x):
        return self.head(self.conv(x).mean(dim=(2, 3)))


def test_run_with_own_datasets_and_model(tmp_path):
    result = medfed.run(_job(tmp_path), datasets=_datasets(), model=TinyNet, progress=False)
    assert result.run_dir == (tmp_path / "run").resolve()
    assert result.metrics and result.metrics == read_metrics(result.run_dir / "metrics.jsonl")
    sites = {r["site"] for r in result.metrics}
    assert {"a", "b", "c"} <= sites
    assert max(r["round"] for r in result.metrics if r["arm"] == "federated") == 2
    marker = json.loads((result.run_dir / "run.json").read_text())
    assert marker["user_model"]["class"] == "TinyNet" and len(marker["user_model"]["fingerprint"]) == 64
    assert marker["user_datasets"] is True
    assert (result.run_dir / "report.html").is_file()
    # the model trained is the factory's: the checkpoint holds its parameters
    saved = json.loads((result.run_dir / "model_final.json").read_text())
    assert saved["round"] == 2


def test_run_with_job_model_and_data_section(tmp_path):
    job = _job(tmp_path, model={"name": "small_cnn", "width": 4},
               data={"source": "synthetic", "sites": [{"name": n, "n_train": 4, "n_test": 4} for n in ("a", "b")]})
    result = medfed.run(job, datasets=_datasets(("a", "b")), progress=False)
    marker = json.loads((result.run_dir / "run.json").read_text())
    assert "user_model" not in marker and marker["job_hash"] == medfed.validate(job).job_hash()
    # the job's data section lists the sites: datasets must name the same ones
    with pytest.raises(DataError, match=r"\['c'\] not a site of the job"):
        medfed.run(job, datasets=_datasets(("a", "b", "c")), overwrite=True, progress=False)


def test_to_pandas_or_a_clear_error(tmp_path, monkeypatch):
    result = medfed.run(_job(tmp_path), datasets=_datasets(("a", "b")), model=TinyNet, progress=False)
    try:
        import pandas  # noqa: F401
    except ImportError:
        pass
    else:  # with pandas: one row a record
        frame = result.to_pandas()
        assert len(frame) == len(result.metrics) and {"round", "arm", "site", "metric", "value"} <= set(frame.columns)
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="pip install pandas"):
        result.to_pandas()


class _OneItem(Dataset):
    def __len__(self):
        return 3

    def __getitem__(self, i):
        return (torch.zeros(1, 16, 16),)


class _Shapes(Dataset):
    def __len__(self):
        return 3

    def __getitem__(self, i):
        return torch.zeros(1, 16, 16 if i < 2 else 8), 0


def _bad(datasets: dict, site: str, split: str, ds) -> dict:
    datasets[site] = {**datasets[site], split: ds}
    return datasets


@pytest.mark.parametrize(("datasets", "message"), [
    (_bad(_datasets(("a", "b")), "b", "val", _OneItem()), r"site 'b' val dataset, item 0: .*\(image, target\) pair"),
    (_bad(_datasets(("a", "b")), "a", "test", _Shapes()), r"site 'a' test dataset, item 2: the image has shape \(1, 16, 8\), but the site's images are \(1, 16, 16\)"),
    (_bad(_datasets(("a", "b")), "a", "train", _Shapes()), r"site 'a' train dataset, item 2: the image has shape"),
    (_bad(_datasets(("a", "b")), "a", "train",
          TensorDataset(torch.rand(4, 1, 16, 16), torch.tensor([0, 1, 2, 0]))), r"site 'a' train split.*0\.\.1"),
    (_bad(_datasets(("a", "b")), "b", "train", TensorDataset(torch.rand(4, 16, 16), torch.zeros(4).long())),
     r"site 'b' train dataset, item 0: .*\(C, H, W\)"),
    ({**_datasets(("a", "b")), "x": _datasets(("x",))["x"]}, r"\['x'\] not a site of the job"),
    ({"a": {"train": _ds(4, 0)}, "b": _datasets(("b",))["b"]}, r"datasets\['a'\]: must map 'train', 'val' and 'test'"),
    ({"a": _datasets(("a",))["a"]}, r"no data for the job's site\(s\) \['b'\]"),
])
def test_bad_datasets_are_clear_errors(tmp_path, datasets, message):
    job = _job(tmp_path, data={"source": "synthetic",
                               "sites": [{"name": n, "n_train": 4, "n_test": 4} for n in ("a", "b")]})
    with pytest.raises(DataError, match=message):
        medfed.run(job, datasets=datasets, model=TinyNet, progress=False)
    assert not (tmp_path / "run").exists()


def test_pool_transport_refused(tmp_path):
    with pytest.raises(ConfigError, match="transport: pool.*inprocess"):
        medfed.run(_job(tmp_path, transport="pool"), datasets=_datasets(("a", "b")), model=TinyNet, progress=False)
    from medfed.server.runner import run_job

    job = medfed.validate(_job(tmp_path, transport="pool", model={"name": "small_cnn", "width": 4},
                               data={"source": "synthetic", "sites": [{"name": "a", "n_train": 4, "n_test": 4}]}))
    with pytest.raises(ConfigError, match="transport: pool"):
        run_job(job, model_factory=TinyNet)


def test_bad_model_factory(tmp_path):
    with pytest.raises(ModelError, match="must return a torch.nn.Module, got int"):
        medfed.run(_job(tmp_path), datasets=_datasets(("a", "b")), model=lambda: 3, progress=False)

    def broken():
        raise RuntimeError("no weights here")

    with pytest.raises(ModelError, match="raised RuntimeError: no weights here"):
        medfed.run(_job(tmp_path), datasets=_datasets(("a", "b")), model=broken, progress=False)


def test_validate_and_load_job():
    path = ROOT / "src" / "medfed" / "examples" / "quickstart.yaml"
    job = medfed.load_job(path)
    assert medfed.validate(path).job_hash() == job.job_hash()
    assert medfed.validate(job) is job
    with pytest.raises(ConfigError, match="rounds"):
        medfed.validate({**json.loads(job.model_dump_json()), "rounds": 0})


def test_import_medfed_stays_light():
    code = "import sys, medfed; medfed.load_job; medfed.validate; medfed.Result; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_example_script_runs(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "python_api.py"), str(tmp_path / "ex")],
                         capture_output=True, text=True, env=env, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "federated test AUC by site: hospital_a" in out.stdout
    assert (tmp_path / "ex" / "run.json").is_file()


def test_init_and_freeze_are_not_silently_dropped_with_a_factory(tmp_path):
    job = _job(tmp_path, model={"name": "small_cnn", "width": 4, "freeze": ["features"]})
    with pytest.raises(ConfigError, match="model.init and model.freeze apply to the job's own network"):
        medfed.run(job, datasets=_datasets(("a", "b")), model=TinyNet, progress=False)
    assert not (tmp_path / "run").exists()
