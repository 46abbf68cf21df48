"""Secure aggregation: the protocol of Bonawitz et al., "Practical Secure Aggregation for
Privacy-Preserving Machine Learning" (CCS 2017), semi-honest variant, on the complete graph
or, as SecAgg+ (Bell et al., CCS 2020), on a sparse seeded graph (below).

Pure and transport-free: a :class:`SiteSession` per site and a :class:`ServerSession` per
round exchange plain dicts of str/int/list/dict (bytes as base64 strings, JSON-able); the
masked vectors travel as int64 tensors (an ``Update`` with ``Encoding.MASKED``). Every
message is validated where it arrives; a bad one raises :class:`SecAggError` naming the
site and the field. Stages and who takes part in each:

====  ====================================  =================================================
 U1   sites that advertised keys            site: ``advertise()`` -> server
 U2   U1 sites that sent encrypted shares   site: ``share_keys(roster, t)`` -> server
 U3   U2 sites whose masked input arrived   site: ``mask(x, ciphertexts)`` -> server
 U4   U3 sites that answered the unmasking  site: ``unmask(survivors, dropped)`` -> server
====  ====================================  =================================================

Messages (``b64`` = standard base64 string; ``share`` = b64 of a 66-byte Shamir value):

- advertise:        ``{"c_pk": b64(32), "s_pk": b64(32)}``; in a deployment also
  ``"signed": {"job_id": str, "round": int, "cert": b64(DER), "sig": b64(DER)}``
- roster (server):  ``{site: advertisement as sent}`` over U1, plus the threshold
- share_keys:       ``{"shares": {other_site: b64(nonce 12 | AES-GCM ciphertext)}}``
- ciphertexts_for:  ``{from_site: b64}`` (the U2 senders' ciphertexts for that site)
- unmask_request:   ``{"survivors": [site, ...], "dropped": [site, ...]}``
- unmask answer:    ``{"b_shares": {survivor: share}, "s_shares": {dropped_site: share}}``

Masking (all mod 2^32): site u sends ``y_u = x_u + PRG(b_u) + sum_{v in U2, v != u}
±PRG(s_uv)``, + when u < v by site name, - otherwise, where ``b_u`` is a fresh 32-byte
self-mask seed and ``s_uv = HKDF(X25519(s_sk_u, s_pk_v)) = s_vu``. Summed over U3 the pairs
inside U3 cancel; the server reconstructs ``b_u`` for u in U3 and ``s_sk_v`` for v in
U2 \\ U3 from t Shamir shares (x = 1 + the site's index in the sorted U1) and removes what
is left, giving ``sum_{u in U3} x_u``. A site never gives both a ``b`` and an ``s_sk``
share of the same site, so no input is ever unmasked alone.

Threat model: the sites are honest-but-curious (they follow the protocol and try to learn
from what they see). The server, even together with fewer than ``t`` sites, learns only
the sum of the U3 inputs (and who dropped). What is secret: each site's ``x``, ``b_u``,
``c_sk``, ``s_sk`` and the shares it holds. Against an active server, in a deployment:
each site signs its advertisement with its kit key and checks every other site's against
the consortium CA (signing.py), so a server that substitutes, invents, renames or replays
keys makes the honest sites refuse the round instead of using the keys. NOT defended: a
server that shows different sites different rosters or survivor lists (the paper's
malicious variant adds a signed consistency round; here each site answers the unmasking
once and never gives both secrets of one site, so with ``t > n/2`` the honest sites' answers
cannot hold t shares of both), a server colluding with ``t`` or more sites, and a
simulation, where nothing is signed. Keep the threshold above n/2.

SecAgg+ (``graph: sparse``): the round's drawn sites S form a Harary graph of degree k over
a permutation seeded by the job id, the round and S (graph.py); the server tells each site
S with the advertise request and each site computes the graph itself. Everything above
then happens along the edges only: site u is sent the roster of its closed neighbourhood
N[u] = N(u) + {u} within U1 (and refuses one holding any other site), Shamir-shares its
secrets t-of-|N[u] within U1| among it (x = 1 + the holder's index in that roster), adds
pairwise masks only for its U2 neighbours, and is asked to unmask only the sites of N[u]
within U2. The threshold t holds per neighbourhood: the server aborts the round, naming the
site, when some site has fewer than t of N[u] left at a stage (N(v) for a dropped v's key).
Sum over U3: the pairwise masks of edges inside U3 cancel, as before; the server removes
b_u for u in U3 and, for v in U2 \\ U3, the masks between v and its U3 neighbours. What
changes in the threat model: the server with the sites of a neighbourhood rather than with
any t sites; a site's secrecy rests on fewer than t of N[u] colluding, and the partial sums
stay hidden only while the graph of the honest survivors is connected; graph.py bounds
both failures for k and t. The graph depends on S, which the server draws (each site
checks that S holds it, only sites of the job and at most the job's sites per round):
with sampling, or by leaving sites out, a server could try candidate sets S offline and
pick a graph; the complete-graph caveats (different rosters for different sites) hold per
neighbourhood, so keep t above half of k + 1.

Where it is: the messages, typed and checked where they arrive, in messages.py; the two
parties, :class:`SiteSession` (sessions.py) and :class:`ServerSession`
(server_session.py); the graph in graph.py; below, a whole round in memory
(:func:`run_round`), the messages in the order they travel.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import torch

from medfed.privacy.secagg.graph import round_graph
from medfed.privacy.secagg.messages import (
    KEY_BYTES,
    SecAggError,
    check_threshold,
    default_threshold,
)
from medfed.privacy.secagg.server_session import ServerSession
from medfed.privacy.secagg.sessions import SiteSession

if TYPE_CHECKING:
    from medfed.privacy.secagg.signing import Credentials

__all__ = ["KEY_BYTES", "SecAggError", "ServerSession", "SiteSession", "check_threshold", "default_threshold",
           "run_round"]


# --- in-memory driver ------------------------------------------------------------------------


def run_round(
    inputs: Mapping[str, torch.Tensor],
    threshold: int,
    drop_before_masking: Iterable[str] = (),
    drop_after_masking: Iterable[str] = (),
    job_id: str = "job",
    rnd: int = 1,
    drop_before_sharing: Iterable[str] = (),
    credentials: Mapping[str, Credentials] | None = None,
    neighbours: int | None = None,
) -> torch.Tensor:
    """One whole round in memory; every message goes through ``json.dumps``/``loads``.

    ``inputs`` maps site to its flat ring vector (all the same length). Sites in
    ``drop_before_sharing`` advertise keys, then vanish; in ``drop_before_masking`` share
    keys but send no masked input (their input is left out); in ``drop_after_masking``
    send their masked input (it is counted) but do not answer the unmasking. Returns the
    ring sum of the counted inputs; raises :class:`SecAggError` when too few remain.
    ``credentials`` (site -> :class:`~.signing.Credentials`): signed advertisements.
    ``neighbours`` k (SecAgg+): the seeded Harary graph of degree k over the inputs' sites
    (graph.py), ``threshold`` then counts within each closed neighbourhood; None: the
    complete graph.

    Example, with ``deltas`` mapping site to a float tensor::

        fp = FixedPoint(clip_range=1.0, max_sites=len(deltas))
        ring = run_round({s: fp.encode(d.flatten()) for s, d in deltas.items()}, threshold=2)
        total = fp.decode_sum(ring)  # float64, the sum of the clipped deltas within len(deltas) * fp.step
    """
    gone = {"drop_before_sharing": set(drop_before_sharing), "drop_before_masking": set(drop_before_masking),
            "drop_after_masking": set(drop_after_masking)}  # fmt: skip
    for name, sites in gone.items():
        if sites - set(inputs):
            raise SecAggError(f"{name}: {sorted(sites - set(inputs))} are not among the inputs' sites")
    if not inputs:
        raise SecAggError("inputs: no sites")
    length = next(iter(inputs.values())).numel()

    def wire(msg: object) -> object:
        return json.loads(json.dumps(msg))

    graph = None if neighbours is None else round_graph(inputs, neighbours, job_id, rnd)
    server = ServerSession(job_id, rnd, threshold, length, graph)
    sites = {v: SiteSession(v, job_id, rnd, (credentials or {}).get(v), graph) for v in sorted(inputs)}
    for v, s in sites.items():
        server.receive_advertisement(v, wire(s.advertise()))
    server.roster()
    for v, s in sites.items():
        if v not in gone["drop_before_sharing"]:
            server.receive_shares(v, wire(s.share_keys(wire(server.roster_for(v)), threshold)))
    for v, s in sites.items():
        if v not in gone["drop_before_sharing"] | gone["drop_before_masking"]:
            server.receive_masked(v, s.mask(inputs[v], wire(server.ciphertexts_for(v))))
    server.unmask_request()
    for v in server.survivors:
        if v not in gone["drop_after_masking"]:
            request = wire(server.unmask_request_for(v))
            server.receive_unmask(v, wire(sites[v].unmask(request["survivors"], request["dropped"])))
    return server.result()
