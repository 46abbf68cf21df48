"""Where the weights start (``model.init``, ``init_keys``) and which stay fixed (``model.freeze``)."""

import hashlib
import json
import re
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from medfed.config import ModelConfig, TaskConfig, parse_job
from medfed.core.errors import ConfigError, ModelError
from medfed.core.types import Arm
from medfed.models import build_model, get_params
from medfed.server.runner import initial_model, run_job
from medfed.site.app import SiteApp
from medfed.transport.grpc.hub import site_view

BINARY = TaskConfig(labels="binary")


def _job(tmp_path, model=None, **overrides):
    body = {
        "name": "w", "seed": 5, "output": str(tmp_path / "run"), "rounds": 1, "threads": 1,
        "data": {"source": "synthetic", "image_size": 16, "sites": [
            {"name": "a", "n_train": 16, "n_val": 8, "n_test": 8, "prevalence": 0.5},
            {"name": "b", "n_train": 16, "n_val": 8, "n_test": 8, "prevalence": 0.5},
        ]},
        "model": {"name": "small_cnn", "width": 4, **(model or {})},
        "task": {"labels": "binary"},
        "train": {"batch_size": 8, "lr": 0.1},
    }
    body.update(overrides)
    return parse_job(body)


def _weights(seed=123, **model):
    """A state dict of another small_cnn than the job's seed would build."""
    torch.manual_seed(seed)
    task = TaskConfig(labels="multiclass", num_classes=model.pop("classes")) if "classes" in model else BINARY
    return get_params(build_model(ModelConfig(name="small_cnn", **{"width": 4, **model}), task, 1))


def _save(state, path):
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    elif path.suffix == ".pth":
        torch.save({"state_dict": state, "epoch": 3}, path)  # a training checkpoint
    else:
        torch.save(state, path)  # a plain state dict
    return path


def _equal(a, b, keys=None):
    return all(torch.equal(a[k], b[k]) for k in (keys if keys is not None else a))


@pytest.fixture
def spy_fit(monkeypatch):
    """(arm, round, params received, update params) of every fit at every site."""
    calls = []
    original = SiteApp.fit

    def fit(self, params, plan):
        received = {k: v.clone() for k, v in params.items()}
        update = original(self, params, plan)
        calls.append((plan.arm, plan.round, self.name, received, dict(update.params)))
        return update

    monkeypatch.setattr(SiteApp, "fit", fit)
    return calls


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth"])
def test_init_strict_starts_every_site_and_arm_from_the_file(tmp_path, spy_fit, suffix):
    state = _weights()
    path = _save(state, tmp_path / f"pretrained{suffix}")
    job = _job(tmp_path, {"init": str(path)}, compare=["local", "centralized"])
    assert job.model.init_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    built = get_params(initial_model(job, 1))
    assert _equal(state, built)
    assert not _equal(get_params(initial_model(_job(tmp_path), 1)), built)  # not what the seed alone builds
    run = run_job(job).run_dir
    firsts = [(arm, site, received) for arm, rnd, site, received, _ in spy_fit if rnd == 1]
    assert {arm for arm, _, _ in firsts} == {Arm.FEDERATED, Arm.LOCAL, Arm.CENTRALIZED}
    for arm, site, received in firsts:
        assert _equal(state, received), (arm, site)
    marker = json.loads((run / "run.json").read_text())
    assert marker["init_sha256"] == job.model.init_sha256
    assert "20 of the model's 20 entries loaded" in (run / "run.log").read_text()


def test_the_job_hash_counts_the_init_content_not_its_path(tmp_path):
    a = _save(_weights(), tmp_path / "a.safetensors")
    b = tmp_path / "elsewhere" / "b.safetensors"
    b.parent.mkdir()
    shutil.copyfile(a, b)
    other = _save(_weights(seed=9), tmp_path / "c.safetensors")
    h = {p: _job(tmp_path, {"init": str(p)}).job_hash() for p in (a, b, other)}
    assert h[a] == h[b] != h[other]
    assert h[a] != _job(tmp_path).job_hash()


def test_a_relative_init_path_is_read_against_the_job_file(tmp_path):
    from medfed.config import load_job

    (tmp_path / "jobs" / "w").mkdir(parents=True)
    _save(_weights(), tmp_path / "jobs" / "w" / "init.pt")
    body = _job(tmp_path).model_dump(mode="json")
    body["model"]["init"] = "w/init.pt"
    job_file = tmp_path / "jobs" / "job.yaml"
    job_file.write_text(yaml.safe_dump(body))
    job = load_job(job_file)
    assert job.model.init == (tmp_path / "jobs" / "w" / "init.pt").resolve()
    assert job.model.init_sha256 == hashlib.sha256(job.model.init.read_bytes()).hexdigest()


