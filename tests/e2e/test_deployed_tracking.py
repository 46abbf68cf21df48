"""A deployed run logs to the tracking tools its job names, as a simulation does: the
server process writes TensorBoard event files into its run folder and an MLflow run into
the local store next to it, every record per round, site and arm."""

from __future__ import annotations

import json

import pytest

from test_deployment import _deploy, _small

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def test_a_deployed_run_logs_to_tensorboard_and_mlflow(tmp_path):
    pytest.importorskip("tensorboard", reason='TensorBoard is an optional extra: pip install -e ".[tensorboard]"')
    pytest.importorskip("mlflow", reason='MLflow is an optional extra: pip install -e ".[mlflow]"')
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from medfed.tracking.external import metric_tag

    job = _small(tmp_path, "deployed", rounds=2, compare=["local"], tracking={"tensorboard": True, "mlflow": {}})
    run = _deploy(tmp_path, job)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    expected = {metric_tag(r) for r in records if r["value"] is not None}
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == expected
    assert "federated/test/auc/hospital_a" in expected and "local/test/auc/hospital_c" in expected

    marker = json.loads((run / "run.json").read_text())
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert found.info.status == "FINISHED" and found.info.run_id == marker["tracking"]["mlflow"]["run_id"]
    assert found.data.params["job_hash"] == marker["job_hash"]
    auc = {r["round"]: r["value"] for r in records if metric_tag(r) == "federated/test/auc/hospital_b"}
    history = client.get_metric_history(found.info.run_id, "federated/test/auc/hospital_b")
    assert {m.step: m.value for m in history} == pytest.approx(auc)
    assert {"report.html", "metrics.jsonl", "run.json", "model_final.safetensors"} <= {
        a.path for a in client.list_artifacts(found.info.run_id)}
