"""Experiment trackers: a run's records also sent to TensorBoard and MLflow (the job's
``tracking`` section, optional extras ``tensorboard`` and ``mlflow``).

One small interface, :class:`Tracker`, sees the run at three moments: ``start`` (the run
folder exists, nothing has trained), ``record`` (each record as it is appended to
``metrics.jsonl``: every metric per round, arm, site and split, epsilon and bytes among
them) and ``finish`` (the run folder is complete, or the run failed). The run loop does
not know trackers exist: :class:`~medfed.tracking.metrics.MetricsWriter` hands each
record it writes to :class:`Trackers`, the job's trackers as one.

``metrics.jsonl`` stays the record of a run. A tracker that cannot start stops the run
before any training (an MLflow server that cannot be reached); one that fails later is
logged once and dropped, and the run goes on.

The tools are imported when a tracker starts, never by ``import medfed`` or the CLI.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from medfed.config import Job, MlflowConfig, TrackingConfig
from medfed.core.errors import ConfigError

log = logging.getLogger("medfed")

TENSORBOARD_DIR = "tensorboard"  # inside the run folder
MLFLOW_DB = "mlflow.db"  # the default store, next to the run folder
MLFLOW_ARTIFACTS = "mlartifacts"  # its artifact root, beside it
# what a finished run leaves in MLflow, when present; a failed run leaves run.log
ARTIFACTS = ("report.html", "metrics.jsonl", "run.json", "job.yaml", "sites.json",
             "model_final.safetensors", "model_final.json")


def metric_tag(record: dict) -> str:
    """``{arm}/{split}/{metric}/{site}``: the name of a record's series in either tool."""
    return f"{record['arm']}/{record['split']}/{record['metric']}/{record['site']}"


class Tracker(Protocol):
    """Where a run's results are also logged."""

    def start(self, job: Job, run_dir: Path) -> None:
        """Open the tool's run for ``job``, writing under ``run_dir`` if anywhere (the run
        folder, still in its staging place). Raises :class:`ConfigError` when it cannot."""

    def record(self, record: dict) -> None:
        """One metrics.jsonl record (round, arm, site, split, metric, value; value None where
        undefined), as it is written."""

    def finish(self, run_dir: Path, error: BaseException | None = None) -> None:
        """Close the tool's run: complete (``error`` None: the run folder is written) or
        failed with ``error``."""

    def describe(self) -> dict[str, Any]:
        """Where this run went, for run.json (no credentials)."""


def check_tracking(job: Job, reach: bool = False) -> None:
    """Refuse a ``tracking`` section whose tool is not installed, naming the extra that
    installs it: ``medfed validate`` and the start of a run, before any data is read.
    ``reach`` (the start of a run): an MLflow server named by an http(s) URI must answer
    (MLflow's own client would retry for minutes, after the data is read)."""
    tracking = job.tracking
    if tracking is None:
        return
    for extra in tracking.extras:  # the setting, its extra and its module share one name
        if importlib.util.find_spec(extra) is None:
            raise ConfigError(
                f"tracking.{extra}: needs the optional package '{extra}', which is not installed; install it "
                f'with pip install -e ".[{extra}]" in the medfed folder (or pip install {extra}), or remove '
                f"tracking.{extra}"
            )
    if reach and tracking.mlflow is not None and tracking.mlflow.uri is not None:
        probe_server(tracking.mlflow.uri)


def probe_server(uri: str, timeout: float = 10.0) -> None:
    """A ConfigError unless the server at an ``http(s)://`` ``uri`` answers (any HTTP status
    will do: it is there); other URIs are local stores, left to MLflow."""
    import urllib.error
    import urllib.request

    if urlsplit(uri).scheme not in ("http", "https"):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise ConfigError(f"tracking.mlflow.uri: no MLflow server answers at '{_redacted(uri)}' ({reason}); "
                          "start it, or correct the URI") from None


def build_trackers(job: Job, tags: dict[str, str] | None = None) -> Trackers:
    """The trackers the job's ``tracking`` section asks for (none without it); ``tags``
    are added to the MLflow run's own (``medfed loso`` names the site left out)."""
    tracking: TrackingConfig | None = job.tracking
    found: list[Tracker] = []
    if tracking is not None and tracking.tensorboard:
        found.append(TensorBoardTracker())
    if tracking is not None and tracking.mlflow is not None:
        found.append(MlflowTracker(tracking.mlflow, job.output.resolve(), tags))
    return Trackers(found)


