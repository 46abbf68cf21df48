"""The actor side of ``transport: ray`` (transport/ray.py): a Ray actor that serves some
sites of a job. It builds their data and site apps where it runs, from the job's JSON dump,
and answers each request with bytes in medfed's own formats (safetensors, JSON).

Nothing here imports Ray: the transport wraps :class:`SiteActor` with ``ray.remote`` when
it starts, and the class is equally usable in a test without Ray.
"""

from __future__ import annotations

import json
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medfed.config import Job
from medfed.core import codec
from medfed.core.types import Arm, Split
from medfed.transport.base import describe_exception

Answer = tuple[str, Any, str]  # ("ok" | "error", payload or cause, the answering actor's incarnation)


class SiteActor:
    """Serves some sites of a job inside a Ray worker (wrapped by ``ray.remote`` when the
    transport starts). Builds their data and site apps from the job's JSON dump; answers
    with ``(status, payload, incarnation)``, never raising for one site's failure."""

    def __init__(self, job_json: str, sites: list[str], pooled: str | None, threads: int):
        self.incarnation = uuid.uuid4().hex  # a restarted actor answers with a new one
        self.apps: dict[str, Any] = {}
        self.summaries: list[dict] = []
        self.error: str | None = None
        try:
            self._build(Job.model_validate(json.loads(job_json)), sites, pooled, threads)
        except Exception as e:  # reported by describe() and every call, not as a dead actor
            self.error = describe_exception(e)

    def _build(self, job: Job, sites: list[str], pooled: str | None, threads: int) -> None:
        from medfed.data.sites import describe_sites
        from medfed.site.app import SiteApp, build_site_apps, pooled_site_data
        from medfed.site.device import resolve_device, set_threads

        set_threads(threads)
        self.job, self.device = job, resolve_device(job.device)
        built = _build_sites(job, sites, everyone=pooled is not None)
        mine = [s for s in built if s.name in sites]
        self.data = {s.name: s for s in mine}
        self.apps.update(build_site_apps(job, mine, self.device))
        if pooled is not None:
            training = [s for s in built if s.name not in job.held_out]
            self.apps[pooled] = SiteApp(pooled_site_data(training, pooled), job, self.device)
        self.summaries = [s.model_dump(mode="json") for s in describe_sites(mine, job.task, job.held_out)]

    def _answer(self, work: Callable[[], Any]) -> Answer:
        if self.error is not None:
            return "error", f"its Ray actor could not build its data: {self.error}", self.incarnation
        try:
            return "ok", work(), self.incarnation
        except Exception as e:
            return "error", describe_exception(e), self.incarnation

    def describe(self) -> Answer:
        return self._answer(lambda: json.dumps(self.summaries))

    def fit(self, site: str, model: np.ndarray, plan_json: str) -> Answer:
        def work() -> np.ndarray:
            params, extras = codec.decode_model(memoryview(model))
            plan = codec.plan_from_dict(json.loads(plan_json), extras, "fit request")
            return as_array(codec.encode_update(self.apps[site].fit(params, plan)))

        return self._answer(work)

    def evaluate(self, site: str, params: np.ndarray, splits: list[str], arm: str) -> Answer:
        def work() -> bytes:
            results = self.apps[site].evaluate(codec.decode_params(memoryview(params)),
                                               tuple(Split(s) for s in splits), Arm(arm))
            return codec.encode_eval_results(results)

        return self._answer(work)

    def exchange(self, site: str, topic: str, rnd: int, body_json: str) -> Answer:
        return self._answer(lambda: json.dumps(self.apps[site].exchange(topic, rnd, json.loads(body_json))))

    def predictions(self, site: str, params: np.ndarray, count: int) -> Answer:
        """The predicted masks of ``params`` on the first ``count`` test examples of
        ``site``, as the files :func:`~medfed.tracking.predictions.save_predictions`
        writes: {path under the predictions folder: bytes}."""
        def work() -> dict[str, bytes]:
            from medfed.tasks import build_task
            from medfed.tracking.predictions import save_predictions

            app = self.apps[site]
            app.model.load_state_dict(codec.decode_params(memoryview(params)), strict=True)
            with tempfile.TemporaryDirectory() as tmp:
                files = save_predictions(app.model, [self.data[site]], build_task(self.job), Path(tmp), count,
                                         self.device)
                for extra in Path(tmp, site).glob("*.nii.gz"):  # 3D: the label volumes beside the pictures
                    files.append(extra)
                return {p.relative_to(tmp).as_posix(): p.read_bytes() for p in files}

        return self._answer(work)


def _build_sites(job: Job, names: list[str], everyone: bool) -> list:
    """The data of sites ``names`` (all sites with ``everyone``, for the pooled pseudo-site).
    Sites listed one by one with their files are read alone, with their place in the job's
    list (which seeds their draws); other sources (synthetic, a partition) build all."""
    from medfed.config import FileSite
    from medfed.data.reading import default_cache_root
    from medfed.data.sites import build_sites

    listed = getattr(job.data, "sites", None)
    if everyone or not (isinstance(listed, list) and all(isinstance(s, FileSite) for s in listed)):
        return build_sites(job)
    data = job.data.model_copy(update={"sites": [s for s in listed if s.name in names]})
    return build_sites(job.model_copy(update={"data": data}), order=job.site_names,
                       cache_root=default_cache_root(job))


def as_array(blob: bytearray | memoryview | bytes) -> np.ndarray:
    """A payload as a byte array: Ray stores it as it is (no copy into a pickle) and hands
    it on as a read-only array."""
    return np.frombuffer(blob, dtype=np.uint8)
