"""Site state in a real deployment (site/state.py): one server and three site processes on
127.0.0.1, SCAFFOLD (a control variate at each site).

- The server killed with SIGKILL after a site had trained round 3 and before the server
  saved it: resumed, it redoes round 3, the site goes back to its state of round 2, and the
  final model equals the simulation's bit for bit.
- A site killed with SIGKILL and started again takes its state up from its kit's state
  folder, and the server finds its state from the last round it kept."""

from __future__ import annotations

import signal
import sqlite3
import time

import pytest
from safetensors.torch import load_file

from deploy_kits import SITES, make_kits, start, stop, wait_for
from test_deployment import _log, _same, _simulate, _sites, _small

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

SGD = {"local_epochs": 1, "batch_size": 32, "lr": 0.02, "optimizer": "sgd", "momentum": 0.0}


def _accepted(run, rnd: int) -> int:
    """Federated updates of round ``rnd`` the server has accepted so far (its store, read-only)."""
    path = run / "state.sqlite"
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1) as db:
            row = db.execute("SELECT COUNT(*) FROM audit WHERE arm = 'federated' AND kind = 'fit' AND round = ? "
                             "AND status = 'accepted'", (rnd,)).fetchone()
        return int(row[0])
    except sqlite3.Error:
        return 0


def _flat(text: str) -> str:
    """A site's terminal log with its wrapped lines joined (words kept, whitespace one space)."""
    return " ".join(text.split())


def test_server_killed_after_a_site_trained_the_round_resumes_with_the_site_state_gone_back(tmp_path):
    kits, port = make_kits(tmp_path)
    job = _small(tmp_path, "deployed", rounds=4, compare=[], algorithm={"name": "scaffold"}, train=SGD)
    run = tmp_path / "deployed"
    args = ["server", "--kit", str(kits / "server"), "--job", str(job), "--listen", f"127.0.0.1:{port}"]
    server = start(args, tmp_path / "server.log")
    sites = _sites(kits, tmp_path)
    resumed = None
    try:
        deadline = time.monotonic() + 120
        while _accepted(run, 3) < 1:  # a site has trained round 3 and its update is in
            assert time.monotonic() < deadline, "no update of round 3"
            time.sleep(0.005)
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
        assert "federated round 3/4 done" not in _log(run)
        resumed = start([*args, "--resume"], tmp_path / "server2.log")
        assert resumed.wait(timeout=240) == 0, (tmp_path / "server2.log").read_text()[-3000:]
        for s, p in sites.items():
            assert p.wait(timeout=30) == 0, (tmp_path / f"{s}.log").read_text()[-2000:]
    finally:
        stop(server, *sites.values(), *([resumed] if resumed else []))
    assert "resuming job 'quickstart' after round 2" in _log(run)
    site_logs = _flat("".join((tmp_path / f"{s}.log").read_text() for s in SITES))
    assert "federated round 3 again (the server resumed): back to its state of round 2" in site_logs
    assert "no longer continues exactly" not in _log(run)
    assert _same(load_file(str(run / "model_final.safetensors")), _simulate(job, tmp_path))
    for s in SITES:  # the job is done: the sites' saved state is gone
        assert not list((kits / s / "state" / "site-state").glob("*.safetensors")), s


def test_a_site_killed_and_restarted_takes_its_state_up_again(tmp_path):
    kits, port = make_kits(tmp_path)
    job = _small(tmp_path, "deployed", rounds=5, compare=[], min_sites=2, round_timeout=20,
                 algorithm={"name": "scaffold"}, train={**SGD, "local_epochs": 3, "batch_size": 16})
    run = tmp_path / "deployed"
    server = start(["server", "--kit", str(kits / "server"), "--job", str(job), "--listen", f"127.0.0.1:{port}"],
                   tmp_path / "server.log")
    sites = _sites(kits, tmp_path)
    restarted = None
    try:
        victim = tmp_path / "hospital_c.log"
        wait_for(lambda: "federated round 3: training" in victim.read_text(), 120, "hospital_c training round 3")
        saved = list((kits / "hospital_c" / "state" / "site-state").glob("*.safetensors"))
        assert len(saved) == 1 and saved[0].stat().st_mode & 0o077 == 0  # the site's user only
        sites["hospital_c"].send_signal(signal.SIGKILL)
        sites["hospital_c"].wait(timeout=10)
        restarted = start(["site", "--kit", str(kits / "hospital_c"), "--give-up-after", "120"],
                          tmp_path / "hospital_c2.log")
        assert server.wait(timeout=240) == 0, (tmp_path / "server.log").read_text()[-3000:]
        for p in (sites["hospital_a"], sites["hospital_b"], restarted):
            assert p.wait(timeout=30) == 0
    finally:
        stop(server, *sites.values(), *([restarted] if restarted else []))
    again = _flat((tmp_path / "hospital_c2.log").read_text())
    assert "took up its algorithm state of federated round 2" in again, again[-2000:]
    # the round it was killed in went on without it; from its state of round 2 it trained on,
    # which is the last round the server kept of it: nothing to warn about
    assert "site 'hospital_c' left out" in _log(run)
    assert "no longer continues exactly" not in _log(run)
