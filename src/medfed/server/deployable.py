"""What a deployment (``medfed server``, with ``--job`` or ``--queue``) refuses that a
simulation runs, checked before anything is written or awaited (and when a job is submitted
to a queue server)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from medfed.config import Job
from medfed.core.errors import ConfigError

if TYPE_CHECKING:
    import tenseal as ts


def check_deployable(job: Job, he_context: Path | None = None) -> ts.Context | None:
    """What a deployment refuses that a simulation runs (a simulated attack, a topology that
    runs in simulation only...): ConfigError naming the section. Returns the consortium's
    public CKKS context for a job with ``privacy.he`` (None otherwise)."""
    if job.attack is not None:
        raise ConfigError("attack: simulated attacks are for simulation studies (medfed run); remove the "
                          "attack section from a deployment job")
    if job.contribution is not None:  # evaluating every subset's model would send each site many extra models
        raise ConfigError("contribution: computed by simulations (medfed run) only for now; remove the section "
                          "from a deployment job")
    if job.generalization is not None:  # the amplitude bank is shared before round 1 in simulation only
        raise ConfigError("generalization: feddg runs in simulation only for now (medfed run); a deployment would "
                          "need its amplitude bank sent to sites that join late; remove the section here")
    if job.pretrain is not None:  # its sites are built in the runner's process (server/pretrain.py)
        raise ConfigError("pretrain: the self-supervised stage runs in simulation only for now (medfed run); its "
                          "sites are built in the server's process; remove the section from a deployment job")
    he_key = _he_public(job, he_context)
    if job.topology.kind not in ("server", "cyclic", "swarm", "split"):
        raise ConfigError(
            f"topology.kind: {job.topology.kind} runs in simulation only for now (medfed run); a deployment runs "
            "topology.kind server, cyclic, swarm or split"
        )
    return he_key


def _he_public(job: Job, path: Path | None) -> ts.Context | None:
    """The consortium's public CKKS context for a job with ``privacy.he`` (None otherwise):
    ConfigError when it is missing, holds the secret key, or does not fit the job."""
    if job.privacy.he is None:
        if path is not None:
            raise ConfigError("--he-context: the job has no privacy.he section; leave the option out")
        return None
    if path is None:
        raise ConfigError("privacy.he: the server adds the sites' encrypted updates with the consortium's public "
                          "context: medfed server --he-context he-public.ctx (written by medfed he-keys; the "
                          "secret he-secret.ctx goes to the sites only)")
    from medfed.privacy.he.ckks import read_key_file

    return read_key_file(path, job.privacy.he, private=False)
