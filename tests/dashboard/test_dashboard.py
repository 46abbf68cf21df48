"""medfed dashboard: finding the run, reading it as it is written, the HTTP server and its
token, and the page in a real browser (headless Chromium)."""

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medfed.cli import app
from medfed.config import load_job
from medfed.core.errors import NetworkError, RunDirError
from medfed.dashboard.page import render_page, static_charts
from medfed.dashboard.readers import LineFollower, parse_log_line
from medfed.dashboard.server import start
from medfed.dashboard.snapshot import RunView, charts, job_summary
from medfed.dashboard.source import RunSource, check_run_folder
from medfed.server.store import RunStore
from medfed.tracking.metrics import MetricsWriter, read_metrics

SITES = ("north", "south", "east")


def write_job(folder: Path, rounds: int = 3, budget: float | None = 20.0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    dp = ("privacy:\n  dp: {noise: central, noise_multiplier: 1.0, clip: 0.5, delta: 1.0e-5"
          + (f", max_epsilon: {budget}" if budget is not None else "") + "}\n")
    sites = "".join(f"    - {{name: {s}, n_train: 40, n_val: 20, n_test: 20}}\n" for s in SITES)
    (folder / "job.yaml").write_text(
        f"name: watched\nseed: 0\noutput: {folder}\nrounds: {rounds}\ndevice: cpu\n"
        f"data:\n  source: synthetic\n  image_size: 16\n  sites:\n{sites}"
        "model: {name: small_cnn, width: 4, norm: group}\n"
        "task: {kind: classification, labels: binary, num_classes: 2, monitor: auc}\n"
        "algorithm: {name: fedavg}\n" + dp + "compare: [local]\n")
    sites_json = {"sites": [{"name": s, "train": 40, "val": 20, "test": 20, "held_out": False} for s in SITES]}
    (folder / "sites.json").write_text(json.dumps(sites_json))


def stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t)) + ".000"


def log_lines(folder: Path, *lines: str) -> None:
    with open(folder / "run.log", "a", encoding="utf-8") as f:
        for line in lines:
            f.write(f"{stamp(time.time())} {line}\n")


def simulate_round(folder: Path, rnd: int, rounds: int = 3, failed: dict[str, str] | None = None) -> None:
    """What a simulation writes for federated round ``rnd``: its log lines and metrics."""
    failed = failed or {}
    log_lines(folder, f"INFO federated round {rnd}/{rounds} started: {', '.join(SITES)}")
    for site, cause in failed.items():
        log_lines(folder, f"WARNING federated round {rnd}: site '{site}' left out: {cause}")
    with MetricsWriter(folder / "metrics.jsonl") as m:
        m.write(rnd, "federated", "all", "train", "model_bytes", 1000)
        for i, site in enumerate(SITES):
            if site not in failed:
                m.write(rnd, "federated", site, "train", "bytes_sent", 1000)
                m.write(rnd, "federated", site, "train", "loss", 1.0 / rnd)
            m.write(rnd, "federated", site, "test", "auc", 0.5 + 0.1 * rnd - 0.05 * i)
            m.write(rnd, "federated", site, "val", "auc", 0.5 + 0.1 * rnd)
        m.write(rnd, "federated", "all", "test", "auc", 0.5 + 0.1 * rnd)
        m.write(rnd, "federated", "all", "train", "epsilon", 3.0 * rnd)
    log_lines(folder, f"INFO federated round {rnd}/{rounds} done ({len(SITES) - len(failed)} sites, "
                      f"{len(failed)} failed, epsilon {3.0 * rnd:.3g} at delta 1e-05)")


def snapshot(folder: Path) -> dict:
    return json.loads(RunView(check_run_folder(folder)).current()[1])


def sites_by_name(snap: dict) -> dict:
    return {s["name"]: s for s in snap["sites"]}


# --------------------------------------------------------------------------- bad input


