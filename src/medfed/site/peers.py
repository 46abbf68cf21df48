"""A site's part in a topology without a central aggregator (``topology: cyclic | swarm``)
when the server only relays: the site holds the models, trains, merges, evaluates, and
seals what it sends the others (transport/pki/sealing.py).

The server's relayed round loops (server/relay.py) send these protocol messages, each
a JSON body through the transport's ``exchange``:

* ``peer.fit``: train from the initial model the server built (``start.from: init``),
  from this site's own model (``own``), or from a sealed model another site passed on
  (``sealed``); keep what it trained; with ``seal``, seal the model to pass on (cyclic)
  for the sites named. With ``adopt``, the trained model becomes the site's own
  (BrainTorrent). Answer: the training loss, examples, steps, and the sealed model.
* ``peer.seal``: seal the model it trained last (``slot: trained``) or its own
  (``own``) for the sites named.
* ``peer.merge``: merge its own model with the trained models of ``group`` (in that
  order; itself named by ``"self": true``) by the algorithm's server rule, exactly as a
  simulation's merge; the result becomes its own; with ``seal``, seal it for the sites
  named (the leader's merge).
* ``peer.adopt``: take a sealed model (the leader's merge) as its own.
* ``peer.evaluate``: evaluate a sealed model, its own, or the consensus of the sealed
  models of ``members`` (each site's own, example-weighted) on its validation and test
  splits; with ``personal``, its own model too, and its L2 distance to the consensus.

Every model that arrives is checked before use: sealed by the site the server says sent
it, for this job, round and purpose, for this site, and its tensors the names, shapes and
dtypes of this site's model, finite.
"""

from __future__ import annotations

import base64
import binascii
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from medfed.core import codec
from medfed.core.errors import CodecError, SiteError
from medfed.core.params import delta, l2_norm, nbytes
from medfed.core.types import Arm, Encoding, Metric, Params, Split, Update
from medfed.transport.pki.sealing import Envelope, Label, SealError, Sealer, open_or_plain, seal_or_plain

if TYPE_CHECKING:
    from medfed.algorithms import Algorithm
    from medfed.config import Job
    from medfed.site.app import SiteApp

log = logging.getLogger("medfed")

FIT, SEAL, MERGE, ADOPT, EVALUATE = "peer.fit", "peer.seal", "peer.merge", "peer.adopt", "peer.evaluate"
TOPICS = frozenset({FIT, SEAL, MERGE, ADOPT, EVALUATE})

# what a sealed model is for (its label's purpose): a recipient opens one only for the
# purpose its task names
PASSED_ON = "passed-on"  # cyclic: the model the next site trains from (and the round's model)
TRAINED = "trained"  # swarm: a site's trained model, for a merge
MERGED = "merged"  # swarm leader: the merge every site adopts
OWN = "own"  # gossip, BrainTorrent: a site's own model, for the consensus


@dataclass
class _Trained:
    params: Params  # as the simulation's update holds them: less the layers kept at the site
    num_examples: int
    round: int


