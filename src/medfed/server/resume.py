"""Continuing a simulated run that was stopped: ``medfed run JOB -o RUN --resume``.

A simulated run keeps, in its staging folder (server/rundir.py), what it needs to go on
after being killed at any moment: after every federated round ``state.safetensors`` (the
global model and the server rule's state, server/checkpoint.py) and ``metrics.jsonl`` up
to it; each site with algorithm state keeps its own in ``site-state/`` after every round
it trains (site/state.py). ``--resume`` takes the folder over, forgets what was recorded
after the last saved round (and every baseline, which is redone whole), and goes on from
the round after it: the same final model and metrics as a run never stopped, because
every round's training, sampling and DP noise is drawn from the job seed and the round.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from medfed.config import Job
from medfed.core.errors import ConfigError, RunDirError
from medfed.core.files import atomic_write_text
from medfed.core.types import Arm, Metric, Params
from medfed.server.checkpoint import STATE_FILE, load_checkpoint, load_state
from medfed.server.federation import Federation

log = logging.getLogger("medfed")

SITE_STATES = "site-state"  # in the staging folder: one file per site with algorithm state
METRICS = "metrics.jsonl"
ROUND_ARMS = (Arm.FEDERATED.value, Arm.PERSONALIZED.value)  # recorded by the federated round loop


def check_resumable(job: Job, from_python: bool) -> None:
    """Refuse, naming the field, a job whose stopped run ``--resume`` cannot continue
    exactly (its state is not all saved with each round)."""
    if job.contribution is not None:
        raise ConfigError("--resume: contribution estimates from every round's updates, which a stopped run does not "
                          "keep; run it again without --resume, or leave contribution out")
    if job.pretrain is not None:
        raise ConfigError("--resume: a run with pretrain has two stages, and the pretraining stage's rounds (its model, "
                          "its sites' BYOL targets) are not saved, so a stopped run cannot go on exactly; run it again "
                          "without --resume")
    if job.train.engine == "bundle":
        raise ConfigError("--resume: train.engine: bundle keeps the bundle trainer's optimizer and scheduler at each "
                          "site from round to round, which a stopped run does not save; run it again without --resume")
    if job.transport == "ray":
        raise ConfigError("--resume: transport ray keeps the sites' state on its workers, which may be other "
                          "machines; use transport inprocess or pool, or run again without --resume")
    if from_python:
        raise ConfigError("--resume: a run given its datasets or model from Python cannot be resumed; run it again")


def site_state_dir(staging: Path) -> Path:
    return staging / SITE_STATES


@dataclass
class StoppedRun:
    """What a stopped run in a staging folder had done: ``done``, the last round saved (0:
    none); its global model ``params`` and server rule state; the metrics kept (federated
    rounds up to ``done``); the best validation value so far."""

    done: int
    params: Params | None
    algorithm_state: Params
    records: list[dict]
    best: float | None

    @classmethod
    def read(cls, staging: Path, job: Job) -> "StoppedRun":
        """Read the stopped run of ``job`` in ``staging`` and forget, in its metrics.jsonl,
        what was recorded after the last saved round and every baseline (they are redone).
        RunDirError when the folder is of another job or its state cannot be read."""
        saved_job = staging / "job.yaml"
        if not saved_job.is_file() or saved_job.read_text(encoding="utf-8") != job.to_yaml():
            raise RunDirError(f"the stopped run in '{staging}' is of another job (the job file changed since it "
                              "started); restore the job file, or start without --resume")
        done, params, algo_state, best = 0, None, {}, None
        if (staging / STATE_FILE).exists():
            done, params, algo_state = load_state(staging, job.job_hash())
            if (staging / "model_best.json").exists():
                best = load_checkpoint(staging / "model_best")[1].get("value")
        records = _kept_records(staging / METRICS, done)
        atomic_write_text(staging / METRICS, "".join(json.dumps(r, allow_nan=False) + "\n" for r in records))
        return cls(done, params, algo_state, records, best)

    def restore(self, federation: Federation) -> None:
        """Put the server rule's state, sampling by loss (or unbiased sampling's counts) and
        each site's last kept round back into ``federation``."""
        try:
            federation.algorithm.load_server_state(self.algorithm_state)
        except ValueError as e:
            raise RunDirError(f"the saved state does not fit the job's algorithm: {e}") from None
        losses = [r for r in self.records if r["arm"] == Arm.FEDERATED.value and r["split"] == "train"
                  and r["metric"] == Metric.LOSS.value]
        federation.sampler.observe_losses({r["site"]: r["value"] for r in losses if r["value"] is not None})
        federation.kept_rounds.update({r["site"]: int(r["round"]) for r in losses})  # in round order: the last wins
        federation.sampler.replay(self.records)  # unbiased sampling: its draws, answer counts and steps
        job = federation.job
        if self.done:
            log.info("resuming job '%s' after round %d of %d", job.name, self.done, job.rounds)
        else:
            log.info("resuming job '%s' from round 1: it stopped before a round was saved", job.name)


def _kept_records(path: Path, done: int) -> list[dict]:
    """The records of federated rounds up to ``done`` (the federated and personalized arms,
    both recorded by the round loop); a last line cut short by the stop is dropped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # a record cut short by the stop
        if isinstance(r, dict) and r.get("arm") in ROUND_ARMS and int(r.get("round", 0)) <= done:
            out.append(r)
    return out
