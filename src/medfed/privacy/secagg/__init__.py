"""Secure aggregation: the server learns the sum of the sites' updates, not any one of them.

Bonawitz et al. (CCS 2017), semi-honest server, on the complete graph or as SecAgg+ (Bell et
al., CCS 2020) on a sparse seeded graph; in a deployment the sites also sign their keys, so
a server cannot substitute them. As pure transport-free code:

- :mod:`.shamir`   -- Shamir secret sharing over GF(2**521 - 1)
- :mod:`.masking`  -- fixed-point ring encoding in Z_{2^32}, ChaCha20 PRG, mask helpers
- :mod:`.protocol` -- the protocol and its threat model (module docstring), and an
  in-memory :func:`run_round`
- :mod:`.messages` -- its messages, typed, parsed and checked where they arrive
- :mod:`.sessions` -- the per-site session (and the key derivation both parties use)
- :mod:`.server_session` -- the server's session
- :mod:`.graph`    -- SecAgg+'s seeded Harary graph, its degree and failure bounds
- :mod:`.signing`  -- signed key advertisements with the sites' kits (deployments)
- :mod:`.integration` -- the protocol on the update path, over any transport
"""

from __future__ import annotations

from medfed.privacy.secagg.masking import (
    RING,
    FixedPoint,
    add_masks,
    check_ring,
    prg,
    remove_masks,
)
from medfed.privacy.secagg.protocol import (
    SecAggError,
    ServerSession,
    SiteSession,
    check_threshold,
    default_threshold,
    run_round,
)

__all__ = [
    "RING",
    "FixedPoint",
    "SecAggError",
    "ServerSession",
    "SiteSession",
    "add_masks",
    "check_ring",
    "check_threshold",
    "default_threshold",
    "prg",
    "remove_masks",
    "run_round",
]