def test_a_site_gets_the_hash_but_not_the_path(tmp_path):
    path = _save(_weights(), tmp_path / "secret-name.safetensors")
    job = _job(tmp_path, {"init": str(path)})
    view = site_view(job)
    assert view["model"]["init"] == "<site-local>" and view["model"]["init_sha256"] == job.model.init_sha256
    assert "secret-name" not in json.dumps(view)
    at_site = parse_job(view, source="job from the server")  # the site has no such file, and needs none
    assert at_site.model.init_sha256 == job.model.init_sha256


def test_strict_refuses_other_shapes_key_by_key(tmp_path):
    path = _save(_weights(width=8), tmp_path / "wide.safetensors")
    with pytest.raises(ModelError) as e:
        initial_model(_job(tmp_path, {"init": str(path)}), 1)
    msg = str(e.value)
    assert msg.startswith("model.init: init_keys: strict needs every entry of the model")
    assert re.search(r"\n  features\.0\.0\.weight +\[4, 1, 3, 3\] +\[8, 1, 3, 3\] +shapes differ: kept as built\n", msg)
    assert "head.weight" in msg and "use init_keys: partial" in msg


def test_partial_loads_what_matches_and_tables_the_rest_in_run_log(tmp_path):
    state = _weights(classes=3)  # a head of 3 classes; the job's is binary
    state["extra.bias"] = torch.zeros(2)
    path = _save(state, tmp_path / "encoder.pt")
    job = _job(tmp_path, {"init": str(path), "init_keys": "partial"})
    with pytest.raises(ModelError, match=r"head\.weight  \[1, 16\]  \[3, 16\]"):
        initial_model(_job(tmp_path, {"init": str(path)}), 1)  # strict
    built = get_params(initial_model(job, 1))
    body = [k for k in built if not k.startswith("head.")]
    assert _equal(state, built, body)
    assert built["head.weight"].shape == (1, 16)
    run = run_job(job).run_dir
    log = (run / "run.log").read_text()
    assert "18 of the model's 20 entries loaded; 2 with another shape, 0 not in the file, 1 of the file's" in log
    lines = [line.split(" INFO ", 1)[-1] for line in log.splitlines()]  # one table row a record
    at = lines.index("model.init: the entries not loaded from the file:")
    assert lines[at + 1:at + 5] == [
        "  entry        model    file",
        "  head.weight  [1, 16]  [3, 16]  shapes differ: kept as built",
        "  head.bias    [1]      [3]      shapes differ: kept as built",
        "  extra.bias   -        [2]      not in the model: ignored",
    ]


def test_partial_with_nothing_in_common_is_an_error(tmp_path):
    state = {f"module.{k}": v for k, v in _weights().items()}  # saved from a DataParallel wrapper
    path = _save(state, tmp_path / "dp.safetensors")
    with pytest.raises(ModelError, match=r"none of the 20 entries .* start with module; the model's with features, "
                                         r"pool, head"):
        initial_model(_job(tmp_path, {"init": str(path), "init_keys": "partial"}), 1)


def test_unreadable_or_changed_init_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.init: cannot read '.*missing\.pt'"):
        _job(tmp_path, {"init": str(tmp_path / "missing.pt")})
    path = _save(_weights(), tmp_path / "w.safetensors")
    with pytest.raises(ConfigError, match=r"model\.init_sha256: the job pins 0{64}, but .* has SHA-256"):
        _job(tmp_path, {"init": str(path), "init_sha256": "0" * 64})
    job = _job(tmp_path, {"init": str(path)})
    _save(_weights(seed=7), path)
    with pytest.raises(ConfigError, match="changed since the job was loaded"):
        initial_model(job, 1)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"cannot read .* as a PyTorch checkpoint with weights_only=True"):
        initial_model(_job(tmp_path, {"init": str(garbage)}), 1)


class _Settings:  # an object pickled into a checkpoint: weights_only refuses to rebuild it
    lr = 0.1


def test_a_checkpoint_holding_objects_is_refused_by_weights_only(tmp_path):
    path = tmp_path / "full.pt"
    torch.save({"model": _weights(), "settings": _Settings()}, path)
    with pytest.raises(ConfigError, match=r"weights_only=True \(UnpicklingError"):
        initial_model(_job(tmp_path, {"init": str(path)}), 1)


