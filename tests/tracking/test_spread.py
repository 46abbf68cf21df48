"""The spread across sites (worst, best, standard deviation, gap), computed when metrics.jsonl
is read, and shown in the report's table and the terminal's."""

import json
import math

import pytest
import yaml
from rich.console import Console

from medfed.core.types import lower_is_better
from medfed.tracking.metrics import MetricsWriter, read_metrics, site_spread, spread_rows, spreads
from medfed.tracking.report import render_report
from medfed.tracking.tables import _gain_cell, summary_table

SITES = ["north", "south", "east", "west"]  # west is held out
# test values by round, arm, site; None: undefined (east's federated AUC at the last round)
AUC = {
    1: {"federated": {"north": 0.70, "south": 0.65, "east": 0.50, "west": 0.20, "all": 0.62}},
    2: {"federated": {"north": 0.90, "south": 0.60, "east": None, "west": 0.35, "all": 0.75},
        "local": {"north": 0.82, "south": 0.66, "east": 0.74, "all": 0.75}},
}
LOSS = {"north": 0.2, "south": 0.9, "east": 0.5, "west": 5.0}  # federated, round 2: lower is better


def _write(path):
    with MetricsWriter(path) as m:
        for rnd, arms in AUC.items():
            for arm, values in arms.items():
                for site, v in values.items():
                    m.write(rnd, arm, site, "val", "auc", 0.5)
                    m.write(rnd, arm, site, "test", "auc", v)
        for site, v in LOSS.items():
            m.write(2, "federated", site, "test", "loss", v)
    return read_metrics(path)


def test_spread_of_a_higher_is_better_metric(tmp_path):
    by_arm = spreads(_write(tmp_path / "metrics.jsonl"), "auc", held_out=["west"])
    fed, loc = by_arm["federated"], by_arm["local"]
    assert list(by_arm) == ["local", "federated"] and fed.round == loc.round == 2
    # east's value is undefined: left out, and said so; west is held out: never in a spread
    assert fed.sites == ("north", "south") and fed.undefined == ("east",)
    assert fed.worst == ("south", 0.60) and fed.best == ("north", 0.90)
    assert fed.std == pytest.approx(0.15) and fed.gap == pytest.approx(0.30)
    assert loc.sites == ("north", "south", "east") and loc.undefined == ()
    assert loc.worst == ("south", 0.66) and loc.best == ("north", 0.82)
    assert loc.std == pytest.approx(math.sqrt((0.08**2 + 0.08**2) / 3)) and loc.gap == pytest.approx(0.16)


def test_spread_of_a_lower_is_better_metric(tmp_path):
    fed = spreads(_write(tmp_path / "metrics.jsonl"), "loss", held_out=["west"])["federated"]
    assert fed.worst == ("south", 0.9) and fed.best == ("north", 0.2)  # the highest loss is the worst
    values = [0.2, 0.9, 0.5]
    mean = sum(values) / 3
    assert fed.std == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in values) / 3))
    assert fed.gap == pytest.approx(0.7)
    assert lower_is_better("loss") and lower_is_better("hd95_class_2")
    assert not lower_is_better("auc") and not lower_is_better("dice_class_1")


def test_spread_at_a_given_round_and_of_held_out_sites(tmp_path):
    records = _write(tmp_path / "metrics.jsonl")
    at_one = spreads(records, "auc", held_out=["west"], at_round=1)
    assert list(at_one) == ["federated"]  # local has no record at round 1
    assert at_one["federated"].worst == ("east", 0.50) and at_one["federated"].gap == pytest.approx(0.2)
    # without held_out, west counts like any site
    assert spreads(records, "auc", at_round=1)["federated"].worst == ("west", 0.20)


def test_edge_cases_of_one_spread():
    empty = site_spread({"a": None, "b": None}, "auc")
    assert empty.worst is None and empty.std is None and empty.gap is None and empty.undefined == ("a", "b")
    one = site_spread({"a": 0.4}, "auc")
    assert one.worst == one.best == ("a", 0.4) and one.std == 0.0 and one.gap == 0.0
    tie = site_spread({"a": 0.5, "b": 0.5, "c": 0.9}, "auc")
    assert tie.worst == ("a", 0.5)  # a tie goes to the site listed first


def test_spread_rows_and_their_gains(tmp_path):
    rows = {r["site"]: r for r in spread_rows(_write(tmp_path / "metrics.jsonl"), "auc", held_out=["west"])}
    assert list(rows) == ["worst", "best", "std", "gap"]
    assert rows["worst"]["federated"] == 0.60 and rows["worst"]["where"] == {"local": "south", "federated": "south"}
    assert rows["worst"]["gain"] == pytest.approx(-0.06) and not rows["worst"]["lower_is_better"]
    assert rows["gap"]["gain"] == pytest.approx(0.14) and rows["gap"]["lower_is_better"]  # a wider gap: less fair
    assert rows["std"]["where"] == {} and rows["std"]["centralized"] is None
    assert _gain_cell(0.30, 0.16, lower=True).style == "red" and _gain_cell(0.9, 0.8, lower=False).style == "green"


def _run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    job = {"name": "fair", "output": "runs/fair", "rounds": 2, "held_out": ["west"], "compare": ["local"],
           "data": {"source": "synthetic", "image_size": 16,
                    "sites": [{"name": s, "n_train": 20, "n_val": 5, "n_test": 10} for s in SITES]},
           "model": {"name": "small_cnn", "width": 4}, "task": {"labels": "binary", "monitor": "auc"}}
    (run / "job.yaml").write_text(yaml.safe_dump(job))
    _write(run / "metrics.jsonl")
    (run / "model_best.json").write_text(json.dumps({"round": 1, "arm": "federated", "metric": "val_auc", "value": 0.5}))
    return run


def test_report_shows_the_spread(tmp_path):
    html = render_report(_run_dir(tmp_path))
    # columns: site, local, federated, gain (federated - local)
    assert ('<tr class="spread"><td>worst site</td><td>0.660 (south)</td><td>0.600 (south)</td>'
            "<td>-0.060</td></tr>") in html
    assert '<tr class="spread"><td>best site</td><td>0.820 (north)</td><td>0.900 (north)</td><td>+0.080</td></tr>' in html
    assert '<tr class="spread"><td>std across sites</td><td>0.065</td><td>0.150</td><td>+0.085</td></tr>' in html
    assert '<tr class="spread"><td>gap (best − worst)</td><td>0.160</td><td>0.300</td><td>+0.140</td></tr>' in html
    assert "<td>west (held out)</td>" in html
    assert "Left out of the spread, no defined value: federated: east." in html
    # the best model's round, with the spread then
    assert "across the training sites at that round: worst east 0.500, best north 0.700, std 0.085, gap 0.200." in html


def test_terminal_table_shows_the_spread(tmp_path):
    console = Console(record=True, width=140)
    console.print(summary_table(_write(tmp_path / "metrics.jsonl"), "auc", held_out=["west"]))
    text = console.export_text()
    for label, cells in {"worst site": ("0.660 (south)", "0.600 (south)", "-0.060"),
                         "best site": ("0.820 (north)", "0.900 (north)", "+0.080"),
                         "std across sites": ("0.065", "0.150", "+0.085"),
                         "gap (best − worst)": ("0.160", "0.300", "+0.140"),
                         "west (held out)": ("–", "0.350")}.items():
        line = next(ln for ln in text.splitlines() if label in ln)
        assert [c for c in cells if c in line] == list(cells), line
