"""Sites come back soon after the server restarts, however long it was away, and a resumed
server waits for the sites the run had: real processes on 127.0.0.1 (one server, three
sites), the server killed with SIGKILL and started again with --resume.

Times are read from the server's run.log (one clock, to the millisecond); the bound on a
site's return is generous (the target is about 1.2 s with the default --reconnect-max of
1 s; before, after such an outage, gRPC's own backoff alone had grown to 10 to 17 s)."""

from __future__ import annotations

import json
import re
import signal
import time
from datetime import datetime

import pytest
from safetensors.torch import load_file

from deploy_kits import SITES, make_kits, start, stop, wait_for
from test_deployment import _log, _same, _simulate, _sites, _small

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

OUTAGE = 25.0  # seconds the server stays down
BOUND = 8.0  # seconds from the restarted server listening to every site joined again


def _rejoined(log: str, after: int) -> dict[str, float]:
    """Seconds from the first ``listening on`` line at or after line ``after`` of run.log
    to each site's first ``joined`` line after it."""
    listening, joined = None, {}
    for line in log.splitlines()[after:]:
        m = re.match(r"(\S+) \w+ (.*)$", line)
        if not m:
            continue
        t = datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S.%f").timestamp()
        if listening is None and " listening on " in m.group(2):
            listening = t
        j = re.match(r"site '([^']+)' joined from", m.group(2))
        if listening is not None and j:
            joined.setdefault(j.group(1), t - listening)
    return joined


def test_sites_rejoin_soon_after_a_long_outage_and_the_model_is_the_uninterrupted_one(tmp_path):
    kits, port = make_kits(tmp_path)
    job = _small(tmp_path, "deployed", rounds=3)
    run = tmp_path / "deployed"
    args = ["server", "--kit", str(kits / "server"), "--job", str(job), "--listen", f"127.0.0.1:{port}"]
    server = start(args, tmp_path / "server.log")
    sites = _sites(kits, tmp_path)
    resumed = None
    try:
        wait_for(lambda: "federated round 1/3 done" in _log(run), 120, "round 1")
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
        time.sleep(OUTAGE)
        since = len(_log(run).splitlines())
        # a short join window: a site still backing off after the outage would miss it
        resumed = start([*args, "--resume", "--join-timeout", "20"], tmp_path / "server2.log")
        assert resumed.wait(timeout=240) == 0, (tmp_path / "server2.log").read_text()[-3000:]
        for s, p in sites.items():
            assert p.wait(timeout=30) == 0, (tmp_path / f"{s}.log").read_text()[-2000:]
    finally:
        stop(server, *sites.values(), *([resumed] if resumed else []))
    back = _rejoined(_log(run), since)
    assert set(back) == set(SITES), back
    assert max(back.values()) <= BOUND, back
    assert "starting without" not in _log(run) and "resuming without" not in _log(run)
    assert _same(load_file(str(run / "model_final.safetensors")), _simulate(job, tmp_path))


def test_a_resumed_server_waits_for_the_sites_it_had_and_names_the_missing(tmp_path):
    kits, port = make_kits(tmp_path)
    job = _small(tmp_path, "deployed", rounds=3, min_sites=2)
    run = tmp_path / "deployed"
    args = ["server", "--kit", str(kits / "server"), "--job", str(job), "--listen", f"127.0.0.1:{port}"]
    server = start(args, tmp_path / "server.log")
    sites = _sites(kits, tmp_path)
    resumed = None
    try:
        wait_for(lambda: "federated round 1/3 done" in _log(run), 120, "round 1")
        server.send_signal(signal.SIGKILL)
        sites["hospital_c"].send_signal(signal.SIGKILL)  # a member that does not come back
        server.wait(timeout=10)
        sites["hospital_c"].wait(timeout=10)
        resumed = start([*args, "--resume", "--join-timeout", "6"], tmp_path / "server2.log")
        assert resumed.wait(timeout=240) == 0, (tmp_path / "server2.log").read_text()[-3000:]
        for s in ("hospital_a", "hospital_b"):
            assert sites[s].wait(timeout=30) == 0, (tmp_path / f"{s}.log").read_text()[-2000:]
    finally:
        stop(server, *sites.values(), *([resumed] if resumed else []))
    log = _log(run)
    assert "resuming: waiting up to 6 s for the 3 site(s) that had joined before the stop: " \
           "hospital_a, hospital_b, hospital_c" in log
    assert "resuming without site(s) hospital_c, which had joined before the stop: not back within 6 s" in log
    audit = json.loads((run / "audit.json").read_text())["rows"]
    late = {r["site"] for r in audit if r["kind"] == "fit" and r["round"] >= 2 and r["status"] == "accepted"}
    assert late == {"hospital_a", "hospital_b"}