# ---- freeze


def test_frozen_parameters_stay_fixed_in_every_arm_and_the_others_train(tmp_path, spy_fit):
    job = _job(tmp_path, {"freeze": ["features.0.", "features.1.0"]}, rounds=2, compare=["local", "finetuned"])
    frozen = {"features.0.0.weight", "features.0.1.weight", "features.0.1.bias", "features.1.0.weight"}
    init = get_params(initial_model(job, 1))
    run = run_job(job).run_dir
    assert {arm for arm, *_ in spy_fit} == {Arm.FEDERATED, Arm.LOCAL, Arm.FINETUNED}
    for arm, rnd, site, received, sent in spy_fit:
        assert _equal(received, sent, frozen), (arm, rnd, site)
        assert not torch.equal(received["head.weight"], sent["head.weight"]), (arm, rnd, site)
        assert not torch.equal(received["features.2.0.weight"], sent["features.2.0.weight"])
    final = load_file(str(run / "model_final.safetensors"))
    assert _equal(init, final, frozen)
    assert not torch.equal(init["head.weight"], final["head.weight"])


def test_frozen_parameters_are_not_trainable_anywhere(tmp_path):
    from medfed.algorithms.base import trainable_keys

    model = build_model(ModelConfig(name="small_cnn", width=4, freeze=["head"]), BINARY, 1)
    assert not {"head.weight", "head.bias"} & trainable_keys(model)
    assert "features.0.0.weight" in trainable_keys(model)


def test_a_prefix_matching_no_parameter_names_it_and_the_top_modules():
    with pytest.raises(ConfigError, match=r"model\.freeze: 'encoder\.' matches no parameter of the model \(.*"
                                          r"top-level modules: features, pool, head\)"):
        build_model(ModelConfig(name="small_cnn", width=4, freeze=["head", "encoder."]), BINARY, 1)


def test_a_site_freezes_the_job_prefixes_even_in_a_model_built_without_them(tmp_path):
    """The site passes the job's frozen names to every phase of local training (with FedRep's
    own), whatever the model buffer it is given."""
    from medfed.data.sites import build_sites
    from medfed.server.loop import make_plan

    job = _job(tmp_path, {"freeze": ["features.0."]}, algorithm={"name": "fedrep", "personal_layers": ["head"]})
    site = build_sites(job)[0]
    plain = build_model(ModelConfig(name="small_cnn", width=4), BINARY, 1)  # every parameter trainable
    app = SiteApp(site, job, torch.device("cpu"), model=plain)
    params = get_params(plain)
    for arm in (Arm.FEDERATED, Arm.LOCAL):
        update = app.fit(params, make_plan(job, job.job_id, arm, 1, 0))
        frozen = [k for k in update.params if k.startswith("features.0.") and "running" not in k
                  and "num_batches" not in k]
        assert frozen and _equal(params, update.params, frozen), arm
        assert not torch.equal(params["features.1.0.weight"], update.params["features.1.0.weight"]), arm


def test_frozen_parameters_keep_their_values_under_central_dp_noise(tmp_path):
    job = _job(tmp_path, {"norm": "group", "freeze": ["features.0."]},
               privacy={"dp": {"noise_multiplier": 1.0, "clip": 1.0, "delta": 1e-5}})
    init = get_params(initial_model(job, 1))
    final = load_file(str(run_job(job).run_dir / "model_final.safetensors"))
    frozen = ["features.0.0.weight", "features.0.1.weight", "features.0.1.bias"]
    assert _equal(init, final, frozen)  # the noise the server adds to the mean is undone on them
    assert not torch.equal(init["features.1.0.weight"], final["features.1.0.weight"])


def test_site_level_dp_refuses_a_monai_network_with_batch_norm_when_built(tmp_path):
    body = _job(tmp_path).model_dump(mode="json")
    body["privacy"] = {"dp": {"noise_multiplier": 1.0, "clip": 1.0, "delta": 1e-5}}
    body["model"] = {"monai": "DenseNet", "args": {"init_features": 4, "growth_rate": 4, "block_config": [1]}}
    job = parse_job(body)  # the schema cannot know the class's layers
    with pytest.raises(ConfigError, match=r"model: site-level DP .* monai\.networks\.nets\.DenseNet has batch-norm "
                                          r"layers: use a network with group or instance norm, or algorithm fedbn"):
        initial_model(job, 1)
    body["algorithm"] = {"name": "fedbn"}
    initial_model(parse_job(body), 1)  # batch norm stays at each site: fine
