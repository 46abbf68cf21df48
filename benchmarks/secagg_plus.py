"""SecAgg+ (a sparse seeded graph) against the complete graph of secure aggregation.

    python benchmarks/secagg_plus.py [--sites 10,30,100] [--params 100000] [--repeats 3] [--dropout 0.1]

For each number of sites n, one whole round of the protocol in memory, through medfed's
sessions (privacy/secagg: SiteSession, ServerSession), with ``--params`` ring values per
site (100,000 by default: a small CNN's worth of parameters), on

* complete: every pair of sites masks, every site shares with all (threshold n//2 + 1);
* sparse: the seeded Harary graph of degree k = ``choose_neighbours(n, dropout)``
  (privacy/secagg/graph.py), threshold a majority of the k + 1 of a neighbourhood.

In every round one site drops after sharing its keys (its pairwise masks are rebuilt
from its neighbours' shares: the costly case). Every message goes through JSON. Reported,
as medians over ``--repeats`` runs (complete and sparse alternate):

* server s: the server session's calls; site s: one site's calls (the mean over sites);
* bytes per site (the mean over the n sites; the dropped one sends no masked input),
  sent + received, by message: advertise (sent), roster (received),
  shares (sent), ciphertexts (received), masked input (sent; int32 on the wire, 4 bytes
  per value, as integration.py sends it), unmask request (received), unmask answer (sent);
* the failure bounds of graph.py for k, t and m = floor(f * n) sites removed, f = dropout
  (what k was chosen for), 2 * dropout and 3 * dropout:
  ``p_lacking`` = n * P[Hyp(n-1, m, k) >= k - t + 1] (some neighbourhood short of t) and
  ``p_disconnected`` = n (n - k + 1) / 2 * prod_{i<k} (m - i) / (n - i) (the graph of the
  remaining sites disconnected; 0 when m < k).

All sites run in this one process, one after another; a real site does only its own part.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections import defaultdict

import torch

from medfed.privacy.secagg import RING, ServerSession, SiteSession
from medfed.privacy.secagg.graph import (
    choose_neighbours,
    neighbourhood_threshold,
    p_disconnected,
    p_lacking,
    round_graph,
)
from medfed.privacy.secagg.messages import default_threshold

MESSAGES = ("advertise", "roster", "shares", "ciphertexts", "masked", "unmask_request", "unmask_answer")


def one_round(n: int, length: int, k: int | None, t: int, seed: int) -> dict:
    """One round; returns the server's seconds, each site's seconds and bytes by message."""
    names = [f"site{i:03d}" for i in range(n)]
    g = torch.Generator().manual_seed(seed)
    x = {v: torch.randint(0, RING, (length,), generator=g) for v in names}
    graph = None if k is None else round_graph(names, k, "bench", 1)
    site_s: dict[str, float] = defaultdict(float)
    server_s = 0.0
    size: dict[str, dict[str, int]] = {v: defaultdict(int) for v in names}

    def wire(msg):
        text = json.dumps(msg)
        return json.loads(text), len(text)

    def at_site(v, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        site_s[v] += time.perf_counter() - t0
        return out

    def at_server(fn, *args):
        nonlocal server_s
        t0 = time.perf_counter()
        out = fn(*args)
        server_s += time.perf_counter() - t0
        return out

    server = ServerSession("bench", 1, t, length, graph)
    sites = {v: SiteSession(v, "bench", 1, graph=graph) for v in names}
    dropped = names[n // 2]
    for v in names:
        ad, size[v]["advertise"] = wire(at_site(v, sites[v].advertise))
        at_server(server.receive_advertisement, v, ad)
    at_server(server.roster)
    for v in names:
        roster, size[v]["roster"] = wire(at_server(server.roster_for, v))
        shares, size[v]["shares"] = wire(at_site(v, sites[v].share_keys, roster, t))
        at_server(server.receive_shares, v, shares)
    for v in names:
        if v == dropped:
            continue
        boxes, size[v]["ciphertexts"] = wire(at_server(server.ciphertexts_for, v))
        y = at_site(v, sites[v].mask, x[v], boxes)
        size[v]["masked"] = 4 * length
        at_server(server.receive_masked, v, y)
    at_server(server.unmask_request)
    for v in server.survivors:
        request, size[v]["unmask_request"] = wire(at_server(server.unmask_request_for, v))
        answer, size[v]["unmask_answer"] = wire(at_site(v, sites[v].unmask, request["survivors"], request["dropped"]))
        at_server(server.receive_unmask, v, answer)
    total = at_server(server.result)
    expected = sum(x[v] for v in names if v != dropped) % RING
    assert torch.equal(total, expected), "the sum is wrong"
    return {"server": server_s, "site": statistics.mean(site_s.values()),
            "bytes": {m: statistics.mean(size[v][m] for v in names) for m in MESSAGES}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", default="10,30,100")
    ap.add_argument("--params", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dropout", type=float, default=0.1)
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"{args.params} ring values per site; one site drops after sharing its keys; median of {args.repeats}")
    fs = [args.dropout * i for i in (1, 2, 3)]
    gone = "/".join(f"{f:.0%}" for f in fs)
    print(f"| sites | graph | k | t | server s | site s | KiB/site sent+recv | of which keys+shares | "
          f"p_disconnected ({gone} gone) | p_lacking ({gone} gone) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in (int(s) for s in args.sites.split(",")):
        ms = [math.floor(f * n) for f in fs]
        k_sparse = choose_neighbours(n, args.dropout)
        arms = {"complete": (None, default_threshold(n)), "sparse": (k_sparse, neighbourhood_threshold(k_sparse))}
        runs: dict[str, list[dict]] = {a: [] for a in arms}
        for rep in range(args.repeats):  # alternate, so that drift hits both alike
            for arm, (k, t) in arms.items():
                runs[arm].append(one_round(n, args.params, k, t, seed=rep))
        for arm, (k, t) in arms.items():
            kk = n - 1 if k is None else k
            med = {key: statistics.median(r[key] for r in runs[arm]) for key in ("server", "site")}
            by_msg = {msg: statistics.median(r["bytes"][msg] for r in runs[arm]) for msg in MESSAGES}
            total = sum(by_msg.values()) / 1024
            overhead = total - by_msg["masked"] / 1024
            print(f"| {n} | {arm} | {kk} | {t} | {med['server']:.3f} | {med['site']:.3f} | {total:.1f} | "
                  f"{overhead:.1f} | {' / '.join(f'{p_disconnected(n, kk, m):.2g}' for m in ms)} | "
                  f"{' / '.join(f'{p_lacking(n, kk, t, m):.2g}' for m in ms)} |")
            print("  bytes/site by message: " + ", ".join(f"{msg} {by_msg[msg]:.0f}" for msg in MESSAGES),
                  flush=True)


if __name__ == "__main__":
    main()