def track_finished(job: Job, run_dir: Path, tags: dict[str, str] | None = None) -> bool:
    """Send a finished run folder to the job's trackers after the fact, record by record
    from its ``metrics.jsonl``, then its artifacts: what they would have received had they
    followed the run (``medfed loso`` builds its runs in a staging folder and moves them,
    so it tracks each one once it is in place). A tracker that cannot start or fails is
    logged, never raised: the run is done and its folder holds everything. True when
    every tracker got the whole run."""
    trackers = build_trackers(job, tags)
    if not trackers:
        return True
    try:
        trackers.start(job, run_dir)
    except Exception as e:  # ConfigError (the store refused), a tool that is gone
        log.warning("tracking: run '%s' not logged: %s", run_dir, e)
        return False
    asked = len(trackers.trackers)
    with (run_dir / "metrics.jsonl").open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                trackers.record(json.loads(line))
    kept = len(trackers.trackers)
    trackers.finish(run_dir)
    return kept == asked


class Trackers:
    """The job's trackers as one :class:`Tracker`. ``start`` raises (nothing has trained);
    after it, a tracker that fails is logged with the cause and left out from then on."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = list(trackers)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def start(self, job: Job, run_dir: Path) -> None:
        started: list[Tracker] = []
        for t in self.trackers:
            try:
                t.start(job, run_dir)
            except BaseException as e:
                for s in started:
                    self._call(s, "finish", run_dir, e)
                self.trackers = []
                raise
            started.append(t)

    def record(self, record: dict) -> None:
        for t in list(self.trackers):
            self._call(t, "record", record)

    def finish(self, run_dir: Path, error: BaseException | None = None) -> None:
        for t in list(self.trackers):
            self._call(t, "finish", run_dir, error)
        self.trackers = []

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for t in self.trackers:
            out |= t.describe()
        return out

    def _call(self, t: Tracker, method: str, *args: Any) -> None:
        try:
            getattr(t, method)(*args)
        except Exception as e:  # the run's own files hold everything: a tracker never stops a run that trains
            log.warning("tracking: %s failed in %s (%s: %s); it records nothing more for this run",
                        type(t).__name__, method, type(e).__name__, e)
            if t in self.trackers:
                self.trackers.remove(t)


# --------------------------------------------------------------------------- TensorBoard


class TensorBoardTracker:
    """Event files in ``RUN/tensorboard``: a scalar per record, tagged :func:`metric_tag`,
    at step = round (epsilon and bytes are records too: ``federated/train/epsilon/all``,
    ``federated/train/bytes_sent/<site>``), and the resolved job as text."""

    def __init__(self) -> None:
        self.writer: Any = None

    def start(self, job: Job, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR), flush_secs=10)
        code = "\n".join("    " + line for line in job.to_yaml().splitlines())  # markdown code block
        self.writer.add_text("job", f"job hash `{job.job_hash()}`\n\n{code}", global_step=0)

    def record(self, record: dict) -> None:
        if record["value"] is not None:
            self.writer.add_scalar(metric_tag(record), record["value"], global_step=record["round"])

    def finish(self, run_dir: Path, error: BaseException | None = None) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def describe(self) -> dict[str, Any]:
        return {"tensorboard": TENSORBOARD_DIR}


# --------------------------------------------------------------------------- MLflow

_MLFLOW_NAME = re.compile(r"[^\w./\- :]")  # what MLflow accepts in a metric or param name
MAX_PARAM_VALUE = 6000  # MLflow's limit on a parameter's value, in characters
BATCH = 100  # MLflow takes at most 100 params and 1000 metrics in one request


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """A dumped job as MLflow params: ``{"train.lr": "0.05", "data.sites.0.name": "a"}``;
    lists of plain values stay one param (``compare: ["local"]``)."""
    if isinstance(value, dict) and value:
        out: dict[str, str] = {}
        for k, v in value.items():
            out |= flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        out = {}
        for i, v in enumerate(value):
            out |= flatten(v, f"{prefix}.{i}")
        return out
    if isinstance(value, (list, dict)):
        return {prefix: json.dumps(value)}
    return {prefix: "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)}


def _safe_name(name: str) -> str:
    return _MLFLOW_NAME.sub("_", name)[:250]


def _redacted(uri: str) -> str:
    """``uri`` without user name and password."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


