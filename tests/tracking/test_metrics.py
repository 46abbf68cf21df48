import json
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from medfed.core.errors import RunDirError
from medfed.tracking.metrics import MetricsWriter, comparison_rows, curves, read_metrics


def rec(rnd, arm, site, metric, value, split="test"):
    return {"round": rnd, "arm": arm, "site": site, "split": split, "metric": metric, "value": value}


# --------------------------------------------------------------------------- writer and reader


def test_write_then_read_round_trips(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsWriter(path) as m:
        m.write(1, "federated", "a", "train", "loss", 0.69)
        m.write(1, "federated", "a", "test", "auc", 0.75)
        m.write(1, "local", "all", "val", "accuracy", None)
    assert read_metrics(path) == [
        rec(1, "federated", "a", "loss", 0.69, split="train"),
        rec(1, "federated", "a", "auc", 0.75),
        rec(1, "local", "all", "accuracy", None, split="val"),
    ]


def test_non_finite_values_are_written_as_null(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsWriter(path) as m:
        m.write(1, "federated", "a", "test", "auc", float("nan"))
        m.write(1, "federated", "a", "test", "loss", float("inf"))
        m.write(1, "federated", "a", "test", "accuracy", -math.inf)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert [json.loads(line)["value"] for line in text.splitlines()] == [None, None, None]


def test_each_record_is_flushed_and_file_opened_once(tmp_path, monkeypatch):
    opened = []
    real_open = Path.open

    def spy(self, mode="r", *a, **k):
        if mode != "r":  # the reads below open the file too
            opened.append(self)
        return real_open(self, mode, *a, **k)

    monkeypatch.setattr(Path, "open", spy)
    path = tmp_path / "metrics.jsonl"
    with MetricsWriter(path) as m:
        for rnd in (1, 2, 3):
            m.write(rnd, "federated", "a", "test", "auc", 0.5)
            assert len(path.read_text().splitlines()) == rnd  # readable before the writer closes
    assert opened.count(path) == 1


def test_writer_rejects_unknown_arm_and_split(tmp_path):
    with MetricsWriter(tmp_path / "m.jsonl") as m:
        with pytest.raises(ValueError, match="arm"):
            m.write(1, "fedprox", "a", "test", "auc", 0.5)
        with pytest.raises(ValueError, match="split"):
            m.write(1, "federated", "a", "holdout", "auc", 0.5)


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_any_float_reads_back_as_itself_or_none(tmp_path_factory, value):
    path = tmp_path_factory.mktemp("m") / "metrics.jsonl"
    with MetricsWriter(path) as m:
        m.write(1, "federated", "a", "test", "auc", value)
    (got,) = read_metrics(path)
    assert got["value"] == (value if math.isfinite(value) else None)


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    good = json.dumps(rec(1, "federated", "a", "auc", 0.5))
    path.write_text(good + "\n\n" + '{"round": 1, "arm": "federated", "site"' + "\n")
    with pytest.raises(RunDirError, match=r"metrics\.jsonl, line 3: not valid JSON"):
        read_metrics(path)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"arm": "fedprox"}, "arm must be one of"),
        ({"round": 0}, "round must be an integer >= 1"),
        ({"round": "1"}, "round must be an integer >= 1"),
        ({"split": "holdout"}, "split must be one of"),
        ({"value": "0.5"}, "value must be a number or null"),
        ({"site": ""}, "site must be a non-empty string"),
    ],
)
def test_invalid_record_names_line_and_problem(tmp_path, change, expected):
    path = tmp_path / "metrics.jsonl"
    lines = [rec(1, "federated", "a", "auc", 0.5), rec(2, "federated", "a", "auc", 0.6) | change]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(RunDirError, match=f"line 2: {expected}"):
        read_metrics(path)


def test_missing_field_and_non_object(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 1, "arm": "local"}\n')
    with pytest.raises(RunDirError, match="line 1: missing field.*site, split, metric, value"):
        read_metrics(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(RunDirError, match="line 1: expected a JSON object, got list"):
        read_metrics(path)


def test_missing_file_names_it(tmp_path):
    with pytest.raises(RunDirError, match="nope.jsonl"):
        read_metrics(tmp_path / "nope.jsonl")


# --------------------------------------------------------------------------- comparison and curves

RECORDS = [
    # pooled mean appears first in the file but goes last in the table
    rec(1, "federated", "all", "auc", 0.60),
    rec(1, "federated", "a", "auc", 0.55),
    rec(1, "federated", "b", "auc", 0.65),
    rec(1, "local", "a", "auc", 0.70),
    rec(1, "local", "b", "auc", 0.50),
    rec(2, "federated", "a", "auc", 0.80),
    rec(2, "federated", "b", "auc", None),  # undefined at the last round: not the round-1 value
    rec(2, "federated", "all", "auc", 0.80),
    rec(2, "federated", "a", "auc", 0.80, split="val"),
    rec(3, "federated", "a", "auc", 0.99, split="val"),  # a later val round does not move test's last round
    rec(2, "federated", "a", "accuracy", 0.90),
    rec(2, "local", "a", "auc", 0.75),
    rec(2, "local", "b", "auc", 0.60),
    rec(2, "local", "all", "auc", 0.675),
    rec(2, "federated", "a", "loss", 0.40, split="train"),
]


def test_comparison_takes_each_arms_last_round_and_computes_gain():
    rows = comparison_rows(RECORDS, "auc")
    assert [r["site"] for r in rows] == ["a", "b", "all"]
    a, b, pooled = rows
    assert a == {"site": "a", "zero_filled": None, "local": 0.75, "federated": 0.80, "personalized": None, "finetuned": None, "centralized": None, "gain": pytest.approx(0.05)}
    assert b == {"site": "b", "zero_filled": None, "local": 0.60, "federated": None, "personalized": None, "finetuned": None, "centralized": None, "gain": None}
    assert pooled["federated"] == 0.80 and pooled["local"] == 0.675
    assert pooled["gain"] == pytest.approx(0.125)


def test_comparison_other_monitor_and_split():
    rows = comparison_rows(RECORDS, "accuracy")
    assert rows[0]["federated"] == 0.90 and rows[0]["local"] is None and rows[0]["gain"] is None
    val = comparison_rows(RECORDS, "auc", split="val")
    assert val[0]["federated"] == 0.99  # val's last federated round is 3


def test_comparison_with_sparse_evaluation_uses_the_final_round():
    # evaluated every 2 rounds and at the last (5)
    records = [rec(r, "federated", "a", "auc", r / 10) for r in (2, 4, 5)]
    records += [rec(r, "centralized", "a", "auc", r / 10 + 0.01) for r in (2, 4, 5)]
    (row,) = comparison_rows(records, "auc")
    assert row["federated"] == 0.5 and row["centralized"] == pytest.approx(0.51) and row["gain"] is None


def test_comparison_of_no_records_is_empty():
    assert comparison_rows([], "auc") == []


def test_curves_sort_rounds_and_keep_undefined_values():
    records = [rec(2, "federated", "a", "auc", 0.6), rec(1, "federated", "a", "auc", None)] + RECORDS[3:5]
    got = curves(records, "auc", "test")
    assert list(got) == ["a", "b"]
    assert got["a"]["federated"] == ([1, 2], [None, 0.6])
    assert got["a"]["local"] == ([1], [0.70])
    assert list(got["b"]) == ["local"]


def test_curves_of_training_loss():
    got = curves(RECORDS, "loss", "train")
    assert got == {"a": {"federated": ([2], [0.40])}}
