import json
import re

import pytest
import yaml
from rich.console import Console

from medfed.core.errors import ConfigError, RunDirError
from medfed.tracking.metrics import MetricsWriter
from medfed.tracking.report import fmt, render_report, write_report
from medfed.tracking.tables import summary_table

SITES = ["north", "south"]

# test AUC at the last round (3): federated 0.850/0.700, local 0.750/0.800, pooled means
FINAL = {
    "federated": {"north": 0.85, "south": 0.70, "all": 0.79},
    "local": {"north": 0.75, "south": 0.80, "all": 0.77},
}


def make_job(name="demo <b>&co", sites=SITES, rounds=3, compare=("local",)):
    return {
        "name": name,
        "seed": 1,
        "output": "runs/demo",
        "rounds": rounds,
        "data": {
            "source": "synthetic",
            "image_size": 16,
            "sites": [{"name": s, "n_train": 40, "n_val": 10, "n_test": 20} for s in sites],
        },
        "model": {"name": "small_cnn", "width": 4},
        "task": {"labels": "binary", "monitor": "auc"},
        "compare": list(compare),
    }


def write_metrics(path, sites=SITES, rounds=3, final=FINAL):
    with MetricsWriter(path) as m:
        for rnd in range(1, rounds + 1):
            for arm, values in final.items():
                for i, site in enumerate([*sites, "all"]):
                    v = values[site] if rnd == rounds else 0.5 + 0.01 * rnd + 0.001 * i
                    if site != "all":
                        m.write(rnd, arm, site, "train", "loss", 1.0 / rnd + 0.1 * i)
                    for split in ("val", "test"):
                        m.write(rnd, arm, site, split, "auc", v)
                        m.write(rnd, arm, site, split, "accuracy", 0.6)


def make_run(run_dir, job=None, metrics=True, extras=True):
    run_dir.mkdir(parents=True)
    job = job or make_job()
    (run_dir / "job.yaml").write_text(yaml.safe_dump(job))
    if metrics:
        write_metrics(run_dir / "metrics.jsonl")
    if extras:
        sites = [{"name": s, "train": 40, "val": 10, "test": 20,
                  "class_counts": {"train": [27, 13], "val": [7, 3], "test": [14, 6]}, "shape": [1, 28, 28]}
                 for s in SITES]
        (run_dir / "sites.json").write_text(json.dumps({"sites": sites}))
        (run_dir / "run.json").write_text(json.dumps({
            "status": "complete", "medfed_version": "0.1.0", "job_hash": "ab" * 32,
            "started": "2025-03-01T10:00:00+00:00", "finished": "2025-03-01T10:02:05+00:00",
            "elapsed_s": 125.0, "rounds": 3}))
        (run_dir / "model_best.json").write_text(json.dumps(
            {"round": 2, "arm": "federated", "metric": "val_auc", "value": 0.8123, "job_hash": "ab" * 32}))
    return run_dir


def test_fmt():
    assert fmt(0.85) == "0.850" and fmt(0.1234, signed=True) == "+0.123" and fmt(-0.05, signed=True) == "-0.050"
    assert fmt(None) == "–" and fmt(float("nan")) == "–"


def test_report_is_written_and_self_contained(tmp_path):
    run = make_run(tmp_path / "run")
    path = write_report(run)
    assert path == run / "report.html"
    html = path.read_text(encoding="utf-8")
    assert not list(run.glob("*.tmp"))
    # header: escaped job name, hash, dates, status
    assert "demo &lt;b&gt;&amp;co" in html and "<b>&co" not in html
    assert "ab" * 32 in html and "2025-03-01 10:00:00" in html and "complete" in html
    # sites table: sizes and class counts
    for site in SITES:
        assert f"<td>{site}</td>" in html
    assert "27 / 13" in html and "<td>40</td>" in html
    # comparison: last-round values, gain = federated - local, best model
    for v in ("0.850", "0.750", "+0.100", "0.700", "0.800", "-0.100", "0.790", "0.770", "+0.020"):
        assert f"<td>{v}</td>" in html, v
    assert "round 2" in html and "0.812" in html
    # figures inline, nothing fetched from elsewhere
    # the learning curves and the training loss, as inline SVG
    assert len(re.findall(r'<svg class="figure" xmlns="http://www.w3.org/2000/svg"', html)) == 2
    assert html.count("<polyline") >= 6  # lines of 3 sites in 2 arms, and a loss line per site
    assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:)?//', html)
    assert "<link" not in html and not re.search(r"<script[^>]*\bsrc=", html)  # inline scripts only
    assert "<h2>Interactive charts</h2>" in html
    # the job itself
    assert "small_cnn" in html and "<pre>" in html


