"""FedBN (Li et al., ICLR 2021): batch-norm layers stay local to each site.

Sites never send their batch-norm parameters and statistics and never take the
server's: the site app (site/app.py) keeps them across rounds through ``local_keys`` and
evaluates the federated model with them. The server averages the other layers as FedAvg
does and carries its own (initial) batch-norm entries unchanged, so the global state
dict keeps its full set of names.
"""

from __future__ import annotations

from medfed.algorithms.base import Combiner
from medfed.algorithms.fedavg import FedAvg


class FedBN(FedAvg):
    name = "fedbn"

    def __init__(self, bn_keys: frozenset[str], trainable: frozenset[str] = frozenset(),
                 combiner: Combiner | None = None):
        super().__init__(trainable, combiner)
        self.local_keys = bn_keys