def test_a_folder_that_is_not_a_run_is_refused_with_what_to_pass(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(RunDirError, match="is not a run folder: it holds none of job.yaml"):
        check_run_folder(tmp_path)
    with pytest.raises(RunDirError, match="does not exist, and no run is being written there"):
        check_run_folder(tmp_path / "missing")
    with pytest.raises(RunDirError, match="is a file, not a run folder"):
        check_run_folder(tmp_path / "notes.txt")
    write_job(tmp_path / "run_a")
    with pytest.raises(RunDirError, match=r"it holds run folders \(run_a\): pass one of them"):
        check_run_folder(tmp_path)


def test_cli_refuses_a_folder_that_is_not_a_run(tmp_path):
    result = CliRunner().invoke(app, ["dashboard", str(tmp_path)])
    assert result.exit_code == 2
    assert "is not a run folder" in result.output


def test_a_port_in_use_is_refused_naming_the_option(tmp_path):
    write_job(tmp_path / "run")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        with pytest.raises(NetworkError, match="cannot listen on 127.0.0.1:.*choose another with --port"):
            start(tmp_path / "run", port=taken.getsockname()[1])
    finally:
        taken.close()


@pytest.fixture
def served(tmp_path):
    """A dashboard of a finished simulation-like run folder, served on a free port."""
    folder = tmp_path / "run"
    write_job(folder)
    for rnd in (1, 2, 3):
        simulate_round(folder, rnd)
    (folder / "run.json").write_text(json.dumps({"status": "complete", "job_hash": "f" * 64,
                                                 "finished": "2026-01-01T00:00:00+00:00"}))
    server = start(folder, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, folder
    server.shutdown()
    server.server_close()


def get(url: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_every_route_needs_the_token_and_a_wrong_one_is_logged(served, caplog):
    server, _ = served
    base = f"http://127.0.0.1:{server.server_address[1]}"
    caplog.set_level(logging.WARNING, logger="medfed.dashboard")
    for path in ("/", "/api/state", "/nothing"):
        assert get(base + path)[0] == 403
        assert get(base + path + "?token=wrong")[0] == 403
        assert get(base + path, {"X-Medfed-Token": server.token + "x"})[0] == 403
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 9
    assert any("wrong token" in m for m in refusals) and any("no token" in m for m in refusals)
    assert all(server.token not in m for m in refusals)
    assert get(base + "/?token=" + server.token)[0] == 200
    assert get(base + "/api/state", {"X-Medfed-Token": server.token})[0] == 200
    assert get(base + "/nothing?token=" + server.token)[0] == 404


def test_the_page_is_self_contained_and_locked_down(served):
    server, _ = served
    status, headers, body = get(server.url)
    assert status == 200
    page = body.decode()
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    nonce = csp.split("'nonce-")[1].split("'")[0]
    assert page.count(f'nonce="{nonce}"') == 3  # the style and the two scripts, nothing else runs
    assert "https://" not in page.replace("https://github.com/leeoniya/uPlot", "")  # no CDN, no fonts
    assert 'src="http' not in page and "<link rel=\"stylesheet\"" not in page
    assert headers["Cache-Control"] == "no-store" and headers["Referrer-Policy"] == "no-referrer"


def test_the_state_of_a_finished_run(served):
    server, folder = served
    status, _, body = get(server.url.replace("/?token=", "/api/state?token="))
    snap = json.loads(body)
    assert status == 200 and snap["mode"] == "simulation"
    assert snap["status"]["state"] == "complete"
    assert snap["job"]["name"] == "watched" and snap["job"]["hash"] == "f" * 64
    assert snap["progress"]["round"] == 3 and snap["progress"]["done"] == 3 and snap["progress"]["total"] == 3
    assert [t["round"] for t in snap["progress"]["timing"]] == [1, 2, 3]
    assert [s["state"] for s in snap["sites"]] == ["answered"] * 3
    assert [s["name"] for s in snap["sites"]] == list(SITES)
    curves = {c["key"]: c for c in snap["curves"]}
    assert list(curves)[0] == "test/auc" and "val/auc" in curves and "train/loss" in curves
    north = next(s for s in curves["test/auc"]["series"] if s["site"] == "north")
    assert curves["test/auc"]["rounds"] == [1, 2, 3] and north["values"] == pytest.approx([0.6, 0.7, 0.8])
    assert "train/epsilon" not in curves and "train/bytes_sent" not in curves  # their own charts
    assert snap["privacy"]["epsilon"] == [3.0, 6.0, 9.0] and snap["privacy"]["budget"] == 20.0
    sent = next(s for s in snap["bytes"]["series"] if s["label"].startswith("update tensors"))
    assert sent["values"] == [3000.0, 3000.0, 3000.0]
    assert snap["audit"] is None
    assert snap["log"]["lines"][0]["text"].endswith("federated round 1/3 started: north, south, east")
    # unchanged since: a small answer, not the snapshot again
    again = json.loads(get(server.url.replace("/?token=", f"/api/state?since={snap['version']}&token="))[2])
    assert again["unchanged"] is True and again["version"] == snap["version"]


def test_a_run_in_progress_is_followed_from_its_staging_folder_into_place(tmp_path):
    output = tmp_path / "run"
    staging = tmp_path / f".run.partial-{os.getpid()}"  # this process: alive, as the writer of a real run is
    write_job(staging)
    view = RunView(check_run_folder(output))  # given the output folder, which does not exist yet
    simulate_round(staging, 1)
    snap = json.loads(view.current()[1])
    assert snap["status"]["state"] == "running" and snap["folder"] == str(staging)
    assert snap["job"]["hash"] == load_job(staging / "job.yaml").job_hash()  # before run.json says it
    assert snap["progress"]["round"] == 1
    simulate_round(staging, 2, failed={"east": "update holds NaN values"})
    time.sleep(0.6)
    snap = json.loads(view.current()[1])
    assert snap["progress"]["round"] == 2
    east = sites_by_name(snap)["east"]
    assert east["state"] == "failed" and east["cause"] == "update holds NaN values" and east["round"] == 2
    os.replace(staging, output)  # the run is complete and moved into place
    (output / "run.json").write_text(json.dumps({"status": "complete"}))
    time.sleep(0.6)
    snap = json.loads(view.current()[1])
    assert snap["folder"] == str(output) and snap["status"]["state"] == "complete"
    assert snap["progress"]["round"] == 2 and len(snap["curves"][0]["series"]) == 4  # not read twice
    shutil.rmtree(output)
    time.sleep(0.6)
    snap = json.loads(view.current()[1])
    assert snap["status"]["state"] == "gone" and snap["progress"]["round"] == 2  # the last state stays shown


def test_a_staging_folder_whose_process_is_gone_shows_as_stopped(tmp_path):
    child = subprocess.Popen(["true"])
    child.wait()
    dead = child.pid  # a process that has ended
    staging = tmp_path / f".run.partial-{dead}"
    write_job(staging)
    assert RunSource(staging).output == tmp_path / "run"
    snap = snapshot(tmp_path / "run")
    assert snap["status"]["state"] == "stopped" and str(dead) in snap["status"]["text"]


def test_a_job_this_medfed_cannot_load_still_shows_its_name_rounds_and_sites(tmp_path):
    folder = tmp_path / "run"
    write_job(folder)
    with open(folder / "job.yaml", "a") as f:
        f.write("a_field_of_a_later_medfed: 1\n")
    simulate_round(folder, 1)
    snap = snapshot(folder)
    assert snap["job"]["name"] == "watched" and snap["job"]["rounds"] == 3 and "hash" not in snap["job"]
    assert [s["name"] for s in snap["sites"]] == list(SITES)
    assert any("a_field_of_a_later_medfed" in p for p in snap["problems"])


# --------------------------------------------------------------------------- deployment


def test_a_deployment_is_read_from_its_store_while_the_server_writes_it(tmp_path):
    folder = tmp_path / "deployed"
    write_job(folder)
    job_hash = load_job(folder / "job.yaml").job_hash()
    t = time.time() - 100
    with RunStore(folder / "state.sqlite") as store:  # the server's connection stays open throughout
        store.set_job(job_hash, "{}")
        store.site_seen("north", "fp1", "ipv4:10.0.0.1:5000", t)
        store.site_seen("south", "fp2", "ipv4:10.0.0.2:5000", t + 1)
        view = RunView(check_run_folder(folder))
        snap = json.loads(view.current()[1])
        assert snap["mode"] == "deployment" and snap["job"]["hash"] == job_hash
        assert snap["status"]["state"] == "running"
        assert {s["name"]: s["state"] for s in snap["sites"]} == {"north": "joined", "south": "joined",
                                                                   "east": "waiting"}
        store.round_started("federated", 1, ["north", "south"], t + 2)
        store.audit("federated", 1, "north", "fit", "accepted", 5000, 1200, "ab" * 32, 3.0, when=t + 5)
        store.audit("federated", 1, "south", "fit", "refused", 5000, 900, "cd" * 32, 2.0,
                    reason="parameter 'fc.weight' holds NaN", when=t + 6)
        for site in ("north", "all"):
            store.write_metric(1, "federated", site, "test", "auc", 0.7)
        store.write_metric(1, "federated", "north", "train", "bytes_sent", 1200)
        store.round_completed("federated", 1, "state.safetensors", t + 7)
        store.round_started("federated", 2, ["north", "south"], t + 8)
        store.audit("federated", 2, "south", "fit", "timeout", 5000, 0, None, 60.0, reason="no answer in 60 s",
                    when=t + 70)
        store.audit("connection", 0, "east", "call", "failed", 0, 0, None, 0.0,
                    reason="cannot take part in the job: the data folder is empty", when=t + 9)
        time.sleep(0.6)
        snap = json.loads(view.current()[1])
        sites = sites_by_name(snap)
        assert sites["north"]["state"] == "training" and sites["north"]["round"] == 2
        assert sites["north"]["last_seen"] == pytest.approx(t + 5)
        assert sites["south"]["state"] == "failed" and sites["south"]["cause"] == "fit timeout: no answer in 60 s"
        assert sites["south"]["last_seen"] == pytest.approx(t + 6)  # a timeout is not a sign of life
        assert sites["east"]["state"] == "declined" and sites["east"]["cause"] == "the data folder is empty"
        assert snap["progress"]["round"] == 2 and snap["progress"]["done"] == 1 and snap["progress"]["in_round"]
        assert snap["progress"]["timing"][0]["seconds"] == pytest.approx(5.0)
        assert snap["audit"]["total"] == 4 and snap["audit"]["statuses"] == {"accepted": 1, "refused": 1,
                                                                              "timeout": 1, "failed": 1}
        assert snap["audit"]["rows"][0]["site"] == "east"  # newest first
        wire = {s["label"]: s["values"] for s in snap["bytes"]["series"]}
        assert wire["server to sites (wire)"] == [10000, 5000] and wire["sites to server (wire)"] == [2100, 0]
        assert snap["curves"][0]["key"] == "test/auc"
        store.write_metric(2, "federated", "north", "test", "auc", 0.8)  # the reader held no lock
    assert not (folder / "state.sqlite-wal").exists()  # the server closed the store
    time.sleep(0.6)
    assert json.loads(view.current()[1])["curves"][0]["rounds"] == [1, 2]
    assert not (folder / "state.sqlite-wal").exists() and not (folder / "state.sqlite-shm").exists()  # read only


# --------------------------------------------------------------------------- readers


def test_log_lines_of_the_round_loop_become_events():
    when, level, e = parse_log_line("2026-12-04T19:46:56.992 INFO federated round 1/3 started: north, south")
    assert level == "INFO" and (e.kind, e.arm, e.round, e.rounds, e.sites) == ("round_started", "federated", 1, 3,
                                                                              ("north", "south"))
    assert when == pytest.approx(time.mktime(time.strptime("2026-12-04T19:46:56", "%Y-%m-%dT%H:%M:%S")) + 0.992)
    _, _, e = parse_log_line("2026-12-04T19:46:59.196 WARNING local round 2: site 'b' could not evaluate: out of memory")
    assert (e.kind, e.arm, e.round, e.sites, e.cause) == ("failed", "local", 2, ("b",),
                                                          "could not evaluate: out of memory")
    assert parse_log_line("a continuation line")[0] is None


def test_line_follower_reads_complete_lines_and_starts_over_on_a_new_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    follower = LineFollower()
    assert follower.read(path) == ([], False)
    path.write_text("one\ntw")
    assert follower.read(path) == (["one"], True)
    with open(path, "a") as f:
        f.write("o\n")
    assert follower.read(path) == (["two"], False)
    path.write_text("new\n")  # replaced (shorter): from its start
    assert follower.read(path) == (["new"], True)


def test_vendored_chart_library_is_the_released_file():
    static = Path(__file__).parents[2] / "src" / "medfed" / "dashboard" / "static"
    digests = {"uPlot.iife.min.js": "19c8d4c6ad88929a79f4ae49d6f7161566dfd0ba3d15cc495e974f787eb78f1f",
               "uPlot.min.css": "df630c6a8d6f8eeaff264b50f73ce5b114f646ffd9a0bb74f049b0a00135fa04"}
    for name, digest in digests.items():
        assert hashlib.sha256((static / name).read_bytes()).hexdigest() == digest
        assert digest in (static / "VENDORED.md").read_text()
    assert "MIT" in (static / "uPlot.LICENSE").read_text()
    assert "uPlot" in render_page("n")


# --------------------------------------------------------------------------- in a browser


class _Dom(HTMLParser):
    """The text of a dumped DOM, the sites table's rows and elements by id."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, dict] = {}
        self.ids: dict[str, str] = {}
        self._row: str | None = None
        self._id: list[str | None] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "data-site" in a:
            self._row = a["data-site"]
            self.rows[self._row] = {"state": a.get("data-state"), "text": ""}
        if tag not in ("br", "input", "meta", "link", "img", "canvas"):
            self._id.append(a.get("id"))

    def handle_endtag(self, tag):
        if tag == "tr":
            self._row = None
        if self._id and tag not in ("br", "input", "meta", "link", "img", "canvas"):
            self._id.pop()

    def handle_data(self, data):
        self.text.append(data)
        if self._row:
            self.rows[self._row]["text"] += data
        for i in self._id:
            if i:
                self.ids[i] = self.ids.get(i, "") + data


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(profile: Path, url: str, *args: str) -> str:
    cmd = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
           f"--user-data-dir={profile}", "--virtual-time-budget=6000", "--window-size=1280,1800", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90).stdout


def dom(profile: Path, url: str) -> _Dom:
    parsed = _Dom()
    parsed.feed(chromium(profile, url, "--dump-dom"))
    return parsed


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium; .ci/run installs it)")
def test_a_person_watching_in_a_browser_sees_the_run_advance_and_a_failed_site(tmp_path):
    folder = tmp_path / "run"
    write_job(folder)
    simulate_round(folder, 1)
    server = start(folder, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        page = dom(tmp_path / "profile", server.url)
        assert page.ids["round-counter"] == "1" and page.ids["round-total"] == "3"
        assert set(page.rows) == set(SITES) and all(r["state"] == "answered" for r in page.rows.values())
        assert "medfed run: watched" in page.ids["job-name"]
        assert load_job(folder / "job.yaml").job_hash() in page.ids["job-hash"]
        assert "north · federated" in "".join(page.text)  # the curves' legend: uPlot drew them

        simulate_round(folder, 2, failed={"east": "update holds NaN values"})
        log_lines(folder, 'WARNING a peer said <b id="injected">bold</b>')  # text, never markup
        page = dom(tmp_path / "profile", server.url)
        assert "injected" not in page.ids and '<b id="injected">bold</b>' in page.ids["log"]
        assert page.ids["round-counter"] == "2"
        assert page.rows["east"]["state"] == "failed"
        assert "failed" in page.rows["east"]["text"] and "update holds NaN values" in page.rows["east"]["text"]
        assert page.rows["north"]["state"] == "answered"
        assert page.rows["north"]["text"].endswith("s ago")  # last seen, a moment ago
        assert "ε = 6.000 spent after round 2 of a budget of 20 (30%)" in page.ids["privacy-text"]
        assert "left out: update holds NaN values" in page.ids["log"]

        shot = tmp_path / "dashboard.png"
        chromium(tmp_path / "profile", server.url, f"--screenshot={shot}")
        assert shot.stat().st_size > 10_000
        if os.environ.get("MEDFED_ARTIFACTS"):
            artifacts = Path(os.environ["MEDFED_ARTIFACTS"])
            artifacts.mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, artifacts / "dashboard.png")
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium; .ci/run installs it)")
def test_the_same_charts_draw_in_a_static_self_contained_page(tmp_path):
    folder = tmp_path / "run"
    write_job(folder)
    for rnd in (1, 2):
        simulate_round(folder, rnd, rounds=2)
    job = job_summary(load_job(folder / "job.yaml"))
    fragment = static_charts(charts(read_metrics(folder / "metrics.jsonl"), job))
    assert "http" not in fragment.replace("https://github.com/leeoniya/uPlot", "")  # nothing fetched
    hostile = static_charts({"curves": [{"key": "k", "split": "test", "metric": "</script><b>", "rounds": [],
                                         "series": []}]})
    assert hostile.count("</script>") == 3  # the data's, uPlot's and the page script's own ends only
    page = tmp_path / "page.html"
    page.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>{fragment}</body></html>")
    parsed = dom(tmp_path / "profile", page.as_uri())
    text = "".join(parsed.text)
    assert "north · federated" in text and "all · federated" in text
    assert "ε = 6.000 spent after round 2 of a budget of 20 (30%)" in parsed.ids["privacy-text"]
