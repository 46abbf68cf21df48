"""The algorithm interface: one file per algorithm holds both halves.

* The **site hook** plugs into the one local training loop (site/train.py): an extra loss
  term (FedProx), a gradient correction (SCAFFOLD), tensors sent back with the update.
  One hook object lives at each site for the whole run, so it may keep state.
* The **server rule** turns the round's updates into the next global parameters; it may
  send extra tensors to the sites with the round plan (e.g. a server control variate).

Adding an algorithm = one new file with a subclass of :class:`Algorithm` (and, if needed,
of :class:`SiteHook`) plus its config class in config.py. The round loop does not change.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from medfed.algorithms.mean import weighted_average
from medfed.core.types import Params, RoundPlan, SecAggPlan, TrainSettings, Update


@dataclass(frozen=True)
class Phase:
    """One local training of a round at a site, described as data; the one training step
    (site/train.py) runs each phase a site's hook lists.

    ``settings``: epochs, batch size, learning rate... of this phase; ``frozen``: names of
    parameters it does not train; ``start``: a whole state dict to start from (None: the
    model as the phase before left it; the first phase starts from the global model, with
    the layers the algorithm keeps at the site); ``hook``: the site hook of this phase
    (None: the algorithm's); ``keep``: for a phase whose result stays at the site (a
    personal model), what to do with its trained parameters. Phases without ``keep`` train
    the model the site sends; they run first, then the update is taken, then the others."""

    settings: TrainSettings
    frozen: frozenset[str] = frozenset()
    start: Params | None = None
    hook: "SiteHook | None" = None
    keep: Callable[[Params], None] | None = None


class SiteHook:
    """Site-side half of an algorithm. The defaults give plain local training."""

    # True when the hook needs the task loss of the model a phase starts from (the global
    # model, for the first) on the site's training split, e.g. q-FedAvg's F_k: the training
    # step measures it in eval mode before its first step and calls on_start_loss.
    wants_start_loss: bool = False

    def on_start_loss(self, loss: float | None) -> None:
        """The mean task loss of the starting model on the training split (hooks with
        ``wants_start_loss`` only); None when the model's outputs are not finite."""

    def probe(self, global_params: Params, plan: RoundPlan) -> Params | None:
        """A model to score on the site's validation split before the round's training
        (FedCE: the global model without this site's last contribution), or None (the
        default: nothing to score). The site then calls :meth:`on_probe` with its score."""
        return None

    def on_probe(self, value: float | None) -> None:
        """The task's monitored metric of :meth:`probe`'s model on the validation split
        (None where undefined, e.g. an AUC on one class)."""

    def on_train_start(self, model: nn.Module, plan: RoundPlan) -> None:
        """Called once per round after the global parameters are loaded into ``model``
        (and by a phase's own hook when that phase starts)."""

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to the task loss at every step (None: nothing to add)."""
        return None

    def batch_loss(self, model: nn.Module, images: torch.Tensor, outputs: torch.Tensor,
                   labeled: torch.Tensor) -> torch.Tensor | None:
        """A term of the batch itself added to the loss at every step (None: nothing to add):
        ``images`` (B, C, *spatial) as the step trains on them, ``outputs`` the model's
        logits for them (with their graph), ``labeled`` bool (B,): which examples have a
        label (the task loss covers those only). Semi-supervised training (site/semi.py)
        adds its consistency or pseudo-label term here."""
        return None

    def on_after_backward(self, model: nn.Module) -> None:
        """Called after ``loss.backward()`` and before the optimizer step."""

    def on_step_end(self, model: nn.Module) -> None:
        """Called after every optimizer step (the mean teacher's moving average)."""

    # True when the hook takes sharpness-aware steps (HarmoFL's weight perturbation): after
    # the batch's backward pass the training step calls :meth:`perturb`, takes the gradient
    # again at the moved weights, calls :meth:`unperturb` and steps with that gradient.
    perturbs: bool = False

    def perturb(self, model: nn.Module) -> Params | None:
        """Move the weights in place from their current gradients; return the moves by
        name, or None when nothing moved (then the step uses the first gradient)."""
        return None

    def unperturb(self, model: nn.Module, moves: Params) -> None:
        """Undo :meth:`perturb`'s ``moves`` (the gradients stay)."""

    def on_train_end(self, model: nn.Module, num_steps: int) -> Params:
        """Extra tensors to send back with the update (empty by default)."""
        return {}

    def phases(self, settings: TrainSettings, global_params: Params) -> list[Phase]:
        """The local training of one round (``settings``: the round plan's; ``global_params``:
        the model the server sent). Default: one phase training everything."""
        return [Phase(settings)]

    def personal_model(self) -> Params | None:
        """The model this site keeps of its own (Ditto's personal model), evaluated on its
        own data as the ``personalized`` arm; None when it keeps none (yet)."""
        return None

    # Names of the attributes (each a Params dict, or None before the site's first round)
    # that make up the hook's state across rounds (SCAFFOLD's control variate, Ditto's
    # personal model). The site keeps a copy with each round it trains, so that a round the
    # server redoes after a crash starts from the same state, and a restarted site goes on.
    state_fields: tuple[str, ...] = ()

    def state(self) -> Params:
        """The hook's state as one flat tensor dict (``<field>/<name>``), on the CPU."""
        return {f"{f}/{n}": t.detach().to("cpu", copy=True)
                for f in self.state_fields for n, t in (getattr(self, f) or {}).items()}

    def load_state(self, state: Params) -> None:
        """Restore what :meth:`state` returned; a field with no entry goes back to None (no
        state yet). Unknown entries are a ValueError."""
        fields: dict[str, Params] = {f: {} for f in self.state_fields}
        for key, t in state.items():
            f, _, n = key.partition("/")
            if f not in fields or not n:
                raise ValueError(f"{type(self).__name__}: unexpected site state entry '{key}'")
            fields[f][n] = t.clone()
        for f, values in fields.items():
            setattr(self, f, values or None)


@dataclass(frozen=True)
class SiteCoefficients:
    """One round's aggregation coefficients per answering site, from the sampler
    (``sampling: {method: unbiased}``, server/unbiased.py) to the combiner that asks for them
    (algorithms/sampled_mean.py). ``step[k]``: the weight of site k's move ``θ_k - θ`` in the
    trainable parameters; ``mean[k]``: its weight in every other entry (these sum to 1)."""

    round: int
    step: Mapping[str, float]
    mean: Mapping[str, float]


class Combiner(ABC):
    """How a round's updates become one set of parameters, before the algorithm's own
    server step: FedAvg's example-weighted mean by default; a robust rule, central
    differential privacy or secure aggregation replace it (robust/, privacy/).

    ``updates`` hold full values (``Encoding.FULL``) except for secure aggregation, which
    receives the masked ones. The result has the names the sites sent (not ``local_keys``).
    """

    name: str = "mean"

    @abstractmethod
    def combine(self, global_params: Params, updates: Sequence[Update], rnd: int) -> Params:
        """The combined parameters of round ``rnd`` (full values)."""

    def prepare(self, rnd: int, sites: Sequence[str], global_params: Params) -> dict[str, SecAggPlan]:
        """Per-site parts of round ``rnd``'s plans, after talking to the ``sites`` if needed
        (secure aggregation's key exchange). Empty by default."""
        return {}

    def state(self) -> Params:
        """State carried across rounds (e.g. an adaptive clipping bound), for checkpoints."""
        return {}

    def load_state(self, state: Params) -> None:
        """Restore what :meth:`state` returned."""
        if state:
            raise ValueError(f"combiner '{self.name}' keeps no state, got {sorted(state)[:3]}")

    def round_metrics(self) -> dict[str, float]:
        """Figures of the last :meth:`combine` to record (e.g. the clipping bound used)."""
        return {}

    def weigh(self, coefficients: SiteCoefficients) -> None:
        """Take the sampler's coefficients for the next :meth:`combine` (only a combiner
        that combines by them, ``sampling: unbiased``'s, accepts them)."""
        raise TypeError(f"combiner '{self.name}' combines by its own weights and cannot take the sampler's")


class WeightedMean(Combiner):
    """The example-weighted mean of the updates' parameters (FedAvg)."""

    name = "mean"

    def combine(self, global_params: Params, updates: Sequence[Update], rnd: int) -> Params:
        return weighted_average([u.params for u in updates], [u.num_examples for u in updates])


class Algorithm(ABC):
    """Server-side half of an algorithm, and the factory of its site hook.

    ``trainable`` names the model's trainable parameters (as opposed to buffers such as
    batch-norm statistics), for rules that treat the two differently; ``combiner`` turns
    the round's updates into one set of parameters (default: the weighted mean).
    """

    name: str
    # State-dict entries that stay at each site: never sent to the server, never
    # overwritten by the global model, and used when the site evaluates (FedBN).
    local_keys: frozenset[str] = frozenset()
    # True when each site also keeps a personal model, evaluated as the "personalized" arm.
    personal_models: bool = False

    def __init__(self, trainable: frozenset[str] = frozenset(), combiner: Combiner | None = None):
        self.trainable = trainable
        # how the updates become one set of parameters: the weighted mean, unless the job
        # asks for a robust rule, central DP or secure aggregation (which only rules built
        # on the mean take: the FedAvg family and the server optimizers; see config)
        self.combiner = combiner if combiner is not None else WeightedMean()

    def make_site_hook(self) -> SiteHook:
        """The hook one site uses for the whole run."""
        return SiteHook()

    def round_extras(self, global_params: Params) -> Params:
        """Tensors sent to every selected site with this round's plan."""
        return {}

    def site_extras(self, site: str) -> Params:
        """Tensors sent to ``site`` alone with this round's plan (e.g. FedCE's coefficient
        of that site), on top of :meth:`round_extras`."""
        return {}

    def update_problem(self, update: Update, global_params: Params) -> str | None:
        """Why ``update``'s algorithm-specific content is unusable (None: it is fine).
        Called after the generic checks of server/validate.py."""
        return None

    # Names of the attributes (each a Params dict) that make up the server rule's state
    # across rounds (e.g. a server optimizer's moments). Saved with every checkpoint so a
    # resumed run continues exactly where it stopped.
    state_fields: tuple[str, ...] = ()

    def server_state(self) -> Params:
        """The server rule's state as one flat tensor dict (``<field>/<param name>``), the
        combiner's under ``combiner/``."""
        out = {f"{f}/{n}": t for f in self.state_fields for n, t in getattr(self, f).items()}
        out.update({f"combiner/{n}": t for n, t in self.combiner.state().items()})
        return out

    def load_server_state(self, state: Params) -> None:
        """Restore what :meth:`server_state` returned. Unknown entries are an error."""
        fields: dict[str, Params] = {f: {} for f in self.state_fields}
        combiner: Params = {}
        for key, t in state.items():
            f, _, n = key.partition("/")
            if f == "combiner" and n:
                combiner[n] = t
                continue
            if f not in fields or not n:
                raise ValueError(f"{self.name}: unexpected server state entry '{key}'")
            fields[f][n] = t
        for f, values in fields.items():
            setattr(self, f, values)
        self.combiner.load_state(combiner)

    @abstractmethod
    def aggregate(self, global_params: Params, updates: Sequence[Update]) -> Params:
        """The next global parameters from the current ones and the round's updates.

        ``updates`` is never empty and is ordered by site as in the job, so that the
        result does not depend on which site answered first.
        """


def trainable_keys(model: nn.Module) -> frozenset[str]:
    """State-dict names of the model's trainable parameters (not buffers)."""
    return frozenset(n for n, p in model.named_parameters() if p.requires_grad)


def buffer_keys(model: nn.Module) -> frozenset[str]:
    """State-dict names that are not parameters: buffers such as batch-norm running
    statistics and step counters (values a forward pass sets, not steps of an optimizer)."""
    params = {n for n, _ in model.named_parameters()}
    return frozenset(k for k in model.state_dict() if k not in params)


def norm_keys(model: nn.Module) -> frozenset[str]:
    """State-dict names of every batch-norm layer: affine parameters and statistics."""
    keys = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            prefix = f"{mod_name}." if mod_name else ""
            keys.update(prefix + k for k in mod.state_dict())
    return frozenset(keys)
