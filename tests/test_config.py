import copy
from pathlib import Path

import pytest

from medfed.config import builtin_job_path, load_job, parse_job
from medfed.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

BASE = {
    "name": "t",
    "output": "out",
    "rounds": 2,
    "data": {"source": "synthetic", "sites": [{"name": "a", "n_train": 10, "n_test": 5}]},
    "model": {"name": "small_cnn"},
    "task": {"labels": "binary"},
}


def _error(mutate) -> str:
    raw = copy.deepcopy(BASE)
    mutate(raw)
    with pytest.raises(ConfigError) as e:
        parse_job(raw, "job.yaml")
    return str(e.value)


@pytest.mark.parametrize(
    "mutate,expected",
    [
        (lambda d: d.update(train={"lr": -1}), "train.lr: must be > 0, got -1"),
        (lambda d: d.update(rounds=0), "rounds: must be >= 1, got 0"),
        (lambda d: d["model"].update(name="vgg16"), "model.name: unknown model name"),
        (lambda d: d.update(algorithm={"name": "fedfoo"}), "algorithm.name: unknown algorithm name 'fedfoo'"),
        (lambda d: d.update(algorithm={"mu": 0.1}), "algorithm.name: is required"),
        (lambda d: d.update(algorithm={"name": "fedprox", "mu": -1}), "algorithm.mu: must be >= 0, got -1"),
        (lambda d: d.update(algorithm={"name": "fedadam", "beta1": 1.0}), "algorithm.beta1: must be < 1, got 1.0"),
        (lambda d: d.update(algorithm={"name": "fedyogi", "tau": 0}), "algorithm.tau: must be > 0, got 0"),
        (lambda d: d.update(algorithm={"name": "scaffold", "server_lr": -1}), "algorithm.server_lr: must be > 0"),
        (lambda d: d.update(algorithm={"name": "scaffold"}), "train.momentum: scaffold's control variates assume plain SGD"),
        (lambda d: d.update(algorithm={"name": "fednova"}, train={"optimizer": "adam"}), "train.optimizer: fednova normalizes"),
        (lambda d: d.update(algorithm={"name": "feddyn", "alpha": 0}), "algorithm.alpha: must be > 0, got 0"),
        (lambda d: d["data"].update(sites=[]), "data.sites: must have at least 1 item"),
        (lambda d: d["data"]["sites"][0].update(n_train=0), "data.sites[0].n_train: must be > 0, got 0"),
        (lambda d: d["data"].update(source="dicom"), "data.source: unknown data source 'dicom'"),
        (lambda d: d.update(epochs=3), "epochs: is not a known field"),
        (lambda d: d.pop("rounds"), "rounds: is required"),
        (lambda d: d.update(min_sites=2), "min_sites: is 2 but only 1 of the 1 sites train in a round"),
        (lambda d: d["data"]["sites"].append({"name": "a", "n_train": 1, "n_test": 1}), "'a' appears twice"),
        (lambda d: d["data"]["sites"][0].update(name="bad name!"), "data.sites[0].name: must match"),
        (lambda d: d["data"]["sites"][0].update(name="all"), "data.sites: 'all' is reserved"),
        (lambda d: d["task"].update(num_classes=3), "num_classes must be 2 for binary labels"),
        (lambda d: d.update(compare=["local", "local"]), "compare entries must be unique"),
        (lambda d: d["train"].update(momentum=1.0) if "train" in d else d.update(train={"momentum": 1.0}), "train.momentum: must be < 1"),
    ],
)
def test_errors_name_the_field_and_value(mutate, expected):
    msg = _error(mutate)
    assert "job.yaml: invalid job" in msg
    assert expected in msg


