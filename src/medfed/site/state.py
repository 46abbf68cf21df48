"""A site's state across rounds, and the site-local file that keeps it.

Some algorithms keep state at each site from round to round (SCAFFOLD's control variate,
FedDyn's linear term, MOON's previous model, Ditto's personal model, FedCE's last model,
the layers FedBN, FedPer and FedRep keep at the site, compression's error-feedback
residual). A site keeps two copies of it (:class:`RoundStates`): after the federated
round it trained last, and before it (after the round it trained the time before). A
server that crashed after the sites trained round ``r`` but before it saved ``r`` redoes
``r`` when resumed; the site then goes back to the earlier copy, so that the redone round
starts where the uninterrupted run would have. The server saves every round before it
starts the next, so one round back is all a resumed run can ask for.

In a deployment (and for a pool worker in a simulation) both copies are also written to a
state file after each round, atomically, readable by the site's user only
(:class:`StateFile`), so that a site process that is killed and started again goes on from
them. Every answer a stateful site sends says which round its state was from
(``Update.state_round``); the server compares it with the last round it kept that site's
update from and says in its log when a site could not continue exactly.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from medfed.core.files import PRIVATE, replacing
from medfed.core.types import Params

log = logging.getLogger("medfed")

SITE_STATE_DIR = "site-state"


def site_state_path(kit: Path, job_id: str) -> Path:
    """Where a deployed site keeps its state in job ``job_id``: in its kit's state folder."""
    return Path(kit) / "state" / SITE_STATE_DIR / f"{job_id}.safetensors"


@dataclass(frozen=True)
class SiteState:
    """The site's state after federated round ``round`` (0: before its first round);
    ``tensors``: flat names (``hook/...``, ``kept/...``, ``filter<i>/...``), on the CPU."""

    round: int
    tensors: Params


class StateFile:
    """The site-local file of one site's state in one job: both copies of
    :class:`RoundStates`, with the job's hash and the site's name, in one safetensors file
    replaced atomically (mode 0600)."""

    def __init__(self, path: Path, job_hash: str, site: str):
        self.path, self.job_hash, self.site = Path(path), job_hash, site

    def save(self, now: SiteState, before: SiteState | None) -> None:
        tensors = {f"now/{k}": v.contiguous() for k, v in now.tensors.items()}
        if before is not None:
            tensors |= {f"before/{k}": v.contiguous() for k, v in before.tensors.items()}
        meta = {"job_hash": self.job_hash, "site": self.site, "round": now.round,
                "before": before.round if before is not None else None}
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with replacing(self.path, PRIVATE) as tmp:
            save_file(tensors, str(tmp), metadata={"medfed": json.dumps(meta)})

    def load(self) -> tuple[SiteState, SiteState | None] | None:
        """The two copies saved, or None when there is no file. ValueError naming the file
        when it cannot be read, or belongs to another job or site."""
        if not self.path.exists():
            return None
        try:
            with safe_open(str(self.path), "pt") as f:
                meta = json.loads((f.metadata() or {})["medfed"])
                groups: dict[str, Params] = {"now": {}, "before": {}}
                for key in f.keys():
                    part, _, name = key.partition("/")
                    if part not in groups or not name:
                        raise ValueError(f"unexpected entry '{key}'")
                    groups[part][name] = f.get_tensor(key)
            if meta.get("job_hash") != self.job_hash or meta.get("site") != self.site:
                raise ValueError(f"it belongs to job {meta.get('job_hash')}, site {meta.get('site')!r}")
            now = SiteState(_round(meta.get("round")), groups["now"])
            before = None if meta.get("before") is None else SiteState(_round(meta["before"]), groups["before"])
        except (OSError, SafetensorError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"site state file '{self.path}' cannot be used: {e}") from None
        if before is not None and before.round >= now.round:
            raise ValueError(f"site state file '{self.path}' cannot be used: its earlier copy is from round "
                             f"{before.round}, not before round {now.round}")
        return now, before

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _round(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"round {value!r} is not a round number")
    return value


class RoundStates:
    """The two copies a site keeps (see the module docstring), and the rule for a round
    the server asks for again. ``snapshot``/``restore`` read and set the site's state."""

    def __init__(self, site: str, snapshot: Callable[[], Params], restore: Callable[[SiteState], None],
                 file: StateFile | None = None):
        self.site = site
        self._snapshot, self._restore = snapshot, restore
        self.round = 0  # the federated round the site's state is from (0: none trained yet)
        self.before: SiteState | None = None  # the state before that round
        self.file = file

    def resume_from_file(self) -> None:
        """Take up the copies in :attr:`file` (a restarted site); a file that cannot be used
        is logged and the site starts afresh."""
        if self.file is None:
            return
        try:
            saved = self.file.load()
        except ValueError as e:
            log.warning("site '%s': %s; it starts its algorithm state afresh", self.site, e)
            return
        if saved is None:
            return
        now, self.before = saved
        self._restore(now)
        self.round = now.round
        log.info("site '%s': took up its algorithm state of federated round %d from %s", self.site, now.round,
                 self.file.path)

    def begin(self, rnd: int) -> int:
        """Before training federated round ``rnd``: go back one round if the site already
        trained ``rnd`` (the server redoes it); keep a copy of the state trained from and
        return the round it is from."""
        if self.round >= rnd:
            if self.before is not None and self.before.round < rnd:
                log.info("site '%s': federated round %d again (the server resumed): back to its state of round %d",
                         self.site, rnd, self.before.round)
                self._restore(self.before)
                self.round = self.before.round
            else:
                log.warning("site '%s': federated round %d again, but its state is from round %d and it keeps no "
                            "earlier one: it trains from that state, and the run does not continue exactly",
                            self.site, rnd, self.round)
        self.before = SiteState(self.round, self._snapshot())
        return self.before.round

    def failed(self) -> None:
        """The round begun failed part way: put back the state it started from."""
        if self.before is not None:
            self._restore(self.before)
            self.round = self.before.round

    def end(self, rnd: int) -> None:
        """After training federated round ``rnd``: the state is from ``rnd``; saved to the
        file, if any, with the copy from before it."""
        self.round = rnd
        if self.file is not None:
            try:
                self.file.save(SiteState(rnd, self._snapshot()), self.before)
            except OSError as e:  # training goes on; a restart of this process would lose the state
                log.warning("site '%s': cannot save its algorithm state to '%s': %s", self.site, self.file.path,
                            e.strerror or e)
