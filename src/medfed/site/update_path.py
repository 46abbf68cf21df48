"""The site's half of the update path, built from the job: what happens to a federated
update between local training and the network, in this order:

1. attack simulation (studies only: poisoned changes from the job's attacking sites);
2. site-level DP: clip the change and, with local noise, add the noise here;
3. compression (fp16, int8, top-k with error feedback) or secure-aggregation masking.

Sample-level DP-SGD is not a filter: it changes the local training step itself
(:func:`sample_dp_for`). The server's half is server/update_path.py.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from medfed.config import Job
from medfed.core.types import Encoding
from medfed.data.base import SiteData
from medfed.privacy.base import UpdateFilter

if TYPE_CHECKING:
    import tenseal as ts

    from medfed.privacy.secagg.signing import Credentials


def attacking(job: Job, site: str) -> bool:
    """True when ``site`` is one of the job's simulated attackers."""
    if job.attack is None:
        return False
    from medfed.robust.attacks import choose_attackers

    return site in choose_attackers(job.training_sites, job.attack.fraction, job.seed)


def poisoned_data(job: Job, data: SiteData) -> SiteData:
    """``data`` with flipped training labels when the site is a label-flipping attacker."""
    if job.attack is None or job.attack.kind != "label_flip" or not attacking(job, data.name):
        return data
    from medfed.robust.attacks import flip_labels

    labels = flip_labels(data.train.labels, job.task.labels, job.task.num_classes)
    return replace(data, train=replace(data.train, labels=labels))


def site_filters(job: Job, site: str, secure: bool, buffers: frozenset[str] = frozenset(),
                 credentials: Credentials | None = None, he_context: ts.Context | None = None) -> list[UpdateFilter]:
    """The outgoing filters of ``site`` (one object each for the whole run). ``secure``:
    draw DP noise from a cryptographic generator (a deployment) instead of the round's
    seed (a simulation, repeatable); ``buffers``: the model's buffer names (compression
    sends them whole); ``credentials``: the site's kit (a deployment), with which secure
    aggregation signs this site's keys and checks the other sites'; ``he_context``: the
    consortium's secret CKKS context (a deployment with ``privacy.he``)."""
    out: list[UpdateFilter] = []
    if job.attack is not None and job.attack.kind != "label_flip" and attacking(job, site):
        from medfed.robust.attacks import PoisonFilter

        out.append(PoisonFilter(job.attack.kind, job.attack.scale))
    dp, sa = job.privacy.dp, job.privacy.secure_aggregation
    if dp is not None and dp.noise == "local":
        from medfed.privacy.dp import LocalDP

        out.append(LocalDP(dp.clip, dp.noise_multiplier, secure))
    elif dp is not None and sa is not None:  # central noise, but the server sees only the sum: clip here
        from medfed.privacy.dp import ClipFilter

        out.append(ClipFilter(dp.clip))
    if job.compression is not None:
        from medfed.privacy.compression import CompressionFilter

        c = job.compression
        out.append(CompressionFilter(Encoding(c.method), c.fraction, c.error_feedback, buffers))
    if sa is not None:
        from medfed.privacy.secagg.integration import SecAggClient

        out.append(SecAggClient(job, site, credentials))
    if job.privacy.he is not None:  # homomorphic encryption (the he extra): encrypts the weighted change
        from medfed.privacy.he.integration import site_client

        out.append(site_client(job, site, secure, he_context))
    return out


def sample_dp_for(job: Job, secure: bool):
    """DP-SGD settings for the site's federated training, or None."""
    sgd = job.privacy.dp_sgd
    if sgd is None:
        return None
    from medfed.privacy.dpsgd import SampleDP

    return SampleDP(sgd.noise_multiplier, sgd.max_grad_norm, secure)
