import json
import os
import signal
import stat
import sqlite3
import subprocess
import sys
import textwrap
import threading

import pytest
import yaml

from medfed.core.errors import RunDirError
from medfed.server.store import RunStore
from medfed.tracking.metrics import read_metrics
from medfed.tracking.report import render_report

H1, H2 = "a" * 64, "b" * 64


@pytest.fixture
def store(tmp_path):
    with RunStore(tmp_path / "state.sqlite") as s:
        yield s


def test_pragmas_and_schema_version(tmp_path):
    with RunStore(tmp_path / "state.sqlite"):
        pass
    conn = sqlite3.connect(tmp_path / "state.sqlite")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "1"
    conn.close()


def test_job_is_bound_once(tmp_path):
    path = tmp_path / "state.sqlite"
    with RunStore(path) as s:
        assert s.job_hash() is None
        s.set_job(H1, '{"name": "demo"}')
        s.set_job(H1, '{"name": "demo"}')  # same job: fine
        assert s.job_hash() == H1
    with RunStore(path) as s:
        assert s.job_hash() == H1
        with pytest.raises(RunDirError, match=f"belongs to job {H1}, not {H2}"):
            s.set_job(H2, "{}")
        assert s.job_hash() == H1


def test_participants_upsert(store):
    store.site_seen("north", "fp1", "10.0.0.1:5000", 100.0)
    store.site_seen("south", "fp9", "10.0.0.2:5000", 101.0)
    store.site_seen("north", "fp2", "10.0.0.3:5000", 150.0)
    assert store.participants() == [
        {"name": "north", "fingerprint": "fp2", "address": "10.0.0.3:5000", "first_seen": 100.0, "last_seen": 150.0,
         "connects": 2},
        {"name": "south", "fingerprint": "fp9", "address": "10.0.0.2:5000", "first_seen": 101.0, "last_seen": 101.0,
         "connects": 1},
    ]


def test_rounds(store):
    assert store.last_completed_round("federated") is None
    store.round_started("federated", 1, ["north", "south"], 10.0)
    store.round_completed("federated", 1, "round_0001.safetensors", 20.0)
    store.round_started("federated", 2, ["north"], 30.0)
    store.round_started("finetuned", 1, ["south"], 40.0)
    store.round_completed("finetuned", 1, "ft_0001.safetensors", 50.0)
    assert store.last_completed_round("federated") == (1, "round_0001.safetensors")
    assert store.last_completed_round("finetuned") == (1, "ft_0001.safetensors")
    assert store.last_completed_round("local") is None
    store.round_completed("federated", 2, "round_0002.safetensors", 35.0)
    assert store.last_completed_round("federated") == (2, "round_0002.safetensors")
    assert store.rounds() == [
        {"arm": "federated", "round": 1, "sites": ["north", "south"], "started": 10.0, "completed": 20.0,
         "checkpoint": "round_0001.safetensors"},
        {"arm": "federated", "round": 2, "sites": ["north"], "started": 30.0, "completed": 35.0,
         "checkpoint": "round_0002.safetensors"},
        {"arm": "finetuned", "round": 1, "sites": ["south"], "started": 40.0, "completed": 50.0,
         "checkpoint": "ft_0001.safetensors"},
    ]
    store.round_started("federated", 2, ["south"], 60.0)  # redone: no longer complete
    assert store.last_completed_round("federated") == (1, "round_0001.safetensors")


def test_audit_and_replay_check(store, tmp_path):
    store.audit("federated", 1, "north", "fit", "accepted", 1000, 2000, "c" * 64, 1.5, when=5.0)
    store.audit("federated", 1, "south", "fit", "refused", 1000, 2000, "d" * 64, 0.5, reason="NaN in update",
                when=6.0)
    store.audit("federated", 1, "north", "evaluate", "accepted", 1000, 10, "e" * 64, 0.2, when=7.0)
    store.audit("federated", 1, "south", "evaluate", "timeout", 1000, 0, None, 30.0)
    assert store.seen_update("c" * 64)
    assert not store.seen_update("d" * 64)  # refused
    assert not store.seen_update("e" * 64)  # not a fit
    assert not store.seen_update("f" * 64)
    rows = store.audit_rows()
    assert [r["status"] for r in rows] == ["accepted", "refused", "accepted", "timeout"]
    assert rows[1] == {"arm": "federated", "round": 1, "site": "south", "kind": "fit", "status": "refused",
                       "bytes_sent": 1000, "bytes_received": 2000, "sha256": "d" * 64, "seconds": 0.5,
                       "reason": "NaN in update", "when": 6.0}
    assert rows[3]["sha256"] is None and rows[3]["reason"] is None and rows[3]["when"] > 1e9
    with pytest.raises(ValueError, match="kind"):
        store.audit("federated", 1, "north", "train", "accepted", 0, 0, None, 0.0)
    with pytest.raises(ValueError, match="status"):
        store.audit("federated", 1, "north", "fit", "ok", 0, 0, None, 0.0)
    assert store.export_audit(tmp_path / "audit.json") == 4
    assert json.loads((tmp_path / "audit.json").read_text()) == {"rows": rows}
    assert not list(tmp_path.glob("*.tmp"))


