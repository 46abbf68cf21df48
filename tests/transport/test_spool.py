"""A simulation's round keeps updates in memory up to a budget and the rest on disk
(transport/spool.py); a run's metrics and model are the same bit for bit whatever the
budget, for every way the server reads updates (each algorithm's rule, compression,
robust rules, central DP, secure aggregation), and on every simulation transport."""

from __future__ import annotations

import pytest
import torch

from medfed.core import codec
from medfed.core.errors import CodecError, ConfigError
from medfed.core.params import nbytes
from medfed.core.payload import FileTensors
from medfed.core.types import Update
from medfed.transport.spool import ENVIRONMENT, Spool, budget_from_environment
from transport.ray_jobs import assert_same, run


def _update(site: str, value: float) -> Update:
    params = {"w": torch.full((64, 32), value), "b": torch.arange(5, dtype=torch.int64)}
    return Update(site=site, round=1, params=params, num_examples=3, num_steps=2,
                  metrics={"loss": value}, extras={"c": torch.ones(4, dtype=torch.float64) * value})


def _assert_equal(a: Update, b: Update) -> None:
    assert (a.site, a.round, a.num_examples, a.num_steps, a.metrics) == (b.site, b.round, b.num_examples,
                                                                         b.num_steps, b.metrics)
    for x, y in ((a.params, b.params), (a.extras, b.extras)):
        assert sorted(x) == sorted(y)  # (a file lists its tensors by name)
        for k in x:
            assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k


def test_updates_past_the_budget_are_read_back_from_disk_unchanged():
    first, second, third = _update("a", 1.5), _update("b", -2.0), _update("c", 0.25)
    size = nbytes(first.params) + nbytes(first.extras)
    spool = Spool(budget=size)  # room for one update
    kept = [spool.update(u) for u in (first, second, third)]
    assert kept[0] is first  # within the budget: not copied
    assert isinstance(kept[1].params, FileTensors) and isinstance(kept[2].extras, FileTensors)
    assert (spool.held, spool.spooled) == (size, 2)
    for original, back in zip((first, second, third), kept):
        _assert_equal(original, back)
        assert nbytes(back.params) == nbytes(original.params)  # counted from the file's header


def test_encoded_updates_are_decoded_in_memory_or_from_a_file_and_malformed_ones_refused():
    blob = codec.encode_update(_update("a", 3.0))
    spool = Spool(budget=len(blob))
    in_memory, on_disk = spool.blob(blob), spool.blob(bytes(blob))
    assert not isinstance(in_memory.params, FileTensors) and isinstance(on_disk.params, FileTensors)
    _assert_equal(in_memory, on_disk)
    for budget in (0, 1 << 30):
        with pytest.raises(CodecError, match="update"):
            Spool(budget=budget).blob(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")


def test_the_budget_from_the_environment(monkeypatch):
    monkeypatch.delenv(ENVIRONMENT, raising=False)
    assert budget_from_environment() == Spool().budget > 0
    monkeypatch.setenv(ENVIRONMENT, "0")
    assert Spool().budget == 0
    for bad in ("-1", "lots"):
        monkeypatch.setenv(ENVIRONMENT, bad)
        with pytest.raises(ConfigError, match=f"{ENVIRONMENT}='{bad}'"):
            Spool()


CASES = {
    "fedavg": {},
    "fedadam": {"algorithm": {"name": "fedadam", "server_lr": 0.05}},
    "scaffold": {"algorithm": {"name": "scaffold"}, "train": {"batch_size": 4, "momentum": 0.0}},
    "fednova": {"algorithm": {"name": "fednova"}},
    "qfedavg": {"algorithm": {"name": "qfedavg"}},
    "ditto": {"algorithm": {"name": "ditto", "lam": 0.1}},
    "fedbn": {"algorithm": {"name": "fedbn"}, "model": {"name": "small_cnn", "width": 4, "norm": "batch"}},
    "topk": {"compression": {"method": "topk", "fraction": 0.2}},
    "median": {"robust": {"rule": "median"}},
    "dp_central": {"privacy": {"dp": {"clip": 1.0, "noise_multiplier": 0.3, "noise": "central", "delta": 1e-3}},
                   "model": {"name": "small_cnn", "width": 4, "norm": "group"}},
    "secure_aggregation": {"privacy": {"secure_aggregation": {"clip_range": 0.5}}},
}


@pytest.fixture
def files(monkeypatch) -> list[int]:
    """Counts the updates the run's spools write to files (one entry per file)."""
    written: list[int] = []
    to_file = Spool._to_file

    def counted(self, blob):
        written.append(memoryview(blob).nbytes)
        return to_file(self, blob)

    monkeypatch.setattr(Spool, "_to_file", counted)
    return written


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_run_with_every_update_on_disk_equals_one_in_memory(case, tmp_path, monkeypatch, files):
    monkeypatch.setenv(ENVIRONMENT, "0")
    on_disk = run(tmp_path / "disk", compare=[], **CASES[case])
    assert len(files) == 6  # 3 sites, 2 rounds
    monkeypatch.delenv(ENVIRONMENT)
    in_memory = run(tmp_path / "memory", compare=[], **CASES[case])
    assert len(files) == 6
    assert_same(on_disk, in_memory)


def test_the_process_pool_spools_too(tmp_path, monkeypatch, files):
    monkeypatch.setenv(ENVIRONMENT, "0")
    pooled = run(tmp_path / "pool", compare=[], transport="pool", **CASES["scaffold"])
    assert len(files) == 6
    monkeypatch.delenv(ENVIRONMENT)
    assert_same(pooled, run(tmp_path / "inprocess", compare=[], **CASES["scaffold"]))
