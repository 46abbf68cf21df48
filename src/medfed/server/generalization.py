"""FedDG's amplitude sharing (``generalization: {method: feddg}``), run by the server before
round 1 through the transport's protocol messages: each training site sends the band
amplitudes of a few of its training images; the server checks them, pools them into one
bank and sends the bank to every training site, which mixes it into its federated
training from then on (site/app.py, data/frequency.py). A site that cannot answer is
left out of the bank (logged); with no site's amplitudes the run stops."""

from __future__ import annotations

import logging

import torch

from medfed.config import Job
from medfed.core.errors import ConfigError, DataError, RoundError
from medfed.core.types import Message, SiteFailure
from medfed.data.frequency import AMPLITUDES_TOPIC, BANK_TOPIC, band_half, check_bank
from medfed.transport.base import Transport

log = logging.getLogger("medfed")


def share_amplitudes(job: Job, transport: Transport, shape: tuple[int, ...]) -> int:
    """Collect, check and pool the training sites' amplitudes, send every training site the
    bank; ``shape``: the sites' example shape (C, H, W). Returns the bank's size."""
    g = job.generalization
    if g is None:
        return 0
    if len(shape) != 3:
        raise ConfigError(f"generalization: feddg mixes 2D spectra; the images are {list(shape)}")
    b = band_half(shape[1:], g.ratio)
    sites = list(job.training_sites)
    asks = [Message(s, job.job_id, 0, AMPLITUDES_TOPIC, {}) for s in sites]
    parts: list[torch.Tensor] = []
    for site, answer in zip(sites, transport.exchange(asks, timeout=job.round_timeout)):
        try:
            if isinstance(answer, SiteFailure):
                raise DataError(answer.cause)
            parts.append(check_bank(answer.get("amplitudes"), shape[0], b, g.bank_per_site))
        except DataError as e:
            log.warning("feddg: site '%s' left out of the amplitude bank: %s", site, e)
    if not parts:
        raise RoundError("feddg: no site sent its amplitudes; nothing to share")
    bank = torch.cat(parts)
    body = {"bank": bank.tolist(), "sites": len(parts)}
    sends = [Message(s, job.job_id, 0, BANK_TOPIC, body) for s in sites]
    for site, answer in zip(sites, transport.exchange(sends, timeout=job.round_timeout)):
        if isinstance(answer, SiteFailure):
            log.warning("feddg: site '%s' did not take the amplitude bank (it trains without it): %s", site, answer.cause)
    log.info("feddg: %d amplitude spectra of %d site(s), a %dx%d band per channel, shared with every training site",
             len(bank), len(parts), 2 * b + 1, 2 * b + 1)
    return len(bank)