def test_metrics_replace_in_place_and_export(store, tmp_path):
    store.write_metric(1, "federated", "north", "test", "auc", 0.5)
    store.write_metric(1, "federated", "south", "test", "auc", float("nan"))
    store.write_metric(1, "local", "north", "test", "auc", 0.4)
    store.write_metric(1, "federated", "north", "test", "auc", 0.7)  # the redo of round 1
    with pytest.raises(ValueError, match="arm"):
        store.write_metric(1, "nope", "north", "test", "auc", 0.1)
    with pytest.raises(ValueError, match="split"):
        store.write_metric(1, "local", "north", "holdout", "auc", 0.1)
    path = tmp_path / "metrics.jsonl"
    assert store.export_metrics(path) == 3
    assert read_metrics(path) == [
        {"round": 1, "arm": "federated", "site": "north", "split": "test", "metric": "auc", "value": 0.7},
        {"round": 1, "arm": "federated", "site": "south", "split": "test", "metric": "auc", "value": None},
        {"round": 1, "arm": "local", "site": "north", "split": "test", "metric": "auc", "value": 0.4},
    ]
    assert not list(tmp_path.glob("*.tmp"))


def test_drop_after_only_touches_that_arm(store, tmp_path):
    for arm in ("federated", "finetuned"):
        for rnd in (1, 2, 3):
            store.round_started(arm, rnd, ["north"], float(rnd))
            store.round_completed(arm, rnd, f"{arm}_{rnd}", float(rnd))
            store.write_metric(rnd, arm, "north", "test", "auc", 0.1 * rnd)
            store.audit(arm, rnd, "north", "fit", "accepted", 1, 1, f"{arm}{rnd}", 0.1)
    store.drop_after("federated", 1)
    assert store.last_completed_round("federated") == (1, "federated_1")
    assert store.last_completed_round("finetuned") == (3, "finetuned_3")
    assert [(r["arm"], r["round"]) for r in store.rounds()] == [
        ("federated", 1), ("finetuned", 1), ("finetuned", 2), ("finetuned", 3)]
    assert [(r["arm"], r["round"], r["status"]) for r in store.audit_rows() if r["arm"] == "federated"] == [
        ("federated", 1, "accepted"), ("federated", 2, "redone"), ("federated", 3, "redone")]
    assert {r["status"] for r in store.audit_rows() if r["arm"] == "finetuned"} == {"accepted"}
    assert not store.seen_update("federated2") and store.seen_update("finetuned2")
    store.export_metrics(tmp_path / "m.jsonl")
    assert [(r["arm"], r["round"]) for r in read_metrics(tmp_path / "m.jsonl")] == [
        ("federated", 1), ("finetuned", 1), ("finetuned", 2), ("finetuned", 3)]


def test_threads_share_the_store(store):
    def work(i):
        for rnd in range(1, 21):
            store.write_metric(rnd, "federated", f"site{i}", "test", "auc", 0.5)
            store.audit("federated", rnd, f"site{i}", "fit", "accepted", 1, 1, f"{i}-{rnd}", 0.1)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.audit_rows()) == 80


