"""transport: ray joining a cluster of two nodes (two raylets on this machine, started by
``ray.cluster_utils.Cluster``), one site actor on each: the same metrics and final model as
in process. About 25 s on a 2-core machine (two raylets start, and an actor on each).
Marked ``ray_cluster``: ``pytest -m "not ray_cluster"`` leaves it out."""

from __future__ import annotations

import logging

import pytest

ray = pytest.importorskip("ray", reason='transport: ray needs the optional extra: pip install -e ".[ray]"')

from ray.cluster_utils import Cluster  # noqa: E402

from ray_jobs import assert_same, run  # noqa: E402

pytestmark = pytest.mark.ray_cluster


def test_a_two_node_cluster_equals_inprocess(tmp_path, monkeypatch, caplog):
    assert not ray.is_initialized()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        monkeypatch.setenv("RAY_ADDRESS", cluster.address)  # what `address: auto` joins
        ref = run(tmp_path / "inprocess", compare=[])
        with caplog.at_level(logging.INFO, logger="medfed"):
            got = run(tmp_path / "ray", transport="ray", ray={"address": "auto"}, compare=[])
        # one actor of 1 CPU on each node of 1 CPU: sites a and c on one, b on the other
        assert "2 site actor(s) of 1 CPU(s) each, on the Ray cluster" in caplog.text
        assert_same(ref, got)
        assert ray.is_initialized() and len([n for n in ray.nodes() if n["Alive"]]) == 2  # joined, left running
    finally:
        ray.shutdown()
        cluster.shutdown()