def test_valid_job_is_frozen_and_hash_ignores_output():
    job = parse_job(copy.deepcopy(BASE))
    with pytest.raises(Exception):
        job.rounds = 5
    other = parse_job({**copy.deepcopy(BASE), "output": "elsewhere"})
    assert job.job_hash() == other.job_hash()
    changed = parse_job({**copy.deepcopy(BASE), "seed": 1})
    assert job.job_hash() != changed.job_hash()


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_job(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_job(scalar)


def test_relative_data_path_resolves_against_job_folder(tmp_path):
    (tmp_path / "jobs").mkdir()
    f = tmp_path / "jobs" / "j.yaml"
    f.write_text(
        "name: m\noutput: o\nrounds: 1\nmodel: {name: small_cnn}\ntask: {labels: binary}\n"
        "data: {source: medmnist, path: ../data/x.npz, partition: {method: iid, sites: [a, b]}}\n"
    )
    job = load_job(f)
    assert job.data.path == (tmp_path / "data" / "x.npz").resolve()


def test_example_jobs_are_valid_and_builtin_matches_examples():
    for f in sorted((REPO / "examples").glob("*.yaml")):
        load_job(f)
    assert builtin_job_path().read_text() == (REPO / "examples" / "quickstart.yaml").read_text()


SEG = {
    "name": "s", "output": "o", "rounds": 1, "model": {"name": "unet"},
    "task": {"kind": "segmentation", "num_classes": 3},
    "data": {"source": "synthetic_segmentation", "dims": 3, "image_size": 32,
             "sites": [{"name": "a", "n_train": 4, "n_test": 2}, {"name": "b", "n_train": 4, "n_test": 2}]},
}


@pytest.mark.parametrize("change, message", [
    ({"task": {"kind": "segmentation", "num_classes": 5}}, "task.num_classes: synthetic segmentation has 2 classes"),
    ({"model": {"name": "small_cnn"}}, "model.name: a segmentation task needs one of ['unet', 'segresnet']"),
    ({"task": {"labels": "binary"}}, "data.source: 'synthetic_segmentation' data needs task.kind: segmentation"),
    ({"transforms": {"patch": [16, 16]}}, "transforms.patch: needs 3 sizes for 3D data, got [16, 16]"),
    ({"transforms": {"augment": [{"name": "flip", "prob": 2}]}}, "transforms.augment[0].prob: must be <= 1, got 2"),
    ({"transforms": {"preprocess": [{"name": "window"}]}}, "transforms.preprocess[0]: window: give min and max, or a preset"),
    ({"transforms": {"preprocess": [{"name": "resize", "size": [8, 8]}]}}, "transforms.preprocess[0]: resize needs 3 sizes"),
    ({"task": {"kind": "segmentaton"}}, "task.kind: unknown task kind 'segmentaton'"),
    ({"held_out": ["a", "b"]}, "held_out: at least one site must train"),
    ({"held_out": ["c"]}, "held_out: unknown site(s) ['c']"),
    ({"feature_shift": {"c": {}}}, "feature_shift: unknown site(s) ['c']"),
    ({"feature_shift": {"a": {"resolution": 0}}}, "feature_shift.a.resolution: must be > 0"),
    ({"data": {"source": "pairs", "mask_values": [0, 255], "sites": [{"name": "a", "images": "i"}]}},
     "data.sites: site 'a': image/mask pairs need a masks folder"),
    ({"data": {"source": "pairs", "mask_values": [0, 255], "sites": [{"name": "a", "images": "i", "masks": "m"}]}},
     "data.mask_values: 2 values [0, 255] but task.num_classes is 3"),
    ({"data": {"source": "volumes", "sites": [{"name": "a", "images": "i", "masks": "m", "train": {"images": "t"}}]}},
     "site 'a': give either images (all examples) or train"),
])
def test_segmentation_and_transform_errors_name_the_field(change, message):
    with pytest.raises(ConfigError) as e:
        parse_job({**SEG, **change})
    assert message in str(e.value)


def test_folder_source_needs_exactly_one_way_to_make_sites():
    base = {"name": "f", "output": "o", "rounds": 1, "model": {"name": "small_cnn"}, "task": {"labels": "binary"}}
    with pytest.raises(ConfigError, match="give exactly one of sites, sites_by or partition, got none"):
        parse_job({**base, "data": {"source": "folder", "label_columns": ["y"], "images": "i", "csv": "c"}})
    with pytest.raises(ConfigError, match="sites_by splits one data set: give its images folder and csv"):
        parse_job({**base, "data": {"source": "folder", "label_columns": ["y"],
                                    "sites_by": {"column": "h", "sites": ["x"]}}})
    job = parse_job({**base, "data": {"source": "folder", "label_columns": ["y"], "images": "img", "csv": "l.csv",
                                      "sites_by": {"column": "h", "sites": ["x", "y"]}}}, base_dir=Path("/data/jobs"))
    assert job.site_names == ["x", "y"] and job.data.images == Path("/data/jobs/img")
