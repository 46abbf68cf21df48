"""The relay's side of the messages of a relayed topology (server/relay.py): sending
them to the sites, checking the sealed models and the answers they come back with, and
what the server keeps between rounds (no model it can read)."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medfed.core import codec
from medfed.core.errors import CodecError, ConfigError
from medfed.core.types import Arm, EvalResult, Message, Metric, Params, SiteFailure, Split, Update
from medfed.server.federation import Federation
from medfed.server.loop import EVAL_SPLITS, Recorder, tally_evaluation
from medfed.server.swarm import _as_personal
from medfed.server.validate import eval_problem
from medfed.site.peers import EVALUATE, PASSED_ON, TRAINED
from medfed.transport.base import Transport
from medfed.transport.pki.sealing import Envelope, SealError

log = logging.getLogger("medfed")

RELAY_STATE = "relay-state.json"  # the run folder's record of the relay between rounds (no model it can read)


@dataclass
class RelayState:
    """What the server keeps of a relayed run after each round: the rounds done, the
    round's model sealed for the sites (cyclic: the next round starts from it), and the
    swarm's bookkeeping (examples per site, BrainTorrent's versions and merges). None of
    it is a model the server can read."""

    done: int = 0
    carried: dict[str, Any] | None = None  # {"envelope", "sender", "round", "purpose"}: a sealed start
    sizes: dict[str, float] = field(default_factory=dict)
    version: dict[str, int] = field(default_factory=dict)
    seen: dict[str, dict[str, int]] = field(default_factory=dict)
    trained_round: dict[str, int] = field(default_factory=dict)
    joined: bool = False  # swarm: every training site holds its own model (the initial one, at first)

    def save(self, folder: Path) -> None:
        from medfed.core.files import PRIVATE, atomic_write_text

        atomic_write_text(folder / RELAY_STATE, json.dumps(asdict(self)), mode=PRIVATE)

    @classmethod
    def load(cls, folder: Path) -> RelayState:
        path = folder / RELAY_STATE
        if not path.exists():
            return cls()
        try:
            raw = json.loads(path.read_text())
            return cls(**raw)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"'{path}' is damaged ({e}); the run cannot be resumed") from None


class Relay:
    """Sends the relayed topology's messages to the sites and checks the sealed models
    they answer with. ``certificates``: each site's certificate (DER) as it presented it to
    the server (none in a simulation: models then travel unsealed); ``model_bytes``: the
    size of the model; ``eval_sizes``: each site's declared validation and test sizes,
    which its evaluation answers must match; ``train_sizes``: its training examples, which
    the label of each model it trained must state."""

    def __init__(self, federation: Federation, transport: Transport, model_bytes: int,
                 certificates: Mapping[str, bytes] | None = None,
                 eval_sizes: Mapping[str, Mapping[Split, int]] | None = None,
                 train_sizes: Mapping[str, int] | None = None):
        from medfed.tasks import metric_bounds

        self.job = federation.job
        self.transport = transport
        self.certificates = dict(certificates or {})
        self.sealed = bool(self.certificates)
        self.limit = 2 * model_bytes + (1 << 20)  # a sealed model, base64 in JSON, and its label
        self.eval_sizes = eval_sizes
        self.train_sizes = dict(train_sizes or {})
        self.bounds = metric_bounds(self.job.task)

    def to(self, sites: list[str]) -> dict[str, str]:
        """Recipients as a message names them: each with the certificate the server saw."""
        return {s: base64.b64encode(self.certificates[s]).decode() if self.sealed else "" for s in sites}

    def send(self, topic: str, rnd: int, bodies: Mapping[str, dict[str, Any]]) -> dict[str, dict | SiteFailure]:
        """One message per site, sent together; each site's answer or failure."""
        job_id = self.job.job_id
        msgs = [Message(site=s, job_id=job_id, round=rnd, topic=topic, body={"job_id": job_id, **b},
                        answer_limit=self.limit) for s, b in bodies.items()]
        answers = self.transport.exchange(msgs, timeout=self.job.round_timeout) if msgs else []
        out: dict[str, dict | SiteFailure] = {}
        for m, a in zip(msgs, answers):
            if isinstance(a, SiteFailure):
                log.warning("round %d: site '%s' failed '%s': %s", rnd, m.site, topic, a.cause)
            out[m.site] = a
        return out

    def envelope(self, site: str, answer: dict | SiteFailure, rnd: int, purpose: str, recipients: list[str],
                 num_examples: int | None = None) -> Envelope | str:
        """The sealed model ``site`` answered with, its label checked, or why it cannot be
        passed on."""
        if isinstance(answer, SiteFailure):
            return answer.cause
        try:
            env = Envelope.parse(answer.get("envelope"), f"the sealed model of site '{site}'", self.limit)
        except SealError as e:
            return str(e)
        lab = env.label
        if (lab.job_id, lab.round, lab.purpose, lab.sender) != (self.job.job_id, rnd, purpose, site):
            return (f"its sealed model is labelled job {lab.job_id}, round {lab.round}, {lab.purpose}, from site "
                    f"'{lab.sender}'; expected job {self.job.job_id}, round {rnd}, {purpose}, from site '{site}'")
        if sorted(env.recipients) != sorted(recipients):
            return f"its sealed model is for {sorted(env.recipients)}, expected {sorted(recipients)}"
        if env.sealed != self.sealed:
            return "its model is not sealed" if self.sealed else "its model is sealed, but no site has a kit here"
        want = self.train_sizes.get(site) if num_examples is None else num_examples
        if purpose in (TRAINED, PASSED_ON) and want is not None and lab.num_examples != want:
            return f"its sealed model claims {lab.num_examples} training examples, the site reported {want}"
        log.info("round %d: relaying the sealed %s model of site '%s' to %s: %d bytes, sha256 %s", rnd, purpose, site,
                 ", ".join(f"'{r}'" for r in env.recipients), env.size, env.digest[:16])
        return env

    def receipt(self, site: str, answer: dict | SiteFailure, rnd: int) -> Update | str:
        """A training answer as the round loop counts it (loss, examples; no tensors), or
        why it is not one."""
        if isinstance(answer, SiteFailure):
            return answer.cause
        loss, n, steps = answer.get("loss"), answer.get("num_examples"), answer.get("num_steps")
        if (not isinstance(n, int) or isinstance(n, bool) or n <= 0 or not isinstance(steps, int)
                or (loss is not None and (not isinstance(loss, (int, float)) or not np.isfinite(loss)))):
            return f"malformed training answer (loss {loss!r}, examples {n!r}, steps {steps!r})"
        want = self.train_sizes.get(site)
        if want is not None and n != want:
            return f"it trained on {n} examples, the site reported {want}"
        return Update(site=site, round=rnd, params={}, num_examples=n, num_steps=steps,
                      metrics={Metric.LOSS: float(loss)} if loss is not None else {})

    def results(self, site: str, raw: Any) -> list[EvalResult] | SiteFailure:
        """Evaluation results in an answer, checked as the hub checks an evaluation answer."""
        try:
            results = codec.decode_eval_results(site, str(raw).encode(), EVAL_SPLITS)
        except CodecError as e:
            return SiteFailure(site, str(e))
        sizes = self.eval_sizes.get(site) if self.eval_sizes is not None else None
        problem = eval_problem(results, self.bounds, sizes)
        return SiteFailure(site, f"evaluation results: {problem}") if problem else results

    def evaluate(self, bodies: Mapping[str, dict[str, Any]], rnd: int, record: Recorder, one_by_one: bool = False,
                 ) -> tuple[dict[str, dict[str, float | None]], dict[str, float]]:
        """Evaluate at each site what its body names; record as the simulation does (the
        consensus as ``federated``, a site's own model as ``personalized``). Returns the
        means, and each site's distance to the consensus where it reported one.
        ``one_by_one``: one site at a time (each body carries every site's sealed model:
        sent together, the server would hold the square of the sites' models at once)."""
        splits = [s.value for s in EVAL_SPLITS]
        if one_by_one:
            answers: dict[str, dict | SiteFailure] = {}
            for s, b in bodies.items():
                answers |= self.send(EVALUATE, rnd, {s: {**b, "splits": splits}})
        else:
            answers = self.send(EVALUATE, rnd, {s: {**b, "splits": splits} for s, b in bodies.items()})
        federated, personal, distances = [], [], {}
        for site, a in answers.items():
            if isinstance(a, SiteFailure):
                federated.append((site, a))
                continue
            federated.append((site, self.results(site, a.get("results"))))
            if "personal" in a:
                personal.append((site, self.results(site, a["personal"])))
            d = a.get("distance")
            if isinstance(d, (int, float)) and not isinstance(d, bool) and np.isfinite(d) and d >= 0:
                distances[site] = float(d)
        means = tally_evaluation(federated, self.job, Arm.FEDERATED, rnd, record)
        if personal:
            tally_evaluation(personal, self.job, Arm.FEDERATED, rnd, _as_personal(record))
        return means, distances


def init_start(params: Params) -> dict[str, Any]:
    """A message's model source: the initial model the server built (no site has trained it)."""
    return {"from": "init", "model": base64.b64encode(bytes(codec.encode_model(params, {}))).decode()}


def sealed_start(env: Envelope) -> dict[str, Any]:
    return {"from": "sealed", "envelope": env.to_wire(), "sender": env.label.sender, "round": env.label.round,
            "purpose": env.label.purpose}


def check_relayable(federation: Federation, init_params: Params) -> None:
    """A relayed topology passes whole models between sites: nothing may travel with the
    round plan."""
    if federation.algorithm.round_extras(init_params):
        raise ConfigError(f"algorithm.name: {federation.job.algorithm.name} sends tensors with each round's plan, "
                          "which a relayed topology cannot carry")
