"""A deployed run that stops before its first round leaves nothing behind; a run folder
that cannot be written is a clear error; a site whose images differ in shape from the
others' is left out of the run with the reason, not the whole run stopped; so is one that
built another model (the reason says which code to install)."""

from __future__ import annotations

import socket
import sqlite3
from types import SimpleNamespace

import grpc
import pytest

from deploy_kits import make_kits
from medfed.config import ImportModelConfig, builtin_job_path, load_job
from medfed.core.errors import NetworkError, RunDirError
from medfed.server import admission, deploy
from medfed.server.admission import common_shape as _common_shape
from medfed.server.deploy import serve_job
from medfed.server.store import RunStore
from medfed.transport.pki import load_kit
from transport.test_grpc_checks import Consortium, _summary


def _job(tmp_path):
    return load_job(builtin_job_path("quickstart")).model_copy(update={"output": tmp_path / "run"})


def test_a_port_in_use_is_a_clear_error_and_leaves_no_run_folder(tmp_path):
    kits, _ = make_kits(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(NetworkError, match=f"cannot listen on 127.0.0.1:{port}"):
            serve_job(_job(tmp_path), load_kit(kits / "server", role="server"), listen=f"127.0.0.1:{port}")
    assert not (tmp_path / "run").exists()  # a new start needs no --resume


def test_an_existing_folder_keeps_its_own_files_after_a_failed_start(tmp_path):
    kits, _ = make_kits(tmp_path)
    (tmp_path / "run").mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(NetworkError):
            serve_job(_job(tmp_path), load_kit(kits / "server", role="server"),
                      listen=f"127.0.0.1:{taken.getsockname()[1]}")
    assert (tmp_path / "run").is_dir() and not any((tmp_path / "run").iterdir())


def test_a_full_disk_is_a_clear_error_not_a_traceback(tmp_path, monkeypatch):
    kits, _ = make_kits(tmp_path)

    def full(self, *a):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(RunStore, "set_job", full)
    with pytest.raises(RunDirError, match="cannot write the run folder .*database or disk is full"):
        serve_job(_job(tmp_path), load_kit(kits / "server", role="server"), listen="127.0.0.1:0")
    assert not (tmp_path / "run").exists()


def test_a_run_with_rounds_done_keeps_its_state_and_says_resume(tmp_path, monkeypatch):
    kits, _ = make_kits(tmp_path)

    def full_after_a_round(*a, **k):  # a round was saved, then the disk filled up
        (tmp_path / "run" / deploy.STATE_FILE).write_bytes(b"state")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(deploy, "_serve", full_after_a_round)
    with pytest.raises(RunDirError, match="No space left on device.*continue with --resume"):
        serve_job(_job(tmp_path), load_kit(kits / "server", role="server"))
    assert (tmp_path / "run" / deploy.STATE_FILE).exists()


def test_the_common_shape_is_the_most_sites_and_the_others_are_named():
    job = load_job(builtin_job_path("quickstart"))
    a, b, c = job.site_names
    s = lambda shape: SimpleNamespace(shape=shape)  # noqa: E731
    shape, odd = _common_shape(job, {a: s([1, 32, 32]), b: s([1, 64, 64]), c: s([1, 32, 32])})
    assert shape == (1, 32, 32) and list(odd) == [b] and "[1, 64, 64]" in odd[b] and "[1, 32, 32]" in odd[b]
    shape, odd = _common_shape(job, {a: s([3, 8, 8]), b: s([1, 8, 8])})  # a tie: the site first in the job
    assert shape == (3, 8, 8) and list(odd) == [b]


def test_a_site_left_out_is_refused_with_the_reason_and_audited(tmp_path):
    cons = Consortium(tmp_path)
    try:
        conn = cons.ready("hospital_c")
        cons.hub.exclude("hospital_c", "its images are [1, 64, 64] (C, *spatial), the other sites' [1, 32, 32]")
        assert "hospital_c" not in cons.hub.summaries()
        for call in (conn.join, lambda: conn.ready(cons.job_id, _summary("hospital_c"))):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "left out of the run: its images are [1, 64, 64]" in info.value.details()
        row = cons.store.audit_rows()[-1]
        assert row["site"] == "hospital_c" and "left out of the run" in row["reason"]
    finally:
        cons.close()


def test_a_resume_before_any_round_was_saved_redoes_round_one_without_replays(tmp_path):
    """The server accepted round 1's updates, then was killed before it saved the round:
    the resumed run redoes round 1, and the sites' same updates are not taken for replays."""
    import torch

    from medfed.algorithms.fedavg import FedAvg
    from medfed.server.runner import _BestTracker

    job = _job(tmp_path)
    (tmp_path / "run").mkdir()
    with RunStore(tmp_path / "run" / "state.sqlite") as store:
        store.audit("federated", 1, "hospital_a", "fit", "accepted", 10, 10, "ab" * 32, 0.1)
        store.write_metric(1, "federated", "hospital_a", "train", "loss", 0.5)
        done, params = deploy.resume_point(tmp_path / "run", job, store, FedAvg(), _BestTracker(tmp_path / "run", job))
        assert (done, params) == (0, None)
        assert not store.seen_update("ab" * 32)
        assert store.audit_rows()[-1]["status"] == "redone"
    with RunStore(tmp_path / "run" / "state.sqlite") as store:  # a saved round: kept, the later ones redone
        deploy.save_state(tmp_path / "run", 1, {"w": torch.ones(2)}, {}, job.job_hash())
        store.audit("federated", 2, "hospital_a", "fit", "accepted", 10, 10, "cd" * 32, 0.1)
        done, params = deploy.resume_point(tmp_path / "run", job, store, FedAvg(), _BestTracker(tmp_path / "run", job))
        assert done == 1 and torch.equal(params["w"], torch.ones(2))
        assert not store.seen_update("cd" * 32)


def test_a_different_model_is_explained_by_the_code_that_builds_it(tmp_path):
    job = _job(tmp_path)
    assert "another medfed or MONAI version (model 'small_cnn')" in admission.model_hint(job)
    mine = job.model_copy(update={"model": ImportModelConfig.model_validate({"import": "mynets.models:build"})})
    assert admission.model_hint(mine).startswith("the site runs another version of 'mynets.models:build'")
    said = admission.absences({"hospital_b": "no module named 'mynets'"}, {"hospital_c": "it built a different model"})
    assert said == ("; site 'hospital_b' cannot take part in the job: no module named 'mynets'; "
                    "site 'hospital_c' is left out: it built a different model")
