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


# --------------------------------------------------------------------------- hostile numbers and files


def _bomb(levels: int) -> str:
    """A "billion laughs" job file: each anchor a list of ten aliases of the one before,
    so ``name`` expands to 10**levels strings while the file stays a few lines long."""
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "\n".join(lines + [f"name: *a{levels - 1}"]) + "\n"


def test_yaml_alias_bomb_is_refused_naming_the_file(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_bomb(6))  # 10**6 strings: validating it, or printing the error, would take ages at 9
    with pytest.raises(ConfigError) as e:
        load_job(bomb)
    msg = str(e.value)
    assert f"job file '{bomb}' holds more than 1,000,000 values once its aliases" in msg
    assert len(msg) < 500  # the expanded value is never printed
    loop = tmp_path / "loop.yaml"
    loop.write_text("name: &x [a, *x]\n")
    with pytest.raises(ConfigError, match="has an alias that refers to a value containing it"):
        load_job(loop)


def test_yaml_aliases_within_the_bound_still_work(tmp_path):
    f = tmp_path / "j.yaml"
    f.write_text(
        "name: m\noutput: o\nrounds: 1\nmodel: {name: small_cnn}\ntask: {labels: binary}\n"
        "data:\n  source: synthetic\n  sites:\n"
        "    - {name: a, n_train: 4, n_test: 2, scanner: &old {noise: 0.1, blur: 0.5}}\n"
        "    - {name: b, n_train: 4, n_test: 2, scanner: *old}\n"
    )
    job = load_job(f)
    assert job.data.sites[1].scanner.noise == 0.1 and job.data.sites[1].scanner.blur == 0.5


def _set(path: str, value):
    """A mutation of BASE that sets the field at the dotted ``path`` (``[i]`` indexes a list)."""
    def mutate(d):
        *head, last = path.replace("[", ".[").split(".")
        for key in head:
            d = d[int(key[1:-1])] if key.startswith("[") else d.setdefault(key, {})
        d[last] = value
    return mutate


@pytest.mark.parametrize("path", [
    "rounds", "seed", "threads", "workers", "min_sites", "eval_every", "finetune_epochs", "train.local_epochs",
    "train.batch_size", "model.width", "sampling.count", "sampling.minimum", "data.image_size",
    "data.sites[0].n_train", "data.sites[0].n_val", "data.sites[0].n_test",
])
@pytest.mark.parametrize("value", [True, 2.0, 1.0e9])
def test_booleans_and_floats_are_not_counts(path, value):
    assert f"{path}: must be an integer, got {value!r}" in _error(_set(path, value))


@pytest.mark.parametrize("change, message", [
    ({"dims": True}, "data.dims: must be an integer, got True"),
    ({"dims": 3.0}, "data.dims: must be an integer, got 3.0"),
    ({"image_size": 32.0}, "data.image_size: must be an integer, got 32.0"),
])
def test_booleans_and_floats_are_not_counts_in_segmentation_data(change, message):
    with pytest.raises(ConfigError) as e:
        parse_job({**SEG, "data": {**SEG["data"], **change}})
    assert message in str(e.value)


@pytest.mark.parametrize("path", [
    "train.lr", "train.momentum", "train.weight_decay", "round_timeout", "data.lesion_contrast",
    "data.sites[0].prevalence", "data.sites[0].scanner.noise", "data.sites[0].scanner.intensity_offset",
    "sampling.fraction",
])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_reals_must_be_finite(path, value):
    assert f"{path}: must be a finite number, got {value!r}" in _error(_set(path, value))


def test_reals_refuse_booleans_and_inf_in_every_section(tmp_path):
    assert "train.lr: must be a number, not true/false, got True" in _error(_set("train.lr", True))
    for algorithm, field in [({"name": "fedprox"}, "mu"), ({"name": "fedadam"}, "tau"), ({"name": "moon"}, "tau")]:
        msg = _error(lambda d: d.update(algorithm={**algorithm, field: float("inf")}))
        assert f"algorithm.{field}: must be a finite number, got inf" in msg
    window = {"transforms": {"preprocess": [{"name": "window", "min": float("-inf"), "max": 1}]}}
    assert "transforms.preprocess[0].min: must be a finite number" in _error(lambda d: d.update(window))
    spacing = {"transforms": {"preprocess": [{"name": "spacing", "pixdim": [1.0, float("nan")]}]}}
    assert "transforms.preprocess[0].pixdim[1]: must be a finite number" in _error(lambda d: d.update(spacing))
    f = tmp_path / "inf.yaml"  # the YAML spelling of the report
    f.write_text("name: m\noutput: o\nrounds: 1\nmodel: {name: small_cnn}\ntask: {labels: binary}\n"
                 "data: {source: synthetic, sites: [{name: a, n_train: 4, n_test: 2}]}\ntrain: {lr: .inf}\n")
    with pytest.raises(ConfigError, match=r"train\.lr: must be a finite number, got inf"):
        load_job(f)