def test_committed_rows_survive_kill_9(tmp_path):
    path = tmp_path / "state.sqlite"
    code = textwrap.dedent(f"""
        import os, signal
        from medfed.server.store import RunStore
        s = RunStore({str(path)!r})
        s.set_job({H1!r}, "{{}}")
        s.site_seen("north", "fp", "addr", 1.0)
        s.round_started("federated", 1, ["north"], 2.0)
        s.round_completed("federated", 1, "ckpt_1", 3.0)
        for i in range(50):
            s.write_metric(1, "federated", f"site{{i}}", "test", "auc", i / 100)
        s.audit("federated", 1, "north", "fit", "accepted", 10, 20, "f" * 64, 0.1, when=4.0)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    with RunStore(path) as s:
        assert s.job_hash() == H1
        assert s.last_completed_round("federated") == (1, "ckpt_1")
        assert [p["name"] for p in s.participants()] == ["north"]
        assert s.seen_update("f" * 64)
        assert s.export_metrics(tmp_path / "metrics.jsonl") == 50
        s.write_metric(2, "federated", "north", "test", "auc", 0.9)  # still writable
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


def test_not_a_store(tmp_path):
    junk = tmp_path / "state.sqlite"
    junk.write_bytes(b"this is not a database, just some text that is long enough " * 20)
    with pytest.raises(RunDirError, match="not a medfed store"):
        RunStore(junk)
    other = tmp_path / "other.sqlite"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(RunDirError, match="not a medfed store"):
        RunStore(other)
    newer = tmp_path / "newer.sqlite"
    RunStore(newer).close()
    conn = sqlite3.connect(newer)
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(RunDirError, match="schema_version 99"):
        RunStore(newer)
    with pytest.raises(RunDirError):
        RunStore(tmp_path / "no" / "such" / "dir" / "state.sqlite")


def test_closed_store_refuses_writes(tmp_path):
    s = RunStore(tmp_path / "state.sqlite")
    s.close()
    s.close()
    with pytest.raises(ValueError, match="closed"):
        s.write_metric(1, "federated", "north", "test", "auc", 0.5)


def test_state_and_exported_audit_are_readable_by_their_owner_only(tmp_path):
    old = os.umask(0o022)  # the usual umask: plain files would come out world-readable (0644)
    try:
        with RunStore(tmp_path / "state.sqlite") as s:
            s.audit("federated", 1, "north", "fit", "accepted", 10, 20, H1, 0.5, when=1.0)
            s.write_metric(1, "federated", "north", "test", "auc", 0.5)
            s.export_audit(tmp_path / "audit.json")
            s.export_metrics(tmp_path / "metrics.jsonl")
            files = sorted(p.name for p in tmp_path.iterdir())
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    finally:
        os.umask(old)
    assert files == ["audit.json", "metrics.jsonl", "state.sqlite", "state.sqlite-shm", "state.sqlite-wal"]
    assert modes == dict.fromkeys(files, 0o600)


# --------------------------------------------------------------------------- the report's audit section


def _run_folder(tmp_path, n_audit):
    run = tmp_path / "run"
    run.mkdir()
    job = {"name": "deployed", "seed": 1, "output": "runs/x", "rounds": 2,
           "data": {"source": "synthetic", "image_size": 16,
                    "sites": [{"name": s, "n_train": 40, "n_val": 10, "n_test": 20} for s in ("north", "south")]},
           "model": {"name": "small_cnn", "width": 4}, "task": {"labels": "binary", "monitor": "auc"}}
    (run / "job.yaml").write_text(yaml.safe_dump(job))
    with RunStore(run / "state.sqlite") as s:
        for rnd in (1, 2):
            for site in ("north", "south", "all"):
                s.write_metric(rnd, "federated", site, "test", "auc", 0.6 + 0.1 * rnd)
        for i in range(n_audit):
            rnd = 1 + i // 2
            s.audit("federated", rnd, "north" if i % 2 == 0 else "south<x>", "fit",
                    "accepted" if i != 1 else "refused", 1_200_000, 2_500, f"{i:064x}", 1.25,
                    reason="norm too large" if i == 1 else None)
        s.export_metrics(run / "metrics.jsonl")
        if n_audit:
            s.export_audit(run / "audit.json")
    return run


def test_report_has_an_audit_section(tmp_path):
    html = render_report(_run_folder(tmp_path, 4))
    assert "<h2>Audit</h2>" in html
    assert "federated, round 1" in html and "federated, round 2" in html
    assert "1.2 MB" in html and "2.5 kB" in html and "1.25" in html and "norm too large" in html
    full = f"{2:064x}"
    assert f'<td title="{full}">{full[:12]}</td>' in html
    assert "south&lt;x&gt;" in html and "south<x>" not in html
    assert "4 exchanges (1 refused); 4.8 MB sent, 10.0 kB received over the run." in html
    assert html.index("<h2>Audit</h2>") < html.index("<h2>Job</h2>")


def test_report_audit_is_capped(tmp_path):
    html = render_report(_run_folder(tmp_path, 205))
    assert "5 more are in audit.json" in html
    assert html.count("<td>fit</td>") == 200


def test_report_without_audit_json_has_no_audit_section(tmp_path):
    html = render_report(_run_folder(tmp_path, 0))
    assert "<h2>Audit</h2>" not in html and "exchanges (" not in html


def test_rounds_released_before_a_crash_are_counted_once_per_redo(store):
    """What a resume redoes: the rounds after the one saved in which an update or an
    evaluation was accepted; counted into a total that survives further resumes."""
    store.audit("federated", 1, "north", "fit", "accepted", 1, 1, "a1", 0.1)
    store.audit("federated", 2, "north", "fit", "accepted", 1, 1, "a2", 0.1)
    store.audit("federated", 2, "south", "evaluate", "accepted", 1, 1, None, 0.1)
    store.audit("federated", 3, "north", "fit", "refused", 1, 1, "a3", 0.1)  # nothing released
    assert store.released_after("federated", 1) == 1
    assert store.add_released_again(store.released_after("federated", 1)) == 1
    store.drop_after("federated", 1)
    assert store.released_after("federated", 1) == 0  # marked redone: not counted a second time
    store.audit("federated", 2, "north", "fit", "accepted", 1, 1, "b2", 0.1)  # round 2 again, then a crash
    assert store.add_released_again(store.released_after("federated", 1)) == 2
    assert store.add_released_again(0) == 2
