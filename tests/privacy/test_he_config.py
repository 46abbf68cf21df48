"""privacy.he in the job file: each field checked with its name, the combinations that
would weaken its promise refused at load time, and a deployment without the right key
files refused clearly."""

import copy

import pytest

from medfed.config import parse_job
from medfed.core.errors import ConfigError

SITES = [{"name": n, "n_train": 20, "n_test": 5} for n in ("a", "b", "c")]
BASE = {
    "name": "t", "output": "out", "rounds": 2,
    "data": {"source": "synthetic", "sites": SITES},
    "model": {"name": "small_cnn", "norm": "group"}, "task": {"labels": "binary"},
    "privacy": {"he": {}},
}
DP = {"noise_multiplier": 1.0, "clip": 1.0, "delta": 1e-5}


def _job(**over):
    raw = copy.deepcopy(BASE)
    raw.update(copy.deepcopy(over))
    return parse_job(raw, "job.yaml")


def _error(**over) -> str:
    with pytest.raises(ConfigError) as e:
        _job(**over)
    return str(e.value)


@pytest.mark.parametrize("over,expected", [
    ({"privacy": {"he": {"poly_modulus_degree": 4096}}},
     "privacy.he.poly_modulus_degree: must be one of 8192, 16384, 32768, got 4096"),
    ({"privacy": {"he": {"poly_modulus_degree": 8192.0}}}, "privacy.he.poly_modulus_degree"),
    ({"privacy": {"he": {"scale_bits": 50}}}, "privacy.he.scale_bits"),
    ({"privacy": {"he": {"scale_bits": 10}}}, "privacy.he.scale_bits"),
    ({"privacy": {"he": {"decryptors": 0}}}, "privacy.he.decryptors"),
    ({"privacy": {"he": {"decryptors": 4}}}, "privacy.he.decryptors: is 4 but only 3 sites train in a round"),
    ({"privacy": {"he": {"precision": 3}}}, "privacy.he.precision"),
    ({"privacy": {"he": {}, "secure_aggregation": {}}},
     "privacy.he: homomorphic encryption and privacy.secure_aggregation"),
    ({"privacy": {"he": {}}, "robust": {"rule": "median"}}, "robust: a robust rule needs each site's update"),
    ({"privacy": {"he": {}, "dp": DP}}, "privacy.dp.noise: central noise"),
    ({"privacy": {"he": {}}, "compression": {"method": "int8"}}, "compression: homomorphic encryption"),
    ({"privacy": {"he": {}}, "algorithm": {"name": "scaffold"}, "train": {"momentum": 0}},
     "algorithm.name: homomorphic aggregation"),
    ({"privacy": {"he": {}}, "algorithm": {"name": "fednova"}}, "algorithm.name: homomorphic aggregation"),
    ({"privacy": {"he": {}}, "sampling": {"count": 1}}, "privacy.he: needs at least 2 sites per round"),
    ({"privacy": {"he": {}}, "topology": {"kind": "cyclic"}}, "privacy.he"),
])
def test_bad_settings_name_the_field(over, expected):
    assert expected in _error(**over)


def test_valid_settings_load():
    job = _job(privacy={"he": {"poly_modulus_degree": 16384, "scale_bits": 40, "decryptors": 2},
                        "dp": {**DP, "noise": "local"}}, algorithm={"name": "fedadam"})
    assert job.privacy.he.decryptors == 2
    assert _job().privacy.he.poly_modulus_degree == 8192


def test_a_deployment_without_the_consortium_keys_is_refused_clearly():
    pytest.importorskip("tenseal", reason='homomorphic aggregation is an optional extra: pip install -e ".[he]"')
    from medfed.privacy.he.integration import server_combiner, site_client

    job = _job()
    with pytest.raises(ConfigError, match="medfed server --he-context he-public.ctx"):
        server_combiner(job, True, None, frozenset())
    with pytest.raises(ConfigError, match="medfed site --he-context he-secret.ctx"):
        site_client(job, "a", secure=True)


def test_a_deployed_server_without_the_public_context_refuses_he_before_any_site_joins(tmp_path):
    from medfed.server.deploy import serve_job

    with pytest.raises(ConfigError, match="--he-context he-public.ctx"):
        serve_job(_job(), kit=None)  # refused from the job alone, before the kit or the network is used
    pytest.importorskip("tenseal", reason='homomorphic aggregation is an optional extra: pip install -e ".[he]"')
    from medfed.privacy.he.ckks import write_keys

    secret, public, _ = write_keys(tmp_path / "keys", _job().privacy.he)
    with pytest.raises(ConfigError, match="must hold no secret key"):
        serve_job(_job(), kit=None, he_context=secret)  # the sites' file given to the server: refused
    with pytest.raises(ConfigError, match="no privacy.he section"):
        serve_job(_job(privacy={}), kit=None, he_context=public)
