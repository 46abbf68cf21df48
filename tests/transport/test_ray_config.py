"""transport: ray's settings and refusals: checked without Ray (none of these start it)."""

from __future__ import annotations

import importlib.util

import pytest
from torch import nn

import medfed
from medfed.config import parse_job
from medfed.core.errors import ConfigError
from medfed.transport.ray import check_ray
from ray_jobs import job_dict


def test_defaults_and_the_settings_a_cluster_takes(tmp_path):
    job = parse_job(job_dict(tmp_path, transport="ray"))
    assert job.ray is None  # the defaults: a local instance, 1 CPU and a quarter of a GPU per site
    job = parse_job(job_dict(tmp_path, transport="ray", ray={"address": "ray://head.lab:10001", "cpus_per_site": 2,
                                                             "gpus_per_site": 0.5, "max_concurrent": 8}))
    assert (job.ray.address, job.ray.threads, job.ray.gpus_per_site, job.ray.max_concurrent) == (
        "ray://head.lab:10001", 2, 0.5, 8)
    assert parse_job(job_dict(tmp_path, transport="ray", ray={"cpus_per_site": 0.5})).ray.threads == 1


@pytest.mark.parametrize("over, message", [
    ({"transport": "pool", "ray": {}}, "ray: settings of transport: ray, but the job's transport is 'pool'"),
    ({"transport": "ray", "ray": {"address": "head:6379"}}, "ray.address: must be null (a local Ray instance), 'auto'"),
    ({"transport": "ray", "ray": {"address": "ray://head:99999"}}, "ray.address: must be null"),
    ({"transport": "ray", "ray": {"gpus_per_site": 1.5}}, "ray.gpus_per_site: must be a share of one GPU"),
    ({"transport": "ray", "ray": {"cpus_per_site": 0}}, "ray.cpus_per_site"),
    ({"transport": "ray", "ray": {"max_concurrent": True}}, "ray.max_concurrent"),
])
def test_settings_that_cannot_work_are_refused_naming_the_field(tmp_path, over, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")):
        parse_job(job_dict(tmp_path, **over))


def test_an_unset_ray_section_leaves_the_job_hash_as_before(tmp_path):
    job = parse_job(job_dict(tmp_path, transport="ray"))
    assert job.job_hash() == job.model_copy(update={"ray": None}).job_hash()
    assert job.job_hash() != parse_job(job_dict(tmp_path, transport="ray", ray={"cpus_per_site": 2})).job_hash()
    assert "ray" in job.model_dump()  # it is written to job.yaml, as null


def test_without_ray_installed_validate_names_the_extra(tmp_path, monkeypatch):
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else found(name, *a))
    job = job_dict(tmp_path, transport="ray")
    with pytest.raises(ConfigError, match=r'transport: ray needs the optional package .ray.*pip install -e "\.\[ray\]"'):
        medfed.validate(job)
    check_ray(parse_job(job_dict(tmp_path)))  # other transports do not need it


def test_user_datasets_and_model_factories_cannot_go_to_ray_actors(tmp_path):
    job = job_dict(tmp_path, transport="ray")
    with pytest.raises(ConfigError, match="transport: ray runs each site in a Ray actor.*pickled.*transport: inprocess"):
        medfed.run(job, model=lambda: nn.Linear(1, 1), progress=False)
    assert not (tmp_path / "metrics.jsonl").exists()


class _FakeRay:
    """Fails ``fail`` starts with ``message``, then starts."""

    def __init__(self, fail: int, message: str):
        self.fail, self.message, self.inits, self.shutdowns = fail, message, 0, 0

    def init(self, **kwargs):
        self.inits += 1
        if self.inits <= self.fail:
            raise Exception(self.message)

    def shutdown(self):
        self.shutdowns += 1


def test_a_local_ray_that_does_not_come_up_in_time_is_tried_once_more(caplog):
    import logging

    import pytest

    from medfed.core.errors import ConfigError
    from medfed.transport.ray import _start_local

    slow = _FakeRay(1, "The current node timed out during startup. This could happen ...")
    with caplog.at_level(logging.WARNING, logger="medfed"):
        _start_local(slow, 2, {})
    assert slow.inits == 2 and slow.shutdowns == 1 and "trying once more" in caplog.text
    with pytest.raises(ConfigError, match="the local Ray instance did not start"):
        _start_local(_FakeRay(2, "timed out during startup"), 2, {})
    other = _FakeRay(1, "no space left on device")
    with pytest.raises(ConfigError, match="no space left on device"):
        _start_local(other, 2, {})
    assert other.inits == 1  # only the start-up timeout is tried again
