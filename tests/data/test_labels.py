"""Scarce labels (data/labels.py): CSV rows without a label, a study's hidden labels, a
site without labels; val and test labeled only; the summaries count both."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from medfed.config import parse_job
from medfed.core.errors import DataError
from medfed.data.base import ArraySplit
from medfed.data.labels import hide_labels
from medfed.data.sites import build_sites, describe_sites
from medfed.site.evaluate import evaluate_split

SYNTH = {
    "name": "labels", "output": "out", "rounds": 1, "seed": 5,
    "data": {"source": "synthetic", "image_size": 16, "labeled_fraction": 0.25,
             "sites": [{"name": "a", "n_train": 40, "n_val": 6, "n_test": 8},
                       {"name": "b", "n_train": 30, "n_val": 6, "n_test": 8, "labeled_fraction": 0.5},
                       {"name": "c", "n_train": 20, "n_val": 6, "n_test": 8, "unlabeled": True}]},
    "model": {"name": "small_cnn", "width": 4}, "task": {"labels": "binary"},
    "semi_supervised": {"method": "mean_teacher"},
}


def _job(**over):
    return parse_job({**SYNTH, **over})


def test_hidden_labels_are_the_seeded_fraction_of_training_only():
    sites = {s.name: s for s in build_sites(_job())}
    a, b, c = sites["a"], sites["b"], sites["c"]
    assert int(a.train.labeled.sum()) == 10 and len(a.train) == 40  # round(0.25 * 40), the section's default
    assert int(b.train.labeled.sum()) == 15 and len(b.train) == 30  # the site's own 0.5
    assert int(c.train.labeled.sum()) == 0 and len(c.train) == 20
    for s in (a, b):  # val and test keep every label
        assert (len(s.val), len(s.test)) == (6, 8) and s.val.labeled is None and s.test.labeled is None
    assert (len(c.val), len(c.test)) == (0, 0)  # a site without labels is evaluated on nothing
    # the same job hides the same labels; another seed others
    again = {s.name: s for s in build_sites(_job())}
    assert torch.equal(again["a"].train.labeled, a.train.labeled)
    other = {s.name: s for s in build_sites(_job(seed=6))}
    assert not torch.equal(other["a"].train.labeled, a.train.labeled)


def test_hide_labels_keeps_at_least_one_and_only_among_the_labeled():
    split = ArraySplit(torch.zeros(10, 1, 4, 4), torch.zeros(10, dtype=torch.int64),
                       labeled=torch.tensor([True] * 4 + [False] * 6))
    kept = hide_labels(split, 0.5, seed=0, position=0).labeled
    assert int(kept.sum()) == 2 and not bool(kept[4:].any())
    assert int(hide_labels(split, 0.01, 0, 0).labeled.sum()) == 1
    assert hide_labels(split, 1.0, 0, 0) is split


def test_summary_counts_labeled_and_unlabeled_and_class_counts_only_the_labeled():
    job = _job()
    summaries = {s.name: s for s in describe_sites(build_sites(job), job.task)}
    a, c = summaries["a"], summaries["c"]
    assert (a.train, a.unlabeled, a.labeled) == (40, 30, 10) and sum(a.class_counts["train"]) == 10
    assert (c.train, c.unlabeled, c.labeled, c.val, c.test) == (20, 20, 0, 0, 0)
    assert sum(c.class_counts["train"]) == 0
    assert "unlabeled" in a.for_the_server() and "unlabeled" not in summaries["a"].model_copy(
        update={"unlabeled": 0}).for_the_server()  # left out at 0: older summaries unchanged


def test_without_semi_supervised_the_unlabeled_examples_are_left_out(caplog):
    raw = {**SYNTH, "data": {**SYNTH["data"], "sites": SYNTH["data"]["sites"][:2]}}
    raw.pop("semi_supervised")
    with caplog.at_level(logging.INFO, logger="medfed"):
        sites = {s.name: s for s in build_sites(parse_job(raw))}
    assert len(sites["a"].train) == 10 and sites["a"].train.labeled is None
    assert "30 of its 40 training examples have no label and are left out" in caplog.text


def test_an_empty_split_is_evaluated_on_nothing(caplog):
    from medfed.models import build_model
    from medfed.tasks import build_task

    job = _job()
    with caplog.at_level(logging.WARNING, logger="medfed"):
        c = {s.name: s for s in build_sites(job)}["c"]
    assert "site 'c' has no labeled val examples: it is evaluated on nothing there" in caplog.text
    model = build_model(job.model, job.task, 1)
    assert evaluate_split(model, c.test, build_task(job), torch.device("cpu")) == {}


def _folder(tmp_path, rows):
    (tmp_path / "img").mkdir()
    lines = ["file,label" + (",split" if len(rows[0]) > 2 else "")]
    for i, row in enumerate(rows):
        arr = (np.full((8, 8), 40 * (i % 5), dtype=np.uint8))
        Image.fromarray(arr).save(tmp_path / "img" / f"{i}.png")
        lines.append(",".join([f"{i}.png", *row[1:]]))
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")


def _folder_job(tmp_path, cache, semi=True, split_column=False):
    raw = {
        "name": "f", "output": str(tmp_path / "out"), "rounds": 1,
        "data": {"source": "folder", "label_columns": ["label"], "cache": cache,
                 "split": {"val": 0.2, "test": 0.2},
                 "sites": [{"name": "h", "images": str(tmp_path / "img"), "csv": str(tmp_path / "labels.csv")}]},
        "model": {"name": "small_cnn", "width": 4}, "task": {"labels": "binary"},
    }
    if split_column:
        raw["data"]["split_column"] = "split"
    if semi:
        raw["semi_supervised"] = {"method": "fixmatch"}
    return parse_job(raw)


@pytest.mark.parametrize("cache", ["memory", "none"])
def test_csv_rows_without_a_label_train_unlabeled_and_never_go_to_val_or_test(tmp_path, cache):
    rows = [("f", str(i % 2)) if i < 10 else ("f", "") for i in range(30)]  # 10 labeled, 20 without
    _folder(tmp_path, rows)
    (site,) = build_sites(_folder_job(tmp_path, cache))
    assert len(site.train) + len(site.val) + len(site.test) == 30
    assert int((~site.train.labeled).sum()) == 20  # every unlabeled row trains
    assert site.val.labeled is None and site.test.labeled is None and len(site.val) == len(site.test) == 2
    unlabeled_names = {f"{i}.png" for i in range(10, 30)}
    assert not unlabeled_names & {n.split("/")[-1] for n in site.val.names + site.test.names}
    # the batches carry which examples are labeled
    from medfed.data.base import Planned

    (batch,) = site.train.batches([Planned(torch.arange(len(site.train)))])
    assert torch.equal(batch.labeled, site.train.labeled)


def test_csv_rows_without_a_label_in_val_are_left_out_and_a_site_without_labels_needs_semi(tmp_path):
    rows = [("f", str(i % 2), "train") for i in range(6)] + [("f", "", "val"), ("f", "1", "val"), ("f", "0", "test")]
    _folder(tmp_path, rows)
    (site,) = build_sites(_folder_job(tmp_path, "memory", split_column=True))
    assert len(site.val) == 1 and len(site.test) == 1
    (tmp_path / "labels.csv").write_text("file,label,split\n" + "".join(f"{i}.png,,train\n" for i in range(9)))
    with pytest.raises(DataError, match="site 'h' has no labeled training examples"):
        build_sites(_folder_job(tmp_path, "memory", semi=False, split_column=True))
    with pytest.raises(DataError, match="semi_supervised: no training site has a single labeled training example"):
        build_sites(_folder_job(tmp_path, "memory", split_column=True))


def test_a_multilabel_row_with_some_labels_empty_is_an_error(tmp_path):
    from medfed.data.readers.folder import index_folder

    (tmp_path / "img").mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
    (tmp_path / "labels.csv").write_text("file,x,y\n0.png,1,0\n1.png,,\n2.png,1,\n")
    job = parse_job({
        "name": "m", "output": "o", "rounds": 1, "model": {"name": "small_cnn"},
        "task": {"labels": "multilabel", "num_classes": 2},
        "data": {"source": "folder", "label_columns": ["x", "y"],
                 "sites": [{"name": "h", "images": str(tmp_path / "img"), "csv": str(tmp_path / "labels.csv")}]},
    })
    with pytest.raises(DataError, match="line 4: empty value in column 'y'"):
        index_folder(job.data, job.task)
    (tmp_path / "labels.csv").write_text("file,x,y\n0.png,1,0\n1.png,,\n")
    (site,) = index_folder(job.data, job.task)
    assert [e.labeled for e in site.entries] == [True, False] and site.entries[1].target.shape == (2,)
