"""Experiment tracking: a tiny simulation (2 synthetic sites, 2 rounds) logged to
TensorBoard and MLflow, read back with each tool's own reader; the section kept out of the
job; a missing extra named before anything runs; a failing tracker never stops a run."""

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from medfed.cli import app
from medfed.config import parse_job
from medfed.core.errors import ConfigError
from medfed.server.runner import run_job
from medfed.tracking import external
from medfed.tracking.external import Trackers, flatten, metric_tag

JOB = {
    "name": "tiny-tracked",
    "seed": 5,
    "output": "PLACEHOLDER",
    "rounds": 2,
    "threads": 1,
    "data": {
        "source": "synthetic",
        "image_size": 16,
        "sites": [
            {"name": "a", "n_train": 24, "n_val": 8, "n_test": 10, "prevalence": 0.5},
            {"name": "b", "n_train": 16, "n_val": 8, "n_test": 10, "prevalence": 0.4},
        ],
    },
    "model": {"name": "small_cnn", "width": 4},
    "task": {"labels": "binary"},
    "train": {"batch_size": 8, "lr": 0.05},
}


def _job(tmp_path: Path, tracking: dict | None, **over):
    body = {**JOB, "output": str(tmp_path / "run"), **over}
    if tracking is not None:
        body["tracking"] = tracking
    return parse_job(body)


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- the job section


def test_tracking_stays_out_of_the_hash_the_saved_job_and_what_sites_get():
    plain = parse_job({**JOB, "output": "runs/x"})
    tracked = parse_job({**JOB, "output": "runs/x",
                         "tracking": {"tensorboard": True, "mlflow": {"uri": "http://u:secret@host:5000"}}})
    assert tracked.tracking.tensorboard and tracked.tracking.mlflow.uri == "http://u:secret@host:5000"
    assert tracked.job_hash() == plain.job_hash()
    assert "tracking" not in tracked.model_dump(mode="json") and "secret" not in tracked.to_yaml()
    assert tracked.model_copy(update={"rounds": 3}).tracking == tracked.tracking  # kept on the job itself


@pytest.mark.parametrize("section, message", [
    ({"tensorboard": "yes"}, "tracking.tensorboard: input should be a valid boolean"),
    ({"mlflow": {"url": "x"}}, "tracking.mlflow.url: is not a known field"),
    ({"mlflow": {"uri": "http://host /x"}}, "tracking.mlflow.uri: must be a URI without spaces"),
    ({"mlflow": {"experiment": ""}}, "tracking.mlflow.experiment"),
])
def test_a_bad_tracking_section_names_the_field(section, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        parse_job({**JOB, "output": "runs/x", "tracking": section})


@pytest.mark.parametrize("extra", ["tensorboard", "mlflow"])
def test_a_missing_extra_is_named_by_validate_and_before_a_run(tmp_path, monkeypatch, extra):
    real = external.importlib.util.find_spec
    monkeypatch.setattr(external.importlib.util, "find_spec", lambda name: None if name == extra else real(name))
    section = {"tensorboard": True} if extra == "tensorboard" else {"mlflow": {}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({**JOB, "output": str(tmp_path / "run"), "tracking": section}))
    res = CliRunner().invoke(app, ["validate", str(path)])
    assert res.exit_code == 2
    assert f"tracking.{extra}: needs the optional package '{extra}'" in res.output
    assert f'pip install -e ".[{extra}]"' in " ".join(res.output.split())
    with pytest.raises(ConfigError, match=rf"\.\[{extra}\]"):
        run_job(_job(tmp_path, section))
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob(".run.partial-*"))


# --------------------------------------------------------------------------- the interface


class _Fake:
    def __init__(self, fail_on: str | None = None):
        self.fail_on, self.seen, self.finished = fail_on, [], None

    def start(self, job, run_dir):
        if self.fail_on == "start":
            raise ConfigError("cannot start")

    def record(self, record):
        if self.fail_on == "record":
            raise RuntimeError("store gone")
        self.seen.append(record)

    def finish(self, run_dir, error=None):
        self.finished = ("failed", str(error)) if error is not None else ("done", None)

    def describe(self):
        return {}


def test_a_tracker_that_fails_is_logged_and_dropped_and_the_others_go_on(tmp_path, caplog):
    good, bad = _Fake(), _Fake(fail_on="record")
    trackers = Trackers([bad, good])
    trackers.start(None, tmp_path)
    rec = {"round": 1, "arm": "federated", "site": "a", "split": "test", "metric": "auc", "value": 0.5}
    trackers.record(rec)
    trackers.record(rec)
    trackers.finish(tmp_path)
    assert good.seen == [rec, rec] and good.finished == ("done", None)
    assert bad.finished is None  # dropped at its first failure
    assert "_Fake failed in record (RuntimeError: store gone)" in caplog.text


def test_a_tracker_that_cannot_start_stops_the_run_and_closes_the_others(tmp_path):
    first, second = _Fake(), _Fake(fail_on="start")
    with pytest.raises(ConfigError, match="cannot start"):
        Trackers([first, second]).start(None, tmp_path)
    assert first.finished == ("failed", "cannot start")


def test_flatten_gives_dotted_keys_and_keeps_plain_lists_whole():
    assert flatten({"train": {"lr": 0.05, "nesterov": False}, "compare": ["local"], "robust": None,
                    "data": {"sites": [{"name": "a"}, {"name": "b"}]}}) == {
        "train.lr": "0.05", "train.nesterov": "false", "compare": '["local"]', "robust": "null",
        "data.sites.0.name": "a", "data.sites.1.name": "b"}
    assert metric_tag({"arm": "local", "split": "val", "metric": "auc", "site": "b"}) == "local/val/auc/b"


# --------------------------------------------------------------------------- the tools


