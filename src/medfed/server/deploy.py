"""A deployed run (``medfed server``): the same round loop, sites reached over gRPC.

Unlike a simulated run, a deployed run writes straight into its run folder as it goes,
because it must survive the server being killed: ``state.sqlite`` holds the rounds,
participants, audit trail and metrics; ``state.safetensors`` the global model and the
server rule's state after the last completed round. ``--resume`` continues at the round
after it. ``run.json`` marks a finished run. Only a finished run tells the sites the job is done;
a server that fails or is killed leaves them retrying, so that ``--resume`` finds them.
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING


from medfed import __version__
from medfed.algorithms import Algorithm
from medfed.config import Job, with_init_hash
from medfed.core.errors import RoundError, RunDirError
from medfed.core.modelspec import ModelSpec
from medfed.core.summary import SiteSummary, sites_json
from medfed.core.types import Arm, Metric, Params
from medfed.models import check_input_size, check_model, get_params
from medfed.server import admission
from medfed.server.baselines import run_finetuned, run_local, run_zero_filled
from medfed.core.files import PRIVATE, atomic_write_text
from medfed.server.deployable import check_deployable
from medfed.server.checkpoint import STATE_FILE, load_checkpoint, load_state, model_record, save_state
from medfed.server.federation import Federation, build_federation
from medfed.server.loop import Recorder, RoundCallback, RoundSummary, run_federated
from medfed.server.runner import (
    RUN_MARKER,
    RunResult,
    _BestTracker,
    check_output,
    close_run_log,
    initial_model,
    open_run_log,
)
from medfed.server.store import STORE_NAME, RunStore
from medfed.server.update_path import ledger_for
from medfed.transport.pki import Kit

if TYPE_CHECKING:
    import tenseal as ts

    from medfed.server.relay import RelayState
    from medfed.tracking.external import Trackers
    from medfed.transport.grpc.dispatch import HubHost
    from medfed.transport.grpc.hub import Hub
    from medfed.transport.grpc.transport import GrpcTransport
    from medfed.transport.pki.revocation import Revocations

log = logging.getLogger("medfed")

def _prepare_folder(output: Path, resume: bool) -> None:
    if not resume:
        if (output / STORE_NAME).is_file():
            raise RunDirError(f"'{output}' holds a deployed run that did not finish; continue it with --resume, "
                              "or choose another output")
        check_output(output, overwrite=False)
        try:  # the run folder holds the audit trail: only the server's user may read it
            output.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise RunDirError(f"cannot create the run folder '{output}': {e.strerror or e}") from None
        return
    if not (output / STORE_NAME).is_file():
        raise RunDirError(f"nothing to resume in '{output}': it holds no {STORE_NAME}; start without --resume")
    if (output / RUN_MARKER).exists():
        raise RunDirError(f"the run in '{output}' is complete; nothing to resume")


def resume_point(output: Path, job: Job, store: RunStore, algorithm: Algorithm,
                 tracker: _BestTracker) -> tuple[int, Params | None]:
    """Where a resumed run goes on: (the last round saved, its global model), or (0, None)
    when the server stopped before it saved one. The server rule's state is restored, the
    best value so far too, and the rounds after the one saved are forgotten (their metrics
    deleted, their accepted updates marked ``redone``) so that they are redone, even when
    the server stopped after it accepted updates but before it saved the round."""
    done, params = 0, None
    if (output / STATE_FILE).exists():
        done, params, algo_state = load_state(output, job.job_hash())
        try:
            algorithm.load_server_state(algo_state)
        except ValueError as e:
            raise RunDirError(f"'{output / STATE_FILE}' does not fit the job's algorithm: {e}") from None
        if (output / "model_best.json").exists():
            _, best_meta = load_checkpoint(output / "model_best")
            tracker.best = best_meta.get("value")
        log.info("resuming job '%s' after round %d of %d", job.name, done, job.rounds)
    else:
        log.info("resuming job '%s' from round 1: it stopped before a round was saved", job.name)
    # what the rounds about to be redone released counts again in the privacy ledger
    again = store.add_released_again(store.released_after(Arm.FEDERATED.value, done))
    if again and (job.privacy.dp is not None or job.privacy.dp_sgd is not None):
        log.warning("privacy: %d round(s) released before a crash and redone count twice in the privacy ledger",
                    again)
    for arm in (Arm.FEDERATED, Arm.PERSONALIZED):
        store.drop_after(arm.value, done)
    return done, params


def _forget_fresh_run(output: Path, created: bool) -> None:
    """Remove what a new run that stopped before its first round wrote: with no round
    done there is nothing to resume, and a run folder left behind would ask for --resume."""
    if created:
        shutil.rmtree(output, ignore_errors=True)
        return
    for name in (STORE_NAME, STORE_NAME + "-wal", STORE_NAME + "-shm", STORE_NAME + "-journal", "job.yaml",
                 "run.log", "sites.json"):
        (output / name).unlink(missing_ok=True)


def serve_job(
    job: Job,
    kit: Kit,
    resume: bool = False,
    listen: str | None = None,
    join_timeout: float | None = None,
    on_round: RoundCallback | None = None,
    on_sites: Callable[[list[str], list[str]], None] | None = None,
    he_context: Path | None = None,
    host: HubHost | None = None,
) -> RunResult:
    """Serve ``job`` to the consortium's sites and run it; return the run folder.
    ``he_context``: the consortium's public CKKS context (``he-public.ctx``), for a job
    with ``privacy.he``.

    ``kit`` is the server's startup kit (see transport/pki.py); ``listen`` the address
    to bind (default ``0.0.0.0:<kit port>``). The server waits up to ``join_timeout``
    seconds (default: the round timeout) for the job's sites to join and report their
    data, then starts if at least the quorum of training sites is there.

    A new run that stops before its first round is done (the port is taken, too few sites
    joined) leaves nothing behind; one that stops later keeps its state for ``--resume``.
    A run folder that cannot be written (disk full, read-only) is a RunDirError that says
    so, not a traceback.

    ``host``: a gRPC server that outlives the job (a queue server's, server/queue_server.py)
    serves the job's hub while it runs; without one, the job listens on its own and stops
    listening when it ends."""
    he_key = check_deployable(job, he_context)  # before anything is written or awaited
    job = with_init_hash(job)  # the init file's hash, for a job built without parse_job
    check_model(job.model)  # a MONAI class's or a factory's arguments, before any site is awaited
    from medfed.tracking.external import check_tracking

    check_tracking(job, reach=True)  # the tracking tools installed, a server answering: before any site is awaited
    output = job.output.resolve()
    created = not output.exists()
    from medfed.transport.pki.revocation import CRL_FILE, Revocations

    revocations = Revocations(kit.path / CRL_FILE, kit.ca_pem)  # a list the CA did not sign: refused here
    _prepare_folder(output, resume)
    try:
        return _serve(job, kit, output, resume, listen, join_timeout, on_round, on_sites, he_key, revocations, host)
    except BaseException as e:
        fresh = not resume and not (output / STATE_FILE).exists()
        if fresh:
            _forget_fresh_run(output, created)
        if isinstance(e, (OSError, sqlite3.Error)):
            after = ("" if fresh else "; the rounds done so far are saved: fix the folder, then continue with "
                     "--resume")
            log.error("cannot write the run folder '%s': %s", output, e)
            raise RunDirError(f"cannot write the run folder '{output}': {e}{after}") from None
        raise


def _recording(store: RunStore, trackers: Trackers) -> Callable[[int, str, str, str, str, float | None], None]:
    """The round loop's recorder: each value into ``store`` and to the job's trackers."""

    from medfed.tracking.metrics import metric_record

    def record(rnd: int, arm: str, site: str, split: str, metric: str, value: float | None) -> None:
        store.write_metric(rnd, arm, site, split, metric, value)
        if trackers:
            trackers.record(metric_record(rnd, arm, site, split, metric, value))

    return record


def _relay_resume_point(output: Path, job: Job, store: RunStore) -> RelayState:
    """Where a resumed relayed run goes on: the relay's state after its last saved round
    (no model: the sites hold them); the rounds after it are forgotten and redone."""
    from medfed.server.relay import RelayState

    state = RelayState.load(output)
    log.info("resuming job '%s' (%s) after round %d of %d", job.name, job.topology.label, state.done, job.rounds)
    again = store.add_released_again(store.released_after(Arm.FEDERATED.value, state.done))
    if again and job.privacy.dp_sgd is not None:
        log.warning("privacy: %d round(s) released before a crash and redone count twice in the privacy ledger",
                    again)
    for arm in (Arm.FEDERATED, Arm.PERSONALIZED):
        store.drop_after(arm.value, state.done)
    return state


def _run_relayed(federation: Federation, transport: GrpcTransport, hub: Hub, init_params: Params,
                 rows: list[SiteSummary], record: Recorder, on_round: RoundCallback | None, state: RelayState | None,
                 output: Path, store: RunStore) -> None:
    """The rounds of a cyclic or swarm topology, the server relaying the sealed models
    (server/relay.py); its state saved after every round, for ``--resume``."""
    from medfed.core.params import nbytes
    from medfed.core.types import Split
    from medfed.server.relay import RELAY_STATE, Relay, run_cyclic_relayed, run_swarm_relayed

    relay = Relay(federation, transport, nbytes(init_params), hub.certificates(),
                  {r.name: {Split.VAL: r.val, Split.TEST: r.test} for r in rows}, {r.name: r.train for r in rows})

    def saved(s: RelayState) -> None:
        s.save(output)
        store.round_completed(Arm.FEDERATED.value, s.done, RELAY_STATE, time.time())

    def reported(s: RoundSummary, _params: Params) -> None:
        if on_round is not None:
            on_round(s, _params)

    loop = run_cyclic_relayed if federation.job.topology.kind == "cyclic" else run_swarm_relayed
    loop(federation, relay, init_params, record, reported, state, saved)
    log.info("the model stays at the sites (%s): the server never held it", federation.job.topology.label)


def _serve(job: Job, kit: Kit, output: Path, resume: bool, listen: str | None, join_timeout: float | None,
           on_round: RoundCallback | None, on_sites: Callable[[list[str], list[str]], None] | None,
           he_key: ts.Context | None = None, revocations: Revocations | None = None,
           host: HubHost | None = None) -> RunResult:
    from medfed.tracking.external import build_trackers
    from medfed.tracking.report import write_report
    from medfed.transport.grpc import wire
    from medfed.transport.grpc.hub import Hub
    from medfed.transport.grpc.transport import GrpcTransport, start_server

    t0 = time.perf_counter()
    started = datetime.now(timezone.utc)
    store = RunStore(output / STORE_NAME)
    handler = open_run_log(output, private=True)
    server = None
    attached: Hub | None = None  # the hub ``host`` serves
    trackers = build_trackers(job)  # TensorBoard, MLflow: started once the sites are there
    try:
        store.set_job(job.job_hash(), json.dumps(job.model_dump(mode="json")))
        atomic_write_text(output / "job.yaml", job.to_yaml(), mode=PRIVATE)
        members = admission.members(store, job) if resume else []  # read before this server's sites join
        hub = Hub(job, job.job_id, store, revocations)
        if host is None:
            creds = wire.server_credentials(kit.ca_pem, kit.cert_pem, kit.key_pem)
            address = listen or f"0.0.0.0:{kit.server_port}"
            server = start_server(hub, address, creds, len(job.site_names))
            log.info("server for job '%s' (%s) listening on %s%s", job.name, job.job_id, address,
                     " (resuming)" if resume else "")
        else:  # the queue server's sites reach this job's hub from now on
            host.attach(hub, job)
            attached = hub
            log.info("job '%s' (%s) serving from %s%s", job.name, job.job_id, output, " (resuming)" if resume else "")

        # ---- wait for the sites to join and describe their data: every site of the job, or,
        # when resuming, the sites that had joined the run before it stopped (so that it goes
        # on with the same sites as it would have without the stop)
        expected = members or list(job.site_names)  # members: only when they make the quorum
        wait_s = join_timeout or job.round_timeout
        if members:
            log.info("resuming: waiting up to %g s for the %d site(s) that had joined before the stop: %s",
                     wait_s, len(members), ", ".join(members))
        hub.wait_ready(expected, wait_s, (lambda r: on_sites(r, expected)) if on_sites else None)
        summaries = hub.summaries()
        left_out: dict[str, str] = {}
        model = None
        if summaries:  # a site whose images differ in shape from the others' is left out, with the reason
            shape, left_out = admission.common_shape(job, summaries)
            for site, why in left_out.items():
                hub.exclude(site, why)
            patch = tuple(job.transforms.patch) if job.transforms.patch is not None else None
            check_input_size(job.model, shape[1:], patch)
            # ---- the model: with model.init, the server's file, sent to the sites. A site that
            # built another one (other code installed there) is left out, naming the first difference
            model = initial_model(job, shape[0], len(shape) - 1)
            left_out |= hub.expect_model(ModelSpec.of(model.state_dict()), admission.model_hint(job))
            summaries = hub.summaries()
        ready = [s for s in job.site_names if s in summaries]
        missing = [s for s in job.site_names if s not in summaries]
        training = [s for s in job.training_sites if s in ready]
        if len(training) < job.quorum or model is None:
            raise RoundError(
                f"only {len(training)} training site(s) joined within {wait_s:g} s "
                f"(missing: {', '.join(missing)}); the quorum is {job.quorum}{admission.absences(hub.declined(), left_out)}"
            )
        gone = [s for s in members if s in missing]
        if gone:
            log.warning("resuming without site(s) %s, which had joined before the stop: not back within %g s; "
                        "they may join later", ", ".join(gone), wait_s)
        declined = hub.declined()
        later = [s for s in missing if s not in gone and s not in left_out]  # the left out never come back
        if [s for s in later if s in declined]:
            log.warning("starting without site(s) %s, which cannot take part in the job (see above): they may join "
                        "later, once fixed", ", ".join(s for s in later if s in declined))
        if [s for s in later if s not in declined]:
            log.warning("starting without site(s) %s: they may join later",
                        ", ".join(s for s in later if s not in declined))
        rows = admission.site_rows(job, summaries)
        atomic_write_text(output / "sites.json", sites_json(rows), mode=PRIVATE)

        # ---- the server rule and, when resuming, where the run stopped
        params = init_params = get_params(model)
        transport = GrpcTransport(hub)
        # DP noise from the OS: in a deployment nobody may know it in advance
        federation = build_federation(job, model, transport, {r.name: r.train for r in rows}, noise_seed=None,
                                      he_context=he_key)
        algorithm = federation.algorithm
        tracker = _BestTracker(output, job)
        done = 0
        relayed = job.topology.kind in ("cyclic", "swarm")  # the server relays sealed models (server/relay.py)
        relay_state = None
        if resume and relayed:
            relay_state = _relay_resume_point(output, job, store)
            done = relay_state.done
        elif resume:
            done, saved = resume_point(output, job, store, algorithm, tracker)
            params = saved if saved is not None else params
        if resume:
            # sampling by loss goes on from each site's last recorded training loss
            federation.sampler.observe_losses(store.last_values(Arm.FEDERATED.value, "train", Metric.LOSS))
            federation.sampler.replay(store.metric_records())  # unbiased sampling: its draws and answer counts
            # the privacy ledger counts the rounds released before a crash and redone
            federation.ledger = ledger_for(job, {r.name: r.train for r in rows}, store.add_released_again(0))
            # each site's algorithm state should be from the last round the run kept its update from
            federation.kept_rounds.update(store.kept_rounds(Arm.FEDERATED.value))
        start = done + 1
        for arm in (Arm.LOCAL, Arm.FINETUNED):  # baselines run whole after the federation: redone from scratch
            store.drop_after(arm.value, 0)

        trackers.start(job, output)  # a resumed run is a new run of the tracking tool, from its first redone round
        record = _recording(store, trackers)

        def callback(s: RoundSummary, p: Params) -> None:
            if s.arm is Arm.FEDERATED:  # the resume point first: the best model never runs ahead of it
                save_state(output, s.round, p, algorithm.server_state(), job.job_hash())
                store.round_completed(s.arm.value, s.round, STATE_FILE, time.time())
                tracker(s, p)
            if on_round is not None:
                on_round(s, p)

        final = params
        if relayed:
            _run_relayed(federation, transport, hub, init_params, rows, record, on_round, relay_state, output, store)
        elif job.topology.kind == "split":  # the sites' turns over the Split call (server/split_deployed.py)
            from medfed.server.split_deployed import run_split_deployed

            if start <= job.rounds:
                final = run_split_deployed(federation, transport, model, tuple(shape), params, record, callback, start)
            tracker.finish()
        else:
            if start <= job.rounds:
                final = run_federated(federation, transport, params, record, callback, start_round=start)
            tracker.finish()
        if "finetuned" in job.compare and relayed:
            log.warning("compare: 'finetuned' skipped: with topology.kind %s the model stays at the sites",
                        job.topology.kind)
        elif "finetuned" in job.compare:
            run_finetuned(job, transport, final, record, callback)
        if "local" in job.compare:
            run_local(job, transport, init_params, record, callback)
        if job.task.kind == "reconstruction":  # the undersampled input scored as it is: what a network adds
            run_zero_filled(job, transport, init_params, record)
        if job.task.kind == "segmentation" and job.task.save_predictions > 0:
            log.warning("task.save_predictions: predicted masks are not written in a deployment (the test "
                        "images stay at the sites)")
        if "centralized" in job.compare:
            log.warning("compare: 'centralized' skipped: it needs every site's data in one place, which a "
                        "deployment never does")

        # ---- the run's files; run.json last
        store.export_metrics(output / "metrics.jsonl")
        store.export_audit(output / "audit.json")
        elapsed = time.perf_counter() - t0
        marker = {"status": "complete", "mode": "deployment", "medfed_version": __version__,
                  "job_hash": job.job_hash(), "started": started.isoformat(),
                  "finished": datetime.now(timezone.utc).isoformat(), "elapsed_s": round(elapsed, 3),
                  "rounds": job.rounds, "resumed": resume}
        marker.update(model_record(job))  # the network, and what its weights and code were
        if trackers:  # where the run was also logged
            marker["tracking"] = trackers.describe()
        atomic_write_text(output / RUN_MARKER, json.dumps(marker, indent=2) + "\n", mode=PRIVATE)
        write_report(output, mode=PRIVATE)
        trackers.finish(output)  # the report, metrics and final model as artifacts
        hub.finish(grace=wire.POLL_WAIT + 2.0)  # only a finished job sends the sites home
        return RunResult(run_dir=output, elapsed_s=elapsed)
    except BaseException as e:
        trackers.finish(output, e)  # the tool's run marked failed (or killed); no-op when not started
        raise
    finally:
        if server is not None:
            server.stop(grace=2.0).wait(5.0)
        if attached is not None:
            host.detach(attached)
        store.close()
        close_run_log(handler)
