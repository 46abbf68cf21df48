"""The filter interface of the update path.

A site's update passes its *outgoing* filters in order before it is sent (attack
simulation, DP clipping and noise, compression or secure-aggregation masking); the server
checks what arrives against the round's :data:`~medfed.core.types.Spec`, decodes it and
hands it to the algorithm's :class:`~medfed.algorithms.base.Combiner`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from medfed.core.types import Params, RoundPlan, Update


class UpdateFilter(ABC):
    """One step of a site's outgoing update path. One object lives at each site for the
    whole run, so it may keep state (e.g. compression's error-feedback residual)."""

    @abstractmethod
    def apply(self, update: Update, global_params: Params, plan: RoundPlan) -> Update:
        """The update to send on. ``global_params`` are what the site received this round
        (the sent names only); ``update.params`` are full values on entry unless an
        earlier filter encoded them."""

    def state(self) -> Params:
        """What the filter carries from round to round (e.g. an error-feedback residual),
        for the site's saved state; empty by default."""
        return {}

    def load_state(self, state: Params) -> None:
        """Restore what :meth:`state` returned."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got {sorted(state)[:3]}")


class ProtocolParty(ABC):
    """A part of the site's update path that also answers protocol messages the server
    sends between training and aggregation (secure aggregation's key exchange and
    unmasking). Messages are JSON-able dicts."""

    topics: frozenset[str] = frozenset()

    @abstractmethod
    def answer(self, topic: str, rnd: int, body: dict) -> dict:
        """The reply to message ``topic`` of round ``rnd``."""