def test_tensorboard_gets_every_record_as_a_scalar_and_the_job_as_text(tmp_path):
    pytest.importorskip("tensorboard", reason='TensorBoard is an optional extra: pip install -e ".[tensorboard]"')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = run_job(_job(tmp_path, {"tensorboard": True})).run_dir
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("federated/test/auc/a", "federated/test/auc/b", "federated/val/auc/all", "federated/test/loss/median",
                "federated/train/loss/a", "federated/train/bytes_sent/b", "federated/train/model_bytes/all"):
        assert tag in scalars, tag
    expected = {metric_tag(r) for r in _records(run) if r["value"] is not None}
    assert scalars == expected
    auc_a = {r["round"]: r["value"] for r in _records(run) if metric_tag(r) == "federated/test/auc/a"}
    got = {s.step: s.value for s in events.Scalars("federated/test/auc/a")}
    assert got.keys() == {1, 2} and all(abs(got[k] - auc_a[k]) < 1e-6 for k in got)
    assert "job/text_summary" in events.Tags()["tensors"]
    assert json.loads((run / "run.json").read_text())["tracking"] == {"tensorboard": "tensorboard"}


def test_tensorboard_gets_epsilon_per_round_with_dp(tmp_path):
    pytest.importorskip("tensorboard", reason='TensorBoard is an optional extra: pip install -e ".[tensorboard]"')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    job = _job(tmp_path, {"tensorboard": True}, model={"name": "small_cnn", "width": 4, "norm": "group"},
               privacy={"dp": {"noise_multiplier": 1.0, "clip": 1.0, "delta": 1e-5}})
    run = run_job(job).run_dir
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    eps = events.Scalars("federated/train/epsilon/all")
    assert [s.step for s in eps] == [1, 2] and 0 < eps[0].value < eps[1].value


def test_mlflow_local_store_gets_params_metrics_per_round_and_artifacts(tmp_path):
    pytest.importorskip("mlflow", reason='MLflow is an optional extra: pip install -e ".[mlflow]"')
    from mlflow.tracking import MlflowClient

    job = _job(tmp_path, {"mlflow": {}}, compare=["local"])
    run = run_job(job).run_dir
    assert (tmp_path / "mlflow.db").is_file() and not (run / "mlflow.db").exists()  # next to the run folder
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny-tracked")  # the job's name by default
    (found,) = client.search_runs([exp.experiment_id])
    assert found.info.status == "FINISHED" and found.info.run_name == "run"
    assert found.info.run_id == json.loads((run / "run.json").read_text())["tracking"]["mlflow"]["run_id"]
    params = found.data.params
    assert params["rounds"] == "2" and params["train.lr"] == "0.05" and params["algorithm.name"] == "fedavg"
    assert params["data.sites.1.name"] == "b" and params["job_hash"] == job.job_hash()
    assert found.data.tags["medfed.job_hash"] == job.job_hash()
    history = client.get_metric_history(found.info.run_id, "federated/test/auc/a")
    expected = {r["round"]: r["value"] for r in _records(run) if metric_tag(r) == "federated/test/auc/a"}
    assert sorted(m.step for m in history) == [1, 2]
    assert all(abs(m.value - expected[m.step]) < 1e-9 for m in history)
    assert [m.step for m in client.get_metric_history(found.info.run_id, "local/test/auc/b")] == [1, 2]
    assert "federated/train/bytes_sent/a" in found.data.metrics
    artifacts = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"report.html", "metrics.jsonl", "run.json", "model_final.safetensors"} <= artifacts


def test_mlflow_marks_a_failed_run_failed_in_the_named_experiment(tmp_path):
    pytest.importorskip("mlflow", reason='MLflow is an optional extra: pip install -e ".[mlflow]"')
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    job = _job(tmp_path, {"mlflow": {"uri": uri, "experiment": "ablation"}})

    def stop(summary, _params):
        raise RuntimeError("power cut in round 1")

    with pytest.raises(RuntimeError, match="power cut"):
        run_job(job, on_round=stop)
    assert not (tmp_path / "run").exists()
    client = MlflowClient(uri)
    (found,) = client.search_runs([client.get_experiment_by_name("ablation").experiment_id])
    assert found.info.status == "FAILED"
    assert found.data.tags["medfed.error"] == "RuntimeError: power cut in round 1"
    assert {a.path for a in client.list_artifacts(found.info.run_id)} == {"run.log"}


def test_an_mlflow_server_that_does_not_answer_stops_the_run_before_the_data_is_read(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    job = _job(tmp_path, {"mlflow": {"uri": f"http://user:pw@127.0.0.1:{port}"}})
    with pytest.raises(ConfigError, match=rf"no MLflow server answers at 'http://127.0.0.1:{port}'"):
        run_job(job)
    assert not (tmp_path / "run").exists()


def test_a_server_that_answers_at_all_passes_the_probe():
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        external.probe_server(f"http://127.0.0.1:{server.server_port}")  # any HTTP answer: it is there
        external.probe_server("sqlite:///nowhere/mlflow.db")  # a local store: MLflow's to open
    finally:
        server.shutdown()
        server.server_close()


def test_a_deleted_mlflow_experiment_is_refused_before_training(tmp_path):
    pytest.importorskip("mlflow", reason='MLflow is an optional extra: pip install -e ".[mlflow]"')
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    client = MlflowClient(uri)
    client.delete_experiment(client.create_experiment("gone", artifact_location=(tmp_path / "art").as_uri()))
    trained = []
    with pytest.raises(ConfigError, match="experiment 'gone' was deleted there; restore it"):
        run_job(_job(tmp_path, {"mlflow": {"uri": uri, "experiment": "gone"}}), on_round=lambda *a: trained.append(a))
    assert not trained and not (tmp_path / "run").exists()