@pytest.mark.parametrize("path, value, message", [
    ("train.local_epochs", 10**6, "train.local_epochs: must be <= 1000, got 1000000"),
    ("train.batch_size", 10**6, "train.batch_size: must be <= 16384, got 1000000"),
    ("finetune_epochs", 10**6, "finetune_epochs: must be <= 1000"),
    ("eval_every", 10**6, "eval_every: must be <= 100000"),
    ("rounds", 10**6, "rounds: must be <= 100000"),
    ("min_sites", 10**6, "min_sites: must be <= 10000"),
    ("sampling.count", 10**6, "sampling.count: must be <= 10000"),
    ("round_timeout", 1e300, "round_timeout: must be <= 604800"),
    ("data.sites[0].n_train", 10**9, "data.sites[0].n_train: must be <= 1000000, got 1000000000"),
    ("data.sites[0].n_test", 10**9, "data.sites[0].n_test: must be <= 1000000"),
])
def test_counts_have_upper_bounds(path, value, message):
    assert message in _error(_set(path, value))


def test_image_sizes_have_upper_bounds():
    big_side = {"transforms": {"preprocess": [{"name": "resize", "size": [100_000, 16, 16]}]}}
    with pytest.raises(ConfigError, match=r"transforms\.preprocess\[0\]\.size\[0\]: must be <= 4096"):
        parse_job({**SEG, **big_side})
    too_many = {"transforms": {"preprocess": [{"name": "crop_or_pad", "size": [4096, 4096, 4096]}]}}
    with pytest.raises(ConfigError, match=r"transforms\.preprocess\[0\]\.size: .*an image may have at most"):
        parse_job({**SEG, **too_many})
    with pytest.raises(ConfigError, match=r"transforms\.patch\[1\]: must be <= 4096"):
        parse_job({**SEG, "transforms": {"patch": [16, 10**6, 16]}})


def test_synthetic_data_must_fit_the_memory_bound():
    from medfed.config import SyntheticData, SyntheticSegmentationData
    from medfed.data.synthetic import make_synthetic_sites
    from medfed.data.synthetic_seg import make_synthetic_seg_sites

    msg = _error(lambda d: d["data"].update(image_size=512, sites=[{"name": "a", "n_train": 1_000_000, "n_test": 5}]))
    assert "data.sites[0].n_train: 1,000,000 examples of 1x512x512 pixels" in msg
    assert "would need 976.6 GiB of memory, more than the 4.0 GiB synthetic data may take" in msg
    seg = {**SEG["data"], "image_size": 256, "sites": [{"name": "a", "n_train": 4, "n_test": 300}]}
    with pytest.raises(ConfigError, match=r"data\.sites\[0\]\.n_test: 300 examples of 1x256x256x256 pixels; the "
                                          r"generated images and masks .* would need 60\.8 GiB"):
        parse_job({**SEG, "data": seg})
    # the source itself refuses too, before it allocates anything
    huge = SyntheticData(source="synthetic", image_size=512, sites=[{"name": "a", "n_train": 1_000_000, "n_test": 1}])
    with pytest.raises(ConfigError, match=r"data\.sites\[0\]\.n_train: 1,000,000 examples"):
        make_synthetic_sites(huge, seed=0)
    huge_seg = SyntheticSegmentationData.model_validate(seg)
    with pytest.raises(ConfigError, match=r"data\.sites\[0\]\.n_test: 300 examples"):
        make_synthetic_seg_sites(huge_seg, num_classes=3, seed=0)


@pytest.mark.parametrize("section, body, message", [
    ("privacy", {"dp": {"noise_multiplier": float("inf"), "clip": 1.0, "delta": 1e-5}},
     "privacy.dp.noise_multiplier: must be a finite number, got inf"),
    ("privacy", {"dp": {"noise_multiplier": 1.0, "clip": 1.0, "delta": 1e-5, "max_epsilon": float("inf")}},
     "privacy.dp.max_epsilon: must be a finite number, got inf"),
    ("privacy", {"secure_aggregation": {"threshold": 2.0}}, "privacy.secure_aggregation.threshold: "),
    ("robust", {"rule": "krum", "f": True}, "robust.f: "),
    ("attack", {"kind": "scale", "fraction": 0.3, "scale": float("inf")}, "attack.scale: must be a finite number"),
])
def test_privacy_and_robust_sections_take_only_finite_numbers_and_whole_counts(section, body, message):
    assert message in _error(lambda d: d.update({section: body}))


def test_the_consortium_file_takes_whole_counts(tmp_path):
    from medfed.transport.pki import load_consortium

    f = tmp_path / "consortium.yaml"
    f.write_text("name: c\nserver: {host: 127.0.0.1, port: true}\nsites: [a, b]\n")
    with pytest.raises(ConfigError, match="server.port"):
        load_consortium(f)
