"""Streamed site data (data.cache none / disk, loader workers): the same model as in
memory, the disk cache's reuse and integrity, and every way a file, a cache or a worker
can fail."""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from medfed.config import LoaderConfig, parse_job
from medfed.core.errors import DataError
from medfed.data import reading
from medfed.data.base import ArraySplit, Planned, Record
from medfed.data.sites import build_sites, describe_sites
from medfed.data.stream import Pipeline, Store, StreamSplit
from medfed.server.runner import run_job

SITES = ("a", "b")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Two folder sites of 30 grey PNGs (20x20) each, label = brighter image."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for site in SITES:
        d = root / site
        d.mkdir()
        rows = ["file,label"]
        for i in range(30):
            label = i % 2
            Image.fromarray((rng.random((20, 20)) * 120 + label * 100).astype(np.uint8)).save(d / f"{i}.png")
            rows.append(f"{i}.png,{label}")
        (d / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def _copy(folder: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(folder, to, ignore=shutil.ignore_patterns(".medfed-cache", "run*"))
    return to


def _job(root: Path, cache: str = "memory", workers: int = 0, out: str = "run", **data):
    return parse_job({
        "name": "t", "output": str(root / out), "rounds": 2, "seed": 3, "model": {"name": "small_cnn"},
        "task": {"labels": "binary"}, "train": {"local_epochs": 1, "batch_size": 8},
        "transforms": {"augment": [{"name": "flip"}]}, "compare": ["local", "centralized"],
        "data": {"source": "folder", "cache": cache, "loader": {"workers": workers, "timeout": 60},
                 "label_columns": ["label"],
                 "sites": [{"name": s, "images": str(root / s), "csv": str(root / s / "labels.csv")} for s in SITES],
                 **data},
    })


def _metrics(run: Path) -> list[str]:
    return sorted(line for line in (run / "metrics.jsonl").read_text().splitlines())


def test_memory_none_and_disk_with_any_workers_train_the_same_model(folder, tmp_path):
    root = _copy(folder, tmp_path / "data")
    runs = {}
    for cache, workers in [("memory", 0), ("none", 0), ("none", 2), ("disk", 2), ("disk", 0)]:
        run = run_job(_job(root, cache, workers, out=f"run-{cache}-{workers}")).run_dir
        runs[cache, workers] = (_metrics(run), load_file(str(run / "model_final.safetensors")))
    metrics, model = runs["memory", 0]
    for key, (m, w) in runs.items():
        assert m == metrics, key
        assert all(torch.equal(w[k], model[k]) for k in model), key
    assert len(list((root / ".medfed-cache" / "a").glob("*.pt"))) == 30  # every example of site a, once


def _sites(job):
    return {s.name: s for s in build_sites(job)}


def test_streamed_sites_are_described_from_the_index_like_in_memory(folder, tmp_path):
    memory = build_sites(_job(folder, "memory"))
    streamed = build_sites(_job(folder, "none"))
    assert isinstance(streamed[0].train, StreamSplit) and isinstance(memory[0].train, ArraySplit)
    assert describe_sites(streamed, _job(folder).task) == describe_sites(memory, _job(folder).task)


def test_auto_holds_small_sites_in_memory_and_streams_large_ones(folder, monkeypatch):
    assert isinstance(build_sites(_job(folder, "auto"))[0].train, ArraySplit)
    monkeypatch.setattr(reading, "AUTO_MEMORY_BYTES", 20 * 20 * 4 * 10)  # ten examples' worth
    assert isinstance(build_sites(_job(folder, "auto"))[0].train, StreamSplit)


def test_a_site_overrides_the_cache_and_the_pooled_baseline_mixes_both(folder, tmp_path):
    root = _copy(folder, tmp_path / "data")
    job = _job(root, "none")
    sites = [s.model_dump() for s in job.data.sites]
    sites[0]["cache"] = "memory"
    mixed = job.model_copy(update={"data": job.data.model_copy(update={"sites": [type(job.data.sites[0])(**s) for s in sites]})})
    built = build_sites(mixed)
    assert isinstance(built[0].train, ArraySplit) and isinstance(built[1].train, StreamSplit)
    run = run_job(mixed.model_copy(update={"output": root / "mixed"})).run_dir
    same = run_job(_job(root, "memory", out="plain")).run_dir
    assert _metrics(run) == _metrics(same)


def test_how_data_is_read_is_not_part_of_the_job(folder):
    assert _job(folder, "memory").job_hash() == _job(folder, "disk", workers=3, cache_dir="/tmp/x").job_hash()
    assert _job(folder).job_hash() != _job(folder, on_bad_file="skip").job_hash()


# --------------------------------------------------------------------------- the disk cache


def _train_plan(split):
    """Batches of 8 in order, as a generator (a plan of unknown length: the loader's workers read it)."""
    return (Planned(torch.arange(i, min(i + 8, len(split)))) for i in range(0, len(split), 8))


def _read_all(split) -> torch.Tensor:
    return torch.cat([b.images for b in split.batches(_train_plan(split))])


class _Counter:
    def __init__(self, monkeypatch):
        from medfed.data.readers import folder as folder_reader

        self.n = 0
        real = folder_reader.read_image

        def counted(*a, **k):
            self.n += 1
            return real(*a, **k)

        monkeypatch.setattr(folder_reader, "read_image", counted)


def test_the_disk_cache_is_reused_and_never_stale(folder, tmp_path, monkeypatch):
    root = _copy(folder, tmp_path / "data")
    counter = _Counter(monkeypatch)
    first = _read_all(build_sites(_job(root, "disk"))[0].train)
    assert counter.n > 0
    counter.n = 0
    again = build_sites(_job(root, "disk"))[0].train
    assert torch.equal(_read_all(again), first) and counter.n == 0  # every example from the cache
    # a file rewritten in place: its entry is stale, the new pixels are read
    name = again.entries[0].path
    Image.fromarray(np.full((20, 20), 7, np.uint8)).save(name)
    os.utime(name, ns=(time.time_ns(), time.time_ns() + 10**9))
    fresh = _read_all(build_sites(_job(root, "disk"))[0].train)
    assert counter.n == 1 and torch.allclose(fresh[0], torch.full((1, 20, 20), 7 / 255))
    assert torch.equal(fresh[1:], first[1:])
    # another preprocessing: every entry is new
    counter.n = 0
    job = _job(root, "disk")
    job = job.model_copy(update={"transforms": job.transforms.model_copy(update={"preprocess": [
        type(job.transforms).model_validate({"preprocess": [{"name": "resize", "size": [10, 10]}]}).preprocess[0]]})})
    assert _read_all(build_sites(job)[0].train).shape[-1] == 10 and counter.n > 20


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_a_damaged_cache_entry_is_detected_and_rebuilt(folder, tmp_path, damage, caplog):
    root = _copy(folder, tmp_path / "data")
    first = _read_all(build_sites(_job(root, "disk"))[0].train)
    entries = sorted((root / ".medfed-cache" / "a").glob("*.pt"))
    victim = entries[3]
    blob = bytearray(victim.read_bytes())
    if damage == "flip":  # one bit of the stored pixels: torch.load alone would not notice
        from medfed.data.cache import _decode

        at = bytes(blob).find(_decode(bytes(blob))["image"].numpy().tobytes())
        assert at > 0
        blob[at + 401] ^= 0x01
    elif damage == "truncate":
        blob = blob[: len(blob) // 2]
    else:
        blob = bytearray()
    victim.write_bytes(bytes(blob))
    with caplog.at_level(logging.WARNING, logger="medfed"):
        again = _read_all(build_sites(_job(root, "disk"))[0].train)
    assert torch.equal(again, first)
    assert f"disk cache entry '{victim}'" in caplog.text and "damaged; rebuilt" in caplog.text
    assert victim.read_bytes() != bytes(blob)  # rewritten whole


def test_a_cache_folder_that_cannot_be_written_is_a_clear_error(folder, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with pytest.raises(DataError, match=r"site 'a': cannot write the disk cache in '.*not-a-folder/a'.*data.cache_dir"):
        build_sites(_job(folder, "disk", cache_dir=str(blocker)))
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(DataError, match="cannot write the disk cache"):
            build_sites(_job(folder, "disk", cache_dir=str(locked)))


def test_cache_entries_are_private_to_the_user(folder, tmp_path):
    root = _copy(folder, tmp_path / "data")
    _read_all(build_sites(_job(root, "disk"))[0].train)
    site = root / ".medfed-cache" / "a"
    assert site.stat().st_mode & 0o077 == 0
    assert all(p.stat().st_mode & 0o077 == 0 for p in site.glob("*.pt"))


# --------------------------------------------------------------------------- bad files and workers


@pytest.mark.parametrize("workers", [0, 2])
def test_a_file_that_disappears_is_skipped_and_counted_or_names_the_file(folder, tmp_path, workers, caplog):
    root = _copy(folder, tmp_path / "data")
    skip = build_sites(_job(root, "none", workers, on_bad_file="skip"))[0].train
    fail = build_sites(_job(root, "none", workers))[0].train
    gone = skip.entries[5].path
    gone.unlink()
    with caplog.at_level(logging.WARNING, logger="medfed"):
        images = _read_all(skip)
        _read_all(skip)  # a second epoch logs it no more
    assert len(images) == len(skip) - 1
    assert skip.skipped_late == {str(gone): skip.skipped_late[str(gone)]}
    assert caplog.text.count(f"skipped '{gone}'") == 1
    with pytest.raises(DataError, match=rf"site 'a': '{gone}': cannot be read as an image"):
        _read_all(fail)


def test_a_file_damaged_after_indexing_fails_that_site_with_the_file_named_in_the_log(folder, tmp_path):
    root = _copy(folder, tmp_path / "data")
    job = _job(root, "none", 2).model_copy(update={"min_sites": 1, "compare": []})
    (root / "b" / "3.png").unlink()  # before indexing: an error at start
    with pytest.raises(DataError, match="3.png': image file not found"):
        build_sites(job)
    (root / "b" / "3.png").write_bytes((folder / "b" / "3.png").read_bytes())
    victims = [root / "b" / f"{i}.png" for i in range(30)]

    def damage(_summaries):  # the sites are indexed: now every file of b goes bad
        for v in victims:
            v.write_bytes(b"not a png")

    run = run_job(job, on_sites=damage).run_dir
    log = (run / "run.log").read_text()
    assert "site 'b'" in log and "cannot be read as an image" in log and "/b/" in log
    rows = [line for line in _metrics(run) if '"site": "a"' in line]
    assert rows  # site a trained on


@dataclass(frozen=True, eq=False)
class _Hostile:
    """An entry whose reading kills the worker process or stalls."""

    name: str
    how: str
    split: str | None = None
    target: None = None

    def read(self) -> Record:
        if torch.utils.data.get_worker_info() is not None:
            if self.how == "die":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(30)
        return Record(self.name, np.zeros((1, 4, 4), np.float32), np.array(0))

    def files(self):
        return ()


@pytest.mark.parametrize("how, expect", [("die", "worker .* exited unexpectedly|killed by signal"),
                                         ("stall", "timed out after 1")])
def test_a_worker_that_dies_or_stalls_is_an_error_not_a_hang(how, expect):
    entries = tuple(_Hostile(f"x{i}", how) for i in range(4))
    split = StreamSplit("h", entries, Store(Pipeline(None, "k")), LoaderConfig(workers=1, prefetch=1, timeout=1.0),
                        (1, 4, 4), None, torch.zeros(4, dtype=torch.int64))
    t0 = time.monotonic()
    with pytest.raises(DataError, match=rf"site 'h': reading its data failed: .*({expect}).*data.loader.workers"):
        list(split.batches(iter([Planned(torch.arange(2)), Planned(torch.arange(2, 4))])))
    assert time.monotonic() - t0 < 25


def test_an_example_of_another_shape_is_named(folder, tmp_path):
    root = _copy(folder, tmp_path / "data")
    split = build_sites(_job(root, "none"))[0].train
    odd = split.entries[2].path
    Image.fromarray(np.zeros((12, 20), np.uint8)).save(odd)
    with pytest.raises(DataError, match=rf"example '{odd.name}' is \(1, 12, 20\) .* first example is \(1, 20, 20\); add a resize"):
        _read_all(split)


def test_label_flipping_replaces_a_streamed_splits_labels(folder):
    split = build_sites(_job(folder, "none"))[0].train
    flipped = replace(split, labels=1 - split.labels)
    labels = torch.cat([b.labels for b in flipped.batches(_train_plan(flipped))])
    assert torch.equal(labels, 1 - split.labels)


def test_a_plan_of_one_batch_is_read_without_forking(folder, monkeypatch):
    split = replace(build_sites(_job(folder, "none", 2))[0].val, loader=LoaderConfig(workers=2, timeout=60))
    seen = []
    import torch.utils.data as tud

    real = tud.DataLoader.__init__

    def spy(self, *a, **k):
        seen.append(k.get("num_workers"))
        real(self, *a, **k)

    monkeypatch.setattr(tud.DataLoader, "__init__", spy)
    list(split.batches([Planned(torch.arange(len(split)))]))
    list(split.batches([Planned(torch.arange(2)), Planned(torch.arange(2, 4))]))
    list(split.batches(iter([Planned(torch.arange(2))])))
    assert seen == [0, 2, 2]
