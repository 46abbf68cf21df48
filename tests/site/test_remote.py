"""A deployed site validates the job it is sent and reads only its own data."""

from __future__ import annotations

import pytest
import yaml

from medfed.config import builtin_job_path, load_job
from medfed.core.errors import ConfigError
from medfed.site.remote import RemoteSite
from medfed.transport.grpc.hub import site_view


def _view(tmp_path, **over) -> dict:
    job = load_job(builtin_job_path("quickstart")).model_copy(update={"output": tmp_path / "run"})
    view = site_view(job)
    view.update(over)
    return view


def test_a_site_sets_up_its_own_share_of_generated_data(tmp_path):
    site = RemoteSite("hospital_b", None)
    summary, timeout = site.setup(_view(tmp_path), "job1")
    assert summary["name"] == "hospital_b" and (summary["train"], summary["val"], summary["test"]) == (300, 60, 200)
    assert summary["shape"] == [1, 32, 32] and summary["skipped"] == 0 and timeout == 600.0
    assert site.job_id == "job1" and site.app.name == "hospital_b"
    # with the summary goes the description of the model it built, for the server to compare
    from medfed.models import model_fingerprint

    assert summary["model"]["fingerprint"] == model_fingerprint(site.app.model)
    assert [e[0] for e in summary["model"]["entries"]] == list(site.app.model.state_dict())


def test_the_job_travels_without_paths(tmp_path):
    view = _view(tmp_path)
    assert view["output"] == "<site-local>"


@pytest.mark.parametrize(
    "over, message",
    [
        ({"model": {"name": "my_custom_net"}}, "model"),
        ({"algorithm": {"name": "secret_sauce"}}, "algorithm"),
        ({"data": {"source": "python_module", "path": "x.py"}}, "data"),
    ],
)
def test_unknown_methods_are_refused(tmp_path, over, message):
    with pytest.raises(ConfigError, match=message):
        RemoteSite("hospital_a", None).setup(_view(tmp_path, **over), "job1")


def test_a_site_not_in_the_job_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="has no site 'hospital_z'"):
        RemoteSite("hospital_z", None).setup(_view(tmp_path), "job1")


def _pairs_job(tmp_path) -> dict:
    job = {
        "name": "seg", "output": "<site-local>", "rounds": 1,
        "data": {"source": "pairs", "mask_values": [0, 255],
                 "sites": [{"name": "hospital_a", "images": "<site-local>", "masks": "<site-local>"},
                           {"name": "hospital_b", "images": "<site-local>", "masks": "<site-local>"}]},
        "model": {"name": "unet"},
        "task": {"kind": "segmentation", "num_classes": 2},
    }
    return job


def test_a_job_that_reads_files_needs_a_data_file(tmp_path):
    with pytest.raises(ConfigError, match="give this site's paths with --data"):
        RemoteSite("hospital_a", None).setup(_pairs_job(tmp_path), "job1")


@pytest.mark.parametrize(
    "data, message",
    [
        ({"source": "pairs", "mask_values": [0, 128],
          "sites": [{"name": "hospital_a", "images": "img", "masks": "msk"}]}, "data.mask_values differs"),
        ({"source": "pairs", "mask_values": [0, 255],
          "sites": [{"name": "hospital_b", "images": "img", "masks": "msk"}]}, "this site is 'hospital_a'"),
        ({"source": "volumes", "sites": [{"name": "hospital_a", "images": "img", "masks": "msk"}]},
         "data.source is 'volumes'"),
    ],
)
def test_the_data_file_may_differ_from_the_job_only_in_paths(tmp_path, data, message):
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump({"data": data}))
    with pytest.raises(ConfigError, match=message):
        RemoteSite("hospital_a", path).setup(_pairs_job(tmp_path), "job1")


def test_a_matching_data_file_reads_local_files(tmp_path):
    import numpy as np
    from PIL import Image

    for sub in ("img", "msk"):
        (tmp_path / sub).mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(tmp_path / "img" / f"c{i}.png")
        m = np.zeros((16, 16), np.uint8)
        m[4:10, 4:10] = 255
        Image.fromarray(m).save(tmp_path / "msk" / f"c{i}.png")
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump({"data": {"source": "pairs", "mask_values": [0, 255],
                                             "sites": [{"name": "hospital_a", "images": "img", "masks": "msk"}]}}))
    summary, _ = RemoteSite("hospital_a", path).setup(_pairs_job(tmp_path), "job1")
    assert summary["train"] + summary["val"] + summary["test"] == 10 and summary["shape"] == [1, 16, 16]


DP = {"noise_multiplier": 1.0, "clip": 1.0, "delta": 1e-5}
GROUP = {"name": "small_cnn", "width": 16, "norm": "group"}  # site-level DP refuses batch norm


def test_a_site_refuses_a_job_that_would_pass_its_own_privacy_limit(tmp_path):
    # quickstart: 20 rounds, every site every round; epsilon after 20 rounds of z=1 is far above 1
    with pytest.raises(ConfigError, match=r"site 'hospital_a' allows epsilon <= 1, but the job reaches 30.1 at delta 1e-05 after round 20 .*; refused"):
        RemoteSite("hospital_a", None, max_epsilon=1.0).setup(_view(tmp_path, privacy={"dp": DP}, model=GROUP), "job1")
    with pytest.raises(ConfigError, match="the job has no differential privacy"):
        RemoteSite("hospital_a", None, max_epsilon=1.0).setup(_view(tmp_path), "job1")


def test_a_site_takes_a_job_within_its_privacy_limit(tmp_path):
    # the job's own budget stops training early enough for the site's limit
    view = _view(tmp_path, privacy={"dp": {**DP, "noise_multiplier": 2.0, "max_epsilon": 5.0}}, model=GROUP)
    summary, _ = RemoteSite("hospital_a", None, max_epsilon=5.0).setup(view, "job1")
    assert summary["name"] == "hospital_a"


def test_what_a_site_tells_the_server_names_no_folder_of_its_own(tmp_path):
    """A failure's text reaches the server with the site's folders replaced by
    <site-local> (a file's own name is kept); the site's log keeps the full text."""
    import numpy as np
    from PIL import Image

    from medfed.core import codec
    from medfed.models import get_params

    data = tmp_path / "secret-ward" / "scans"
    for sub in ("img", "msk"):
        (data / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(data / "img" / f"c{i}.png")
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(data / "msk" / f"c{i}.png")
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump({"data": {"source": "pairs", "mask_values": [0, 255], "cache": "none",
                                             "loader": {"workers": 0},
                                             "sites": [{"name": "hospital_a", "images": str(data / "img"),
                                                        "masks": str(data / "msk")}]}}))
    site = RemoteSite("hospital_a", path)
    site.setup(_pairs_job(tmp_path), "job1")
    for i in range(10):  # damaged after the site indexed them
        (data / "img" / f"c{i}.png").write_bytes(b"not a png")
    blob = codec.encode_model(get_params(site.app.model), {})
    kind, text = site.answer({"kind": "evaluate", "round": 1, "splits": ["test"], "arm": "federated"}, blob)
    told = text.decode()
    assert kind == "error" and "cannot be read as an image" in told, told
    assert str(tmp_path) not in told and "secret-ward" not in told and "<site-local>" in told and ".png" in told
    assert site.redact(f"'{data / 'img' / 'c3.png'}' and '{path}'") == "'<site-local>/c3.png' and '<site-local>/site.yaml'"
