"""SecAgg+ (privacy/secagg/graph.py): the seeded sparse graph, exact sums over it with and
without dropouts, refusals (a neighbourhood short of t, a neighbour list off the graph) and
its job settings."""

import copy
import itertools
import json
import random

import pytest
import torch
from test_secagg_rounds import INIT, JOB, SHIFT, SIZES, SecAggSites, _run

from medfed.config import parse_job
from medfed.core.errors import ConfigError
from medfed.privacy.secagg import (
    RING,
    SecAggError,
    ServerSession,
    SiteSession,
    run_round,
)
from medfed.privacy.secagg.graph import (
    choose_neighbours,
    graph_seed,
    harary_graph,
    neighbourhood_threshold,
    p_disconnected,
    p_lacking,
    round_graph,
)
from medfed.privacy.secagg.integration import SecAggClient

NAMES = [f"site{i:02d}" for i in range(12)]


def _connected(nodes: set[str], nb) -> bool:
    if not nodes:
        return True
    seen, todo = set(), [next(iter(nodes))]
    while todo:
        v = todo.pop()
        if v not in seen:
            seen.add(v)
            todo.extend(nb[v] & nodes)
    return seen == nodes


def _inputs(names, length=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {v: torch.randint(0, RING, (length,), generator=g) for v in names}


# --- the graph ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n,k", [(5, 2), (12, 4), (30, 8), (101, 22)])
def test_the_graph_is_k_regular_symmetric_and_connected(n, k):
    names = [f"s{i}" for i in range(n)]
    g = round_graph(names, k, "job", 3)
    assert all(len(g.neighbours[v]) == k and v not in g.neighbours[v] for v in names)
    assert all(u in g.neighbours[v] for u in names for v in g.neighbours[u])
    assert _connected(set(names), g.neighbours)


def test_the_graph_is_seeded_by_job_round_and_sites():
    a = round_graph(NAMES, 4, "job", 1)
    assert a == round_graph(list(reversed(NAMES)), 4, "job", 1)  # the order given does not matter
    assert a.neighbours != round_graph(NAMES, 4, "job", 2).neighbours
    assert a.neighbours != round_graph(NAMES, 4, "other", 1).neighbours
    assert graph_seed("job", 1, NAMES) != graph_seed("job", 1, NAMES[:-1])
    assert round_graph(NAMES, 11, "job", 1).neighbours["site00"] == frozenset(NAMES[1:])  # k = n - 1: complete


def test_removing_fewer_than_k_sites_keeps_the_graph_connected():
    names = [f"s{i}" for i in range(10)]
    g = round_graph(names, 4, "job", 1)
    for gone in itertools.combinations(names, 3):  # H(n, k) is k-connected
        assert _connected(set(names) - set(gone), g.neighbours)
    assert p_disconnected(10, 4, 3) == 0.0


def test_the_disconnection_bound_holds_empirically():
    n, k, m = 16, 4, 9
    rng, cut = random.Random(0), 0
    names = [f"s{i}" for i in range(n)]
    g = harary_graph(names, k, b"seed")
    trials = 3000
    for _ in range(trials):
        cut += not _connected(set(names) - set(rng.sample(names, m)), g.neighbours)
    assert 0 < cut / trials <= p_disconnected(n, k, m)


def test_the_chosen_degree_meets_its_bounds_and_grows_slowly():
    ks = {n: choose_neighbours(n, 0.1) for n in (10, 30, 100, 1000)}
    assert ks[10] < 9 and ks[100] < 40 and ks[1000] < 60 and ks[10] <= ks[30] <= ks[100] <= ks[1000]
    for n, k in ks.items():
        t, m = neighbourhood_threshold(k), n // 10
        assert p_disconnected(n, k, m) <= 2.0**-40 and p_lacking(n, k, t, m) <= 2.0**-20
    assert p_lacking(100, ks[100] - 2, neighbourhood_threshold(ks[100] - 2), 10) > 2.0**-20  # the smallest that does
    assert choose_neighbours(4, 0.3) == 3  # too few sites for a sparse graph: the complete one


def test_bad_degrees_are_refused():
    with pytest.raises(SecAggError, match="even degree"):
        round_graph(NAMES, 3, "job", 1)
    with pytest.raises(SecAggError, match="listed twice"):
        round_graph(["a", "a", "b"], 2, "job", 1)


# --- exact sums -------------------------------------------------------------------------------


@pytest.mark.parametrize("drops", [
    {},
    {"drop_before_sharing": ["site03"]},  # advertised keys, then vanished
    {"drop_before_masking": ["site05"], "drop_after_masking": ["site08"]},  # after sending its masked input
    {"drop_before_sharing": ["site01"], "drop_before_masking": ["site06"], "drop_after_masking": ["site10"]},
], ids=["none", "after-advertising", "before-and-after-masking", "all-stages"])
def test_the_sparse_sum_is_exact_and_equals_the_complete_graphs(drops):
    x = _inputs(NAMES)
    counted = set(NAMES) - set(drops.get("drop_before_sharing", [])) - set(drops.get("drop_before_masking", []))
    plain = sum(x[v] for v in counted) % RING
    sparse = run_round(x, 3, neighbours=4, **drops)
    assert torch.equal(sparse, plain)
    assert torch.equal(sparse, run_round(x, 3, **drops))


def test_a_neighbourhood_short_of_the_threshold_aborts_the_round():
    g = round_graph(NAMES, 4, "job", 1)
    v = "site00"
    two = sorted(g.neighbours[v])[:2]
    # t = 4 of a closed neighbourhood of 5: two of v's neighbours gone leave it 3
    with pytest.raises(SecAggError, match=rf"site '{v}': only 3 sites of its neighbourhood .* the threshold is 4"):
        run_round(_inputs(NAMES), 4, neighbours=4, drop_before_masking=two)
    assert torch.equal(run_round(_inputs(NAMES), 4, drop_before_masking=two),  # the complete graph has room
                       sum(t for s, t in _inputs(NAMES).items() if s not in two) % RING)


def test_a_dropped_site_needs_t_of_its_neighbours_to_answer():
    g = round_graph(NAMES, 4, "job", 1)
    v = "site00"
    others = sorted(g.neighbours[v])[:2]
    with pytest.raises(SecAggError, match="holders of its .* shares answered"):
        run_round(_inputs(NAMES), 3, neighbours=4, drop_before_masking=[v], drop_after_masking=others)


# --- the neighbour list a site is told ---------------------------------------------------------------


def _advertised(graph_for_server, graph_for_sites, names=NAMES[:8]):
    server = ServerSession("job", 1, 2, 4, graph_for_server)
    sites = {v: SiteSession(v, "job", 1, graph=graph_for_sites) for v in names}
    for v, s in sites.items():
        server.receive_advertisement(v, s.advertise())
    server.roster()
    return server, sites


def test_a_site_refuses_a_neighbour_list_off_the_seeded_graph():
    names = NAMES[:8]
    honest = round_graph(names, 2, "job", 1)
    chosen = harary_graph(names, 2, b"a graph the server picked")
    server, sites = _advertised(chosen, honest)
    v = next(v for v in names if chosen.neighbours[v] != honest.neighbours[v])
    with pytest.raises(SecAggError, match=rf"site '{v}', field 'roster': sites .* are not its neighbours"):
        sites[v].share_keys(json.loads(json.dumps(server.roster_for(v))), 2)
    with pytest.raises(SecAggError, match="not its neighbours"):  # the whole roster: the complete graph's list
        sites[v].share_keys(server.roster(), 2)
    server, sites = _advertised(honest, honest)
    assert sites[v].share_keys(server.roster_for(v), 2)["shares"].keys() == honest.neighbours[v]


def _client(sparse, site="a"):
    raw = copy.deepcopy(JOB)
    raw["privacy"] = {"secure_aggregation": sparse}
    return SecAggClient(parse_job(raw), site)


@pytest.mark.parametrize("sites,match", [
    (None, "expected the round's drawn sites"),
    (["b", "c", "d"], "this site is not among them"),
    (["a", "b", "z"], r"sites \['z'\] are not sites of this job"),
    (["a", "a", "b"], "a list of distinct names"),
])
def test_a_site_checks_the_drawn_sites_it_builds_the_graph_from(sites, match):
    client = _client({"graph": "sparse", "neighbours": 2, "threshold": 2})
    with pytest.raises(SecAggError, match=match):
        client.answer("secagg/advertise", 1, {"job_id": "j", "sites": sites})


def test_a_site_checks_the_threshold_it_is_told():
    client = _client({"graph": "sparse", "neighbours": 2, "threshold": 2})
    client.answer("secagg/advertise", 1, {"job_id": "j", "sites": sorted(SIZES)})
    with pytest.raises(SecAggError, match="field 'threshold': is 3, but the job's is 2"):
        client.answer("secagg/share", 1, {"roster": {}, "threshold": 3})


# --- over the round loop, and the job settings --------------------------------------------------


@pytest.mark.parametrize("fail_fit,fail_unmask", [((), ()), (("b",), ())])
def test_the_round_loop_gets_the_same_mean_over_a_ring_of_five(fail_fit, fail_unmask):
    """5 sites, k = 2: each site masks with 2 of the 4 others; the mean equals the complete graph's."""
    def job(sa):
        raw = copy.deepcopy(JOB)
        raw.update(min_sites=3, privacy={"secure_aggregation": sa})
        return parse_job(raw)
    sparse, complete = job({"graph": "sparse", "neighbours": 2, "threshold": 2}), job({"threshold": 2})
    a = SecAggSites(sparse, fail_fit, fail_unmask)
    out_sparse, out_complete = _run(a, sparse, INIT), _run(SecAggSites(complete, fail_fit, fail_unmask), complete, INIT)
    assert all(torch.equal(out_sparse[k], out_complete[k]) for k in INIT)
    alive = [s for s in SIZES if s not in fail_fit]
    shift = sum(SIZES[s] * SHIFT[s] for s in alive) / sum(SIZES[s] for s in alive)
    assert torch.allclose(out_sparse["w"], INIT["w"] + shift, atol=1e-4)


def _job(sa):
    raw = copy.deepcopy(JOB)
    raw["privacy"] = {"secure_aggregation": sa}
    return parse_job(raw)


@pytest.mark.parametrize("sa,expected", [
    ({"neighbours": 2}, "neighbours: only with graph: sparse"),
    ({"dropout": 0.2}, "dropout: only with graph: sparse"),
    ({"graph": "sparse", "neighbours": 2, "dropout": 0.2}, "dropout: chooses neighbours"),
    ({"graph": "sparse", "neighbours": 3}, "privacy.secure_aggregation.neighbours: must be even"),
    ({"graph": "sparse", "neighbours": 6}, "privacy.secure_aggregation.neighbours: is 6 but a site has only 4"),
    ({"graph": "sparse", "neighbours": 2, "threshold": 4},
     "privacy.secure_aggregation.threshold: is 4 but a site's neighbourhood holds only 3 sites"),
    ({"graph": "sparse", "dropout": 0.5}, "dropout"),
    ({"graph": "ring"}, "graph"),
])
def test_bad_sparse_settings_name_the_field(sa, expected):
    with pytest.raises(ConfigError) as e:
        _job(sa)
    assert expected in str(e.value)


def test_sparse_settings_and_the_job_hash():
    plain = _job({"threshold": 3})
    assert _job({"threshold": 3, "graph": "complete"}).job_hash() == plain.job_hash()  # defaults stay out of the hash
    assert plain.secagg_neighbours is None and plain.secagg_threshold == 3
    sparse = _job({"graph": "sparse", "neighbours": 2})
    assert sparse.job_hash() != plain.job_hash()
    assert (sparse.secagg_neighbours, sparse.secagg_threshold) == (2, 2)  # a majority of 3
    chosen = _job({"graph": "sparse"})  # 5 sites: too few for a sparse graph at dropout 0.1
    assert chosen.secagg_neighbours == choose_neighbours(5, 0.1) and chosen.secagg_threshold <= 5
