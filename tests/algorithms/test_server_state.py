"""A server rule restored from its saved state continues exactly as if never stopped."""

import pytest
import torch

from medfed.algorithms.feddyn import FedDyn
from medfed.algorithms.fedopt import FedOpt
from medfed.algorithms.scaffold import DC_PREFIX, Scaffold
from medfed.core.types import Update

TRAIN = frozenset({"w", "b"})


def _updates(rnd: int, with_dc: bool) -> list[Update]:
    g = torch.Generator().manual_seed(rnd)
    out = []
    for i, site in enumerate(("a", "b")):
        params = {"w": torch.randn(3, 2, generator=g), "b": torch.randn(2, generator=g)}
        extras = {DC_PREFIX + k: torch.randn(v.shape, generator=g) for k, v in params.items()} if with_dc else {}
        out.append(Update(site, rnd, params, num_examples=10 + 5 * i, num_steps=3, extras=extras))
    return out


MAKERS = {
    "fedyogi": (lambda: FedOpt("fedyogi", 0.5, 0.9, 0.99, 1e-3, TRAIN), False),
    "fedavgm": (lambda: FedOpt("fedavgm", 1.0, 0.9, 0.99, 1e-3, TRAIN), False),
    "feddyn": (lambda: FedDyn(0.1, 2, TRAIN), False),
    "scaffold": (lambda: Scaffold(1.0, 2, TRAIN), True),
}


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_restored_state_continues_bit_for_bit(name):
    make, with_dc = MAKERS[name]
    init = {"w": torch.zeros(3, 2), "b": torch.zeros(2)}

    straight = make()
    p = init
    for rnd in (1, 2, 3):
        straight.round_extras(p)
        p = straight.aggregate(p, _updates(rnd, with_dc))

    first = make()
    q = init
    for rnd in (1, 2):
        first.round_extras(q)
        q = first.aggregate(q, _updates(rnd, with_dc))
    state = {k: v.clone() for k, v in first.server_state().items()}
    assert state, "this rule keeps state across rounds"

    resumed = make()
    resumed.load_server_state(state)
    resumed.round_extras(q)
    q = resumed.aggregate(q, _updates(3, with_dc))
    for k in p:
        assert torch.equal(p[k], q[k]), k


def test_stateless_rule_and_unknown_entries():
    rule = FedOpt("fedadam", 0.1, 0.9, 0.99, 1e-3, TRAIN)
    with pytest.raises(ValueError, match="unexpected server state entry 'x/w'"):
        rule.load_server_state({"x/w": torch.zeros(1)})
    from medfed.algorithms.fedavg import FedAvg

    assert FedAvg().server_state() == {}
    with pytest.raises(ValueError, match="unexpected"):
        FedAvg().load_server_state({"m/w": torch.zeros(1)})