def test_absent_arms_are_not_columns_and_missing_values_are_dashes(tmp_path):
    run = make_run(tmp_path / "run", job=make_job(compare=()), metrics=False)
    final = {"federated": {"north": 0.9, "south": None, "all": 0.9}}
    write_metrics(run / "metrics.jsonl", final=final)
    html = write_report(run).read_text(encoding="utf-8")
    assert "<th>federated</th>" in html and "<th>local</th>" not in html and "gain" not in html
    assert "<td>south</td><td>–</td>" in html


def test_optional_files_may_be_missing(tmp_path):
    run = make_run(tmp_path / "run", extras=False)
    html = write_report(run).read_text(encoding="utf-8")
    assert "no run.json" in html and "No sites.json" in html and "Best model" not in html
    assert "<td>0.850</td>" in html


def test_rewriting_replaces_the_report(tmp_path):
    run = make_run(tmp_path / "run")
    (run / "report.html").write_text("old")
    assert write_report(run).read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_missing_run_folder(tmp_path):
    with pytest.raises(RunDirError, match="nowhere"):
        write_report(tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["job.yaml", "metrics.jsonl"])
def test_missing_required_file_names_it(tmp_path, name):
    run = make_run(tmp_path / "run")
    (run / name).unlink()
    with pytest.raises(RunDirError, match=re.escape(str(run / name))):
        write_report(run)
    assert not (run / "report.html").exists()


def test_malformed_files_are_named(tmp_path):
    run = make_run(tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as f:
        f.write("{oops\n")
    with pytest.raises(RunDirError, match=r"metrics\.jsonl, line \d+: not valid JSON"):
        write_report(run)
    run = make_run(tmp_path / "run2")
    (run / "run.json").write_text("{")
    with pytest.raises(RunDirError, match="run.json"):
        write_report(run)
    run = make_run(tmp_path / "run3")
    (run / "job.yaml").write_text(yaml.safe_dump(make_job() | {"rounds": 0}))
    with pytest.raises(ConfigError, match="rounds"):
        write_report(run)


def test_report_of_ten_sites_and_fifty_rounds(tmp_path):
    sites = [f"site_{i}" for i in range(10)]
    run = tmp_path / "run"
    run.mkdir()
    (run / "job.yaml").write_text(yaml.safe_dump(make_job(sites=sites, rounds=50, compare=("local", "centralized"))))
    final = {arm: {s: 0.7 for s in [*sites, "all"]} for arm in ("federated", "local", "centralized")}
    write_metrics(run / "metrics.jsonl", sites=sites, rounds=50, final=final)
    html = write_report(run).read_text(encoding="utf-8")
    assert all(f"<td>{s}</td>" in html for s in sites)


def test_summary_table_shows_the_comparison(tmp_path):
    from medfed.tracking.metrics import read_metrics

    write_metrics(tmp_path / "metrics.jsonl")
    console = Console(record=True, width=120)
    console.print(summary_table(read_metrics(tmp_path / "metrics.jsonl"), "auc"))
    text = console.export_text()
    assert "federated" in text and "local" in text and "centralized" not in text
    for site, cells in {"north": ("0.750", "0.850", "+0.100"), "south": ("0.800", "0.700", "-0.100"),
                        "all": ("0.770", "0.790", "+0.020")}.items():
        line = next(ln for ln in text.splitlines() if f" {site} " in ln)
        assert [c for c in cells if c in line] == list(cells), line


def test_sites_json_of_older_runs_and_skipped_files(tmp_path):
    from medfed.core.summary import SiteSummary

    older = {"name": "a", "train": 3, "val": 1, "test": 1, "shape": [1, 8, 8],
             "skipped": [{"file": "x.png", "reason": "truncated"}]}  # before 2026-12-04: the files listed
    s = SiteSummary.model_validate(older)
    assert s.skipped == 1 and s.skipped_files[0].file == "x.png"
    assert "skipped_files" not in s.for_the_server() and s.for_the_server()["skipped"] == 1
    run = make_run(tmp_path / "run")
    (run / "sites.json").write_text(json.dumps({"sites": [older]}))
    html = render_report(run)
    assert "x.png: truncated" in html
    (run / "sites.json").write_text(json.dumps({"sites": [{"name": "a", "train": 3}]}))
    with pytest.raises(RunDirError, match=r"sites.json: site 'a': val: Field required"):
        render_report(run)