class MlflowTracker:
    """One MLflow run per medfed run, named after the run folder: the resolved job as
    params (flattened keys, plus ``job_hash``), every record as a metric named
    :func:`metric_tag` at step = round (one request per round and arm), and at the end
    the report, metrics, run.json, job and final model as artifacts; a failed run is
    marked FAILED with its error as the tag ``medfed.error`` and run.log as artifact."""

    def __init__(self, cfg: MlflowConfig, output: Path, tags: dict[str, str] | None = None):
        self.cfg, self.output = cfg, output
        self.tags = dict(tags or {})
        self.client: Any = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.experiment: str | None = None
        self._pending: list[Any] = []
        self._step: tuple[str, int] | None = None
        self._done = False

    @property
    def uri(self) -> str:
        """The tracking URI: as set, or a SQLite store next to the run folder."""
        return self.cfg.uri or f"sqlite:///{self.output.parent / MLFLOW_DB}"

    def _artifacts(self) -> str | None:
        """Where a new experiment keeps its artifacts: ``mlartifacts/`` beside a local SQLite
        store (MLflow's own default is the current folder); else the store's choice."""
        uri = self.uri
        if not uri.startswith("sqlite:///"):
            return None
        db = uri[len("sqlite:///"):].split("?", 1)[0]
        if db in ("", ":memory:"):
            return None
        return (Path(db).resolve().parent / MLFLOW_ARTIFACTS).as_uri()

    def start(self, job: Job, run_dir: Path) -> None:
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        from medfed import __version__

        self.experiment = self.cfg.experiment or job.name
        where = f"tracking.mlflow: MLflow store '{_redacted(self.uri)}'"
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is not None and exp.lifecycle_stage == "deleted":
                raise ConfigError(f"{where}: experiment '{self.experiment}' was deleted there; restore it "
                                  "(mlflow experiments restore) or set tracking.mlflow.experiment")
            if exp is None:
                self.experiment_id = self.client.create_experiment(self.experiment, artifact_location=self._artifacts())
            else:
                self.experiment_id = exp.experiment_id
            tags = {"medfed.job_name": job.name, "medfed.job_hash": job.job_hash(),
                    "medfed.algorithm": job.algorithm.name, "medfed.run_dir": str(self.output),
                    "medfed.version": __version__} | self.tags
            run = self.client.create_run(self.experiment_id, run_name=self.output.name, tags=tags)
            self.run_id = run.info.run_id
            params = flatten(job.model_dump(mode="json")) | {"job_hash": job.job_hash()}
            items = [Param(_safe_name(k), v[:MAX_PARAM_VALUE]) for k, v in params.items()]
            for i in range(0, len(items), BATCH):
                self.client.log_batch(self.run_id, params=items[i:i + BATCH])
        except ConfigError:
            raise
        except Exception as e:  # MlflowException, a server that stops answering (requests' errors), a disk...
            if self.run_id is not None:  # created, but its params could not be logged: not left RUNNING
                self._done = True
                try:
                    self.client.set_terminated(self.run_id, "FAILED")
                except Exception:
                    pass
            cause = str(e) if isinstance(e, (MlflowException, OSError, ValueError)) else f"{type(e).__name__}: {e}"
            raise ConfigError(f"{where}: cannot start a run in experiment '{self.experiment}': {cause}") from None

    def record(self, record: dict) -> None:
        from mlflow.entities import Metric

        step = (record["arm"], record["round"])
        if self._step is not None and step != self._step:
            self._flush()
        self._step = step
        if record["value"] is not None:
            self._pending.append(Metric(_safe_name(metric_tag(record)), float(record["value"]),
                                        int(time.time() * 1000), record["round"]))
        if len(self._pending) >= 10 * BATCH:
            self._flush()

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending:
            self.client.log_batch(self.run_id, metrics=pending)

    def finish(self, run_dir: Path, error: BaseException | None = None) -> None:
        if self.run_id is None or self._done:
            return
        self._done = True
        self._flush()
        for name in ARTIFACTS if error is None else ("run.log",):
            if (run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / name))
        if error is not None:
            self.client.set_tag(self.run_id, "medfed.error", f"{type(error).__name__}: {error}"[:5000])
        status = "FINISHED" if error is None else "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        self.client.set_terminated(self.run_id, status)

    def describe(self) -> dict[str, Any]:
        return {"mlflow": {"uri": _redacted(self.uri), "experiment": self.experiment,
                           "experiment_id": self.experiment_id, "run_id": self.run_id}}
