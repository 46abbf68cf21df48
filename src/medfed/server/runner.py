"""A whole run: the run folder, the data, the transport, the federation and baselines.

Nothing half-written: the run is built in a hidden staging folder next to the output
folder and moved into place only when everything, report included, is written. A run
that fails leaves the output folder as it was; one stopped or failed after a round keeps
its staging folder for ``--resume`` (server/rundir.py, server/resume.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from medfed import __version__
from medfed.config import Job, ModelConfig, with_init_hash
from medfed.core.errors import ConfigError, RunDirError
from medfed.core.summary import SiteSummary, sites_json
from medfed.core.types import Arm, Params
from medfed.data.base import SiteData
from medfed.models import (
    ModelFactory, build_model, build_user_model, check_input_size, check_model, get_params, model_fingerprint,
)
from medfed.server.baselines import run_centralized, run_finetuned, run_local, run_zero_filled
from medfed.core.files import PRIVATE, atomic_write_text
from medfed.server.checkpoint import STATE_FILE, model_record, save_checkpoint, save_state
from medfed.server.federation import build_federation
from medfed.server.contribution import contribution_tracker
from medfed.server.resume import StoppedRun, check_resumable, site_state_dir
from medfed.server.swarm import forget_swarm_states
from medfed.server.rundir import (  # noqa: F401 (RUN_MARKER, check_output: also imported from here)
    RUN_MARKER, check_output, check_replaceable, make_staging, move_into_place, stopped_runs, take_over,
)
from medfed.server.loop import RoundCallback, RoundSummary
from medfed.server.generalization import share_amplitudes
from medfed.server.topologies import train_federation
from medfed.site.device import resolve_device, set_threads
from medfed.tasks import build_task
from medfed.transport.base import CENTRALIZED_SITE, Transport, separate_sites_refusal

log = logging.getLogger("medfed")

@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    elapsed_s: float


def make_transport(
    job: Job, sites: list[SiteData], device: torch.device, factory: ModelFactory | None = None,
    state_dir: Path | None = None,
) -> Transport:
    """The transport of ``job``'s sites; ``state_dir``: where each site with algorithm state
    keeps it after every round (site/state.py), so that a stopped run can be resumed."""
    pooled = CENTRALIZED_SITE if "centralized" in job.compare else None
    if job.transport == "pool":
        from medfed.transport.pool import PoolTransport

        return PoolTransport(job, pooled=pooled, state_dir=state_dir)
    if job.transport == "ray":  # the actors build their sites' data: ``sites`` is not used
        from medfed.transport.ray import RayTransport

        return RayTransport(job, pooled=pooled)
    from medfed.site.app import build_site_apps
    from medfed.transport.inprocess import InProcessTransport

    return InProcessTransport(build_site_apps(job, sites, device, pooled_name=pooled, factory=factory,
                                              state_dir=state_dir))


def initial_model(
    job: Job, in_channels: int, spatial_dims: int = 2, factory: ModelFactory | None = None
) -> nn.Module:
    """The common starting point of every arm: the job's network (or ``factory``'s, for a
    run from Python) built from the job seed and, with ``model.init``, loaded with that
    file's weights (what did not match, under ``init_keys: partial``, is logged as a table
    to run.log)."""
    from medfed.weights import load_init

    torch.manual_seed(job.seed)
    if factory is not None:
        model = build_user_model(factory)
    else:
        model = build_model(job.model, job.task, in_channels, spatial_dims=spatial_dims)
    _check_norm_layers(job, model, user=factory is not None)
    if job.model.init is not None:
        report = load_init(model, job.model)
        total = len(model.state_dict())
        log.info("%s (init_keys: %s)", report.summary(total), job.model.init_keys)
        if not report.complete:  # one record a line: run.log escapes line breaks inside a record
            log.info("model.init: the entries not loaded from the file:")
            for line in report.table().splitlines():
                log.info("%s", line)
    return model


def _check_norm_layers(job: Job, model: nn.Module, user: bool = False) -> None:
    """Site-level DP and batch norm, for a network known only once built (a MONAI class or
    a factory; the job schema checks medfed's own by name)."""
    if job.privacy.dp is None or job.algorithm.name == "fedbn" or (isinstance(job.model, ModelConfig) and not user):
        return
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ConfigError(
            f"model: site-level DP adds noise to every entry the sites share, batch-norm running variances included, "
            f"which it can drive below zero; {job.model.label} has batch-norm layers: use a network with group or "
            "instance norm, or algorithm fedbn (batch-norm layers stay at each site)"
        )





class _RunLogHandler(logging.FileHandler):
    """run.log: a record that cannot be written (disk full, folder gone) is dropped with one
    line on stderr, not a traceback per record."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if not self.failed:
            self.failed = True
            sys.stderr.write(f"medfed: cannot write {self.baseFilename}; later log records are not in it\n")


def open_run_log(folder: Path, private: bool = False) -> logging.Handler:
    """Send medfed's INFO log to ``folder/run.log`` (appended to if it exists); ``private``:
    readable by the run's user only (a deployment's log names sites and their addresses)."""
    path = folder / "run.log"
    if private:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0), PRIVATE))
    handler = _RunLogHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S"))
    handler.setLevel(logging.INFO)
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)
    log.addHandler(handler)
    return handler


def close_run_log(handler: logging.Handler) -> None:
    log.removeHandler(handler)
    handler.close()


class _BestTracker:
    """Checkpoints the federated model after every round and keeps the best on val."""

    def __init__(self, run_dir: Path, job: Job):
        self.run_dir, self.job = run_dir, job
        self.metric = f"val_{job.task.monitor}"
        self.best: float | None = None
        # hashed once: the hash serializes the whole job, every site of it, and a round must not grow with them
        self.job_hash = job.job_hash()

    def __call__(self, s: RoundSummary, params: Params) -> None:
        if s.arm is not Arm.FEDERATED:
            return
        value = s.means.get("val", {}).get(self.job.task.monitor)
        meta = {"round": s.round, "arm": s.arm.value, "metric": self.metric, "value": value,
                "job_hash": self.job_hash}
        save_checkpoint(self.run_dir / "model_final", params, meta)
        if value is not None and (self.best is None or value > self.best):
            self.best = value
            save_checkpoint(self.run_dir / "model_best", params, meta)

    def finish(self) -> None:
        if self.best is None:  # no defined val metric in any round: the final model is the best we know
            for ext in (".safetensors", ".json"):
                shutil.copyfile(self.run_dir / f"model_final{ext}", self.run_dir / f"model_best{ext}")


def run_job(
    job: Job,
    overwrite: bool = False,
    on_round: RoundCallback | None = None,
    on_sites: Callable[[list[SiteSummary]], None] | None = None,
    *,
    sites: list[SiteData] | None = None,
    model_factory: ModelFactory | None = None,
    resume: bool = False,
) -> RunResult:
    """Run the federation and the baselines of ``job``; return where the run was written.
    ``resume``: continue the run into the job's output that was stopped (killed, power
    loss, Ctrl-C) after its last saved round (server/resume.py).

    From Python (:func:`medfed.run`): ``sites`` replaces the job's data source (in the
    job's site order, each checked by :func:`~medfed.data.sites.check_site`), and
    ``model_factory`` the job's network; neither can cross to the processes of
    ``transport: pool`` or ``ray``."""
    from medfed.data.sites import build_sites, describe_sites
    from medfed.tracking.external import build_trackers, check_tracking
    from medfed.tracking.contribution import write_contribution
    from medfed.tracking.metrics import MetricsWriter
    from medfed.tracking.report import write_report

    job = with_init_hash(job)  # the init file's hash, for a job built without parse_job
    given = sites is not None
    output = job.output.resolve()
    check_replaceable(output)
    check_output(output, overwrite)
    if resume:
        check_resumable(job, from_python=sites is not None or model_factory is not None)
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    set_threads(job.num_threads)
    device = resolve_device(job.device)
    if job.transport != "inprocess" and (sites is not None or model_factory is not None):
        raise ConfigError(separate_sites_refusal(job.transport))
    if model_factory is None:
        check_model(job.model)  # a MONAI class's or a factory's arguments, before the data is read
    elif job.model.init is not None or job.model.freeze:
        raise ConfigError(
            "model.init and model.freeze apply to the job's own network, but medfed.run was given model=: load "
            "the weights and turn off requires_grad inside the factory, or leave model= out"
        )
    build_task(job)  # an imported task.loss is found and built, before the data is read
    check_tracking(job, reach=True)  # the tracking tools installed, a server answering: before the data is read
    remote = None  # transport: ray: its actors build the sites' data where they run; this process reads none
    if sites is None and job.transport == "ray":
        remote, summary = _remote_sites(job)
    else:
        if sites is None:
            sites = build_sites(job)  # data errors surface before anything is written
        else:
            _check_given_sites(job, sites)
        summary = describe_sites(sites, job.task, job.held_out)
    patch = tuple(job.transforms.patch) if job.transforms.patch is not None else None
    if model_factory is None:
        check_input_size(job.model, tuple(summary[0].shape[1:]), patch)
    if on_sites is not None:
        on_sites(summary)

    staging = take_over(output) if resume else make_staging(output, "the run folder")
    handler = open_run_log(staging)
    if not resume:
        _hint_stopped(output)
    trackers = build_trackers(job)
    try:
        for row in summary:
            if row.skipped:
                log.warning(
                    "site '%s': %d unreadable file(s) skipped (on_bad_file: skip): %s", row.name, row.skipped,
                    "; ".join(f"{f.file} ({f.reason})" for f in row.skipped_files),
                )
        stopped = StoppedRun.read(staging, job) if resume else None  # before metrics.jsonl is opened
        atomic_write_text(staging / "job.yaml", job.to_yaml())
        atomic_write_text(staging / "sites.json", sites_json(summary))
        trackers.start(job, staging)  # TensorBoard, MLflow: before any training
        model = initial_model(job, summary[0].shape[0], len(summary[0].shape) - 1, model_factory)
        init = get_params(model)
        tracker = _BestTracker(staging, job)
        if stopped is not None:
            tracker.best = stopped.best

        def callback(s: RoundSummary, params: Params) -> None:
            tracker(s, params)
            if s.arm is Arm.FEDERATED:  # the resume point, after the best model (never ahead of it)
                save_state(staging, s.round, params, federation.algorithm.server_state(), tracker.job_hash)
            if on_round is not None:
                on_round(s, params)

        sizes = {row.name: row.train for row in summary}
        with (
            MetricsWriter(staging / "metrics.jsonl", on_record=trackers.record if trackers else None) as metrics,
            remote if remote is not None else make_transport(job, sites, device, model_factory, site_state_dir(staging)) as transport,
        ):
            # DP noise drawn from the job seed: a simulation is repeatable run after run
            federation = build_federation(job, model, transport, sizes, noise_seed=job.seed)
            share_amplitudes(job, transport, tuple(summary[0].shape))  # FedDG's bank, before round 1
            contribution = contribution_tracker(job, federation, transport)  # None unless the job asks for it
            start, params = 1, init
            if job.pretrain is not None:  # the self-supervised stage first: the federated arm starts from its encoder
                from medfed.server.pretrain import run_pretrain

                params = run_pretrain(job, sites or [], model, device, metrics.write, given=given)
            if stopped is not None:
                stopped.restore(federation)
                start, params = stopped.done + 1, stopped.params if stopped.params is not None else init
            final = train_federation(federation, transport, params, metrics.write, callback, start,
                                     on_updates=contribution.observe if contribution is not None else None,
                                     state_dir=staging)
            if contribution is not None:
                write_contribution(staging, contribution.result())
            tracker.finish()
            if "finetuned" in job.compare:
                run_finetuned(job, transport, final, metrics.write, callback)
            if "local" in job.compare:
                run_local(job, transport, init, metrics.write, callback)
            if "centralized" in job.compare:
                run_centralized(job, transport, init, metrics.write, callback)
            if job.task.kind == "reconstruction":
                run_zero_filled(job, transport, init, metrics.write)
            if remote is not None and job.task.kind == "segmentation" and job.task.save_predictions > 0:
                from medfed.tracking.predictions import PREDICTIONS_DIR

                remote.save_predictions(final, staging / PREDICTIONS_DIR, job.task.save_predictions, job.round_timeout)
        if sites is not None and job.task.kind == "segmentation" and job.task.save_predictions > 0:
            from medfed.tracking.predictions import PREDICTIONS_DIR, save_predictions

            model.load_state_dict(final)
            model.to(device)
            save_predictions(model, sites, build_task(job), staging / PREDICTIONS_DIR, job.task.save_predictions, device)
        if job.task.kind == "reconstruction" and job.task.save_predictions > 0:
            from medfed.tracking.reconstructions import RECONSTRUCTIONS_DIR, save_reconstructions

            model.load_state_dict(final)
            model.to(device)
            save_reconstructions(model, sites, staging / RECONSTRUCTIONS_DIR, job.task.save_predictions, device)
        elapsed = time.perf_counter() - t0
        marker = {"status": "complete", "medfed_version": __version__, "job_hash": job.job_hash(),
                  "started": started.isoformat(), "finished": datetime.now(timezone.utc).isoformat(),
                  "elapsed_s": round(elapsed, 3), "rounds": job.rounds}
        if model_factory is None:  # the network the job names, and what its weights and code were
            marker.update(model_record(job))
        else:  # the job's model section did not say which network trained
            marker["user_model"] = {"class": type(model).__name__, "fingerprint": model_fingerprint(model)}
        if given:  # nor did its data section say which data
            marker["user_datasets"] = True
        if trackers:  # where the run was also logged
            marker["tracking"] = trackers.describe()
        if resume:
            marker["resumed"] = True
        # what only a stopped run needs goes: the resume point and the sites' saved state
        (staging / STATE_FILE).unlink(missing_ok=True)
        shutil.rmtree(site_state_dir(staging), ignore_errors=True)
        forget_swarm_states(staging)
        atomic_write_text(staging / RUN_MARKER, json.dumps(marker, indent=2) + "\n")
        write_report(staging)
        trackers.finish(staging)  # the report, metrics and final model as artifacts
    except BaseException as e:
        trackers.finish(staging, e)  # the tool's run marked failed
        # stopped by the user, or failed after a round was saved (or while resuming): what was
        # done is kept for --resume; a disk error or a failure before round 1 leaves nothing
        if isinstance(e, KeyboardInterrupt) or (
                not isinstance(e, OSError) and (resume or (staging / STATE_FILE).exists())):
            log.warning("%s; the rounds done so far are kept in '%s': `medfed run JOB -o %s --resume` goes on",
                        "stopped" if isinstance(e, KeyboardInterrupt) else "failed", staging, output)
            close_run_log(handler)
            raise
        close_run_log(handler)
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError):  # disk full, folder made read-only or removed while the run went on
            raise RunDirError(f"cannot write the run next to '{output}': {e}; nothing was written") from None
        raise
    close_run_log(handler)
    try:
        move_into_place(staging, output)
    except OSError as e:
        raise RunDirError(f"cannot move the finished run into '{output}': {e}; it is left in '{staging}'") from None
    return RunResult(run_dir=output, elapsed_s=time.perf_counter() - t0)


def _hint_stopped(output: Path) -> None:
    """Say where a stopped run of ``output`` is kept, which this fresh run does not touch."""
    try:
        stopped = stopped_runs(output)
    except RunDirError:
        return
    if stopped:
        log.warning("a stopped run of '%s' is kept in '%s'; this run starts afresh (--resume would have continued "
                    "it; remove the folder when it is not needed)", output, stopped[0])


def _remote_sites(job: Job) -> tuple:
    """``transport: ray``: the transport, whose actors build their sites' data where they
    run, and each site's summary from them (once built); this process reads no data."""
    from medfed.transport.ray import RayTransport

    transport = make_transport(job, [], torch.device("cpu"))
    assert isinstance(transport, RayTransport)
    try:
        return transport, transport.summaries(job.round_timeout)
    except BaseException:
        transport.close()
        raise


def _check_given_sites(job: Job, sites: list[SiteData]) -> None:
    """Sites handed over from Python: exactly the job's sites, in its order, each valid."""
    from medfed.data.sites import check_site

    names = [s.name for s in sites]
    if names != list(job.site_names):
        raise ConfigError(f"datasets: the sites given are {names}, but the job's sites are {job.site_names}")
    for site in sites:
        check_site(site, job.task)