class PeerRole:
    """The models a site holds in a relayed topology, and its answers to the relay's
    messages. ``sealer``: the site's kit (a deployment); None in a simulation, where
    models travel unsealed."""

    def __init__(self, app: SiteApp, job: Job, sealer: Sealer | None):
        from medfed.algorithms import build_algorithm, local_keys
        from medfed.server.update_path import combiner_for
        from medfed.server.validate import full_spec
        from medfed.models import get_params

        self.app, self.job, self.sealer = app, job, sealer
        self.name = app.name
        kept = local_keys(job.algorithm, app.model)
        # the algorithm's rule as the simulation's server applies it: the weighted mean or the robust rule
        self.algorithm: Algorithm = build_algorithm(job.algorithm, app.model, len(job.training_sites),
                                                    job.train.momentum, combiner_for(job, None, None, {}, kept),
                                                    lr=job.train.lr)
        self.spec = full_spec(get_params(app.model))  # every model that arrives has these names, shapes, dtypes
        self.update_spec = full_spec(get_params(app.model), kept)  # and a trained one these
        self.frozen = frozenset(n for n, p in app.model.named_parameters() if not p.requires_grad)
        self.pinned: Params = {}  # the frozen parameters' values in the first model received
        # this site's own model as each round left it (the last rounds): a round the server
        # redoes after it was stopped starts again from the model of the round before
        self._owns: list[tuple[int, Params]] = []
        self.trained: _Trained | None = None
        self.merge = getattr(job.topology, "merge", None)
        # BrainTorrent: (round of the peer's model, round of the merge) for each peer merged
        self._merged_from: dict[str, list[tuple[int, int]]] = {}

    # ------------------------------------------------------------------ messages

    def answer(self, topic: str, rnd: int, body: dict[str, Any]) -> dict[str, Any]:
        try:
            if topic == FIT:
                return self._fit(rnd, body)
            if topic == SEAL:
                return self._seal_slot(rnd, body)
            if topic == MERGE:
                return self._merge(rnd, body)
            if topic == ADOPT:
                self._set_own(rnd, self._start(rnd, body["start"]))
                return {"ok": True}
            if topic == EVALUATE:
                return self._evaluate(rnd, body)
        except SealError as e:  # a message refused: the relay hears why, and audits it
            log.warning("site '%s' %s", self.name, e)
            raise SiteError(self.name, str(e)) from None
        except (KeyError, TypeError, ValueError, CodecError) as e:
            raise SiteError(self.name, f"malformed '{topic}' message: {type(e).__name__}: {e}") from None
        raise SiteError(self.name, f"no part of this site answers '{topic}'")

    def _fit(self, rnd: int, body: dict[str, Any]) -> dict[str, Any]:
        self._forget_from(rnd)  # the round starts (again): what an earlier attempt at it left is dropped
        start = self._start(rnd, body["start"])
        plan = codec.plan_from_dict(body["plan"], {})
        if plan.job_id != self.job.job_id or plan.round != rnd or plan.arm is not Arm.FEDERATED:
            raise SiteError(self.name, f"a training plan for job {plan.job_id} round {plan.round} ({plan.arm.value}), "
                                       f"this is job {self.job.job_id} round {rnd}")
        update = self.app.fit(start, plan)
        if update.encoding is not Encoding.FULL:
            raise SiteError(self.name, f"its update is encoded as '{update.encoding.value}': a relayed topology "
                                       "passes whole models")
        self.trained = _Trained(update.params, update.num_examples, rnd)
        # the model passed on or kept: what the site sent, over the model it started from
        full = self._pin({k: update.params.get(k, v) for k, v in start.items()})
        if body.get("adopt"):
            self._set_own(rnd, full)
        out: dict[str, Any] = {"loss": update.metrics.get(Metric.LOSS), "num_examples": update.num_examples,
                               "num_steps": update.num_steps, "bytes": nbytes(update.params)}
        if body.get("seal") is not None:
            out["envelope"] = self._seal(full, rnd, PASSED_ON, body["seal"], update.num_examples).to_wire()
        return out

    def _seal_slot(self, rnd: int, body: dict[str, Any]) -> dict[str, Any]:
        slot = body["slot"]
        if slot == "trained":
            if self.trained is None:
                raise SiteError(self.name, "has trained no model to send")
            t = self.trained
            return {"envelope": self._seal(t.params, t.round, TRAINED, body["to"], t.num_examples).to_wire()}
        if slot == "own":
            return {"envelope": self._seal(self._own(rnd), rnd, OWN, body["to"], 0).to_wire()}
        raise SiteError(self.name, f"no model slot {slot!r} (trained, own)")

    def _merge(self, rnd: int, body: dict[str, Any]) -> dict[str, Any]:
        base = self._own(rnd)
        names = [str(m["site"]) for m in body["group"]]
        if len(set(names)) != len(names) or any(m.get("self") and m["site"] != self.name for m in body["group"]):
            raise SealError(f"refused a merge of round {rnd} that lists a site twice or another site as itself: "
                            f"{names}")
        updates = []
        for member in body["group"]:
            if member.get("self"):
                if self.trained is None:
                    raise SiteError(self.name, "has no trained model of its own to merge")
                t, site = self.trained, self.name
            else:
                site, at = str(member["site"]), int(member["round"])
                # a peer's model of this round; BrainTorrent's: its latest, newer than the last one merged
                if (at != rnd if self.merge != "braintorrent" else not self._last_merged(site, rnd) < at <= rnd):
                    raise SealError(f"refused the trained model of site '{site}' of round {at} in "
                                    f"round {rnd}: not one it may merge now (replayed?)")
                t = self._open_trained(site, at, member["envelope"])
            updates.append(Update(site=site, round=t.round, params=t.params, num_examples=t.num_examples,
                                  num_steps=1))
        merged = self._set_own(rnd, self._pin(self.algorithm.aggregate(base, updates)))
        for u in updates:
            if u.site != self.name:
                self._merged_from[u.site] = [e for e in self._merged_from.get(u.site, []) if e[1] < rnd][-2:]
                self._merged_from[u.site].append((u.round, rnd))
        out: dict[str, Any] = {"ok": True}
        if body.get("seal") is not None:
            out["envelope"] = self._seal(merged, rnd, MERGED, body["seal"], 0).to_wire()
        return out

    def _evaluate(self, rnd: int, body: dict[str, Any]) -> dict[str, Any]:
        from medfed.server.swarm import consensus

        splits = tuple(Split(s) for s in body["splits"])
        source = body["model"]
        mine: Params | None = None
        if source.get("from") == "consensus":
            models, weights = {}, {}
            for member in source["members"]:
                site = str(member["site"])
                if member.get("self"):
                    models[site] = self._own(rnd)
                else:
                    label = Label(self.job.job_id, rnd, OWN, site)
                    models[site] = self._model(open_or_plain(self.sealer, self._envelope(member["envelope"]), label),
                                               self.spec, f"the model of site '{site}'")
                weights[site] = float(member["weight"])
            model = consensus(models, weights)
            mine = models.get(self.name)
        else:
            model = self._start(rnd, source)
            if body.get("adopt"):  # the leader's merge: this site's own model from now on
                self._set_own(rnd, model)
        out: dict[str, Any] = {"results": codec.encode_eval_results(self.app.evaluate(model, splits, Arm.FEDERATED))
                               .decode()}
        if body.get("personal") and mine is not None:
            out["personal"] = codec.encode_eval_results(self.app.evaluate(mine, splits, Arm.FEDERATED)).decode()
            out["distance"] = l2_norm(delta(mine, model))
        return out

    # ------------------------------------------------------------------ models

    def _start(self, rnd: int, start: dict[str, Any]) -> Params:
        """The model a message names: the server's initial model, this site's own, or a
        sealed one (checked)."""
        kind = start.get("from")
        if kind == "own":
            return self._own(rnd - 1)  # training starts from the model the last round left
        if kind == "init":
            params = self._model(_unb64(start["model"]), self.spec, "the initial model")
        elif kind == "sealed":
            sender = str(start["sender"])
            label = Label(self.job.job_id, int(start["round"]), str(start["purpose"]), sender)
            # cyclic: the model passed on in this round, or the last round's; the leader's merge of this round
            fresh = rnd - 1 <= label.round <= rnd if label.purpose == PASSED_ON else label.round == rnd
            if label.purpose not in (PASSED_ON, MERGED) or not fresh:
                raise SealError(f"refused to start round {rnd} from the model sealed by site "
                                f"'{sender}' in round {label.round} for '{label.purpose}' (replayed?)")
            params = self._model(open_or_plain(self.sealer, self._envelope(start["envelope"]), label), self.spec,
                                 f"the model of site '{sender}'")
        else:
            raise SiteError(self.name, f"no model source {kind!r} (init, own, sealed)")
        if not self.pinned and self.frozen:
            self.pinned = {k: params[k] for k in self.frozen if k in params}
        return params

    def _own(self, rnd: int) -> Params:
        """This site's own model as round ``rnd`` has left it so far."""
        for at, params in reversed(self._owns):
            if at <= rnd:
                return params
        raise SiteError(self.name, "holds no model of its own yet (it has not taken part in a round)")

    def _set_own(self, rnd: int, params: Params) -> Params:
        self._owns = [(at, p) for at, p in self._owns if at < rnd][-2:] + [(rnd, params)]
        return params

    def _forget_from(self, rnd: int) -> None:
        self._owns = [(at, p) for at, p in self._owns if at < rnd]

    def _last_merged(self, site: str, rnd: int) -> int:
        """The round of ``site``'s model this site merged last, before round ``rnd``."""
        done = [model_round for model_round, merged_in in self._merged_from.get(site, []) if merged_in < rnd]
        return done[-1] if done else 0

    def _open_trained(self, site: str, rnd: int, raw: Any) -> _Trained:
        env = self._envelope(raw)
        payload = open_or_plain(self.sealer, env, Label(self.job.job_id, rnd, TRAINED, site))
        if env.label.num_examples <= 0:
            raise SiteError(self.name, f"the trained model of site '{site}' claims {env.label.num_examples} examples")
        params = self._model(payload, self.update_spec, f"the trained model of site '{site}'")
        return _Trained(params, env.label.num_examples, rnd)

    def _model(self, payload: bytes, spec: dict, what: str) -> Params:
        """Tensors from ``payload`` with exactly the names, shapes and dtypes of ``spec``,
        all finite, or SiteError naming ``what``."""
        from medfed.server.validate import update_problem

        params, extras = codec.decode_model(payload)
        if extras:
            raise SiteError(self.name, f"{what} carries extra tensors")
        probe = Update(site="", round=0, params=params, num_examples=1, num_steps=0)
        why = update_problem(probe, spec, 0)
        if why is not None:
            raise SiteError(self.name, f"{what} does not fit this site's model: {why}")
        # in the model's order (a message holds them sorted by name; sums over the entries, such
        # as a norm, must add them in the order the simulation does), each a tensor of its own
        return {k: params[k].clone() for k in spec}

    def _pin(self, params: Params) -> Params:
        return {**params, **{k: v for k, v in self.pinned.items() if k in params}} if self.pinned else params

    def _seal(self, params: Params, rnd: int, purpose: str, to: dict[str, str], n: int) -> Envelope:
        recipients = {str(site): _unb64(cert) if cert else b"" for site, cert in to.items()}
        payload = bytes(codec.encode_model(params, {}))
        return seal_or_plain(self.sealer, payload, Label(self.job.job_id, rnd, purpose, self.name, n), recipients)

    def _envelope(self, raw: Any) -> Envelope:
        limit = 2 * sum(spec_nbytes(s) for s in self.spec.values()) + (1 << 20)
        return Envelope.parse(raw, f"site '{self.name}': a relayed model", limit)


def spec_nbytes(entry: tuple) -> int:
    shape, dtype = entry
    n = 1
    for d in shape:
        n *= d
    return n * dtype.itemsize


def _unb64(v: Any) -> bytes:
    if not isinstance(v, str):
        raise CodecError("expected base64 text")
    try:
        return base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise CodecError("not base64") from None
