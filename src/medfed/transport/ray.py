"""Ray transport: sites train in Ray actors, on this machine or across a cluster.

``transport: ray`` (the optional extra: ``pip install -e ".[ray]"``). The job's ``ray``
section (:class:`~medfed.config.RayConfig`) says where: a local Ray instance of
``threads`` CPUs started for the run (and stopped at its end), or a cluster joined by
``address`` (left running). As in the process pool, a fixed set of sites is served by one
actor for the whole run (site i by actor i mod A, the pooled pseudo-site by actor 0), so a
site's state kept between rounds (SCAFFOLD's control variate, Ditto's personal model,
error feedback, FedBN's layers) stays in its actor. Each actor asks Ray for
``cpus_per_site`` CPUs and, when the job runs on GPUs, ``gpus_per_site`` of one; A is as
many as the cluster holds, at most ``max_concurrent``.

What crosses the boundary, in both directions, is bytes in medfed's own formats, never an
object of ours: the job as its JSON dump; each distinct model of a call encoded once by
the codec (safetensors) and put once into Ray's object store as a read-only byte array,
shared by every actor that needs it; round plans and protocol messages as JSON; updates
as safetensors, evaluation results as JSON, parsed and checked on the way back. Ray itself
pickles what it carries, so the machines of a Ray cluster trust each other: Ray is for
simulation on a cluster one group runs; between hospitals, the trust boundary is the
gRPC deployment (docs/deployment.md).

Each actor (transport/ray_actor.py) builds its own sites' data from the job where it runs
(file paths resolve on the worker); this process reads none: it gets each site's summary
from its actor (:meth:`RayTransport.summaries`). Every wait is bounded by ``timeout``: a
site whose actor does not answer in time, or dies, is a :class:`SiteFailure` with the
cause. Ray restarts an actor whose process died; one that did not answer is stopped and a
new one started. Either builds its sites again, and the loss of their kept state is logged
when the new actor first answers.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from medfed.config import RAY_EXTRA, Job, RayConfig
from medfed.core import codec
from medfed.core.errors import ConfigError, DataError, MedfedError
from medfed.core.summary import SiteSummary
from medfed.core.types import EvalRequest, EvalResult, FitRequest, Message, Params, SiteFailure, Update
from medfed.transport.base import Transport, describe_exception
from medfed.transport.ray_actor import SiteActor, as_array
from medfed.transport.spool import Spool

log = logging.getLogger("medfed")

RETRY_PAUSE = 0.5  # seconds before a task whose actor was restarting is sent again (within the deadline)
_AGAIN = object()


def check_ray(job: Job) -> None:
    """Refuse ``transport: ray`` where Ray is not installed, naming the extra that installs
    it: ``medfed validate`` and the start of a run, before any data is read."""
    if job.transport == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError(
            f"transport: ray needs the optional package 'ray', which is not installed; install it with {RAY_EXTRA} "
            "in the medfed folder, or use transport: inprocess or pool"
        )


class RayTransport(Transport):
    """Sites in Ray actors (see the module docstring). Starts or joins Ray, then starts the
    actors; :meth:`summaries` waits for them to build their data."""

    def __init__(self, job: Job, pooled: str | None = None):
        check_ray(job)
        import ray

        cfg = job.ray or RayConfig()
        self._owned = False  # a Ray started here is stopped by close(); one joined or found is left
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                      "logging_level": logging.WARNING}
            if cfg.address is None:
                _start_local(ray, job.num_threads, kwargs)
            else:
                try:
                    ray.init(address=cfg.address, **kwargs)
                except Exception as e:
                    raise ConfigError(f"ray.address: cannot join the Ray cluster at '{cfg.address}' "
                                      f"({describe_exception(e)}); start it (ray start --head) or check the "
                                      "address") from None
            self._owned = cfg.address is None
        self._actors: list[Any] = []
        # stops the actors (and a Ray started here) on close(), or when the transport is dropped unclosed
        self._release = weakref.finalize(self, _release, self._actors, self._owned)
        try:
            gpus = self._gpus(job, cfg)
            names = list(job.site_names)
            n = max(1, min(len(names), self._capacity(cfg, gpus), cfg.max_concurrent or len(names)))
            self._assign = {name: i % n for i, name in enumerate(names)}
            if pooled is not None:
                self._assign[pooled] = 0
            self._limit = cfg.max_concurrent or n
            # a process that dies is restarted by Ray (max_restarts); one stopped for not answering, by _call
            actor = ray.remote(num_cpus=cfg.cpus_per_site, num_gpus=gpus, max_restarts=-1, max_task_retries=0)(SiteActor)
            job_json = json.dumps(job.model_dump(mode="json"))
            self._start = lambda i: actor.remote(
                job_json, [s for s, a in self._assign.items() if a == i and s != pooled], pooled if i == 0 else None,
                cfg.threads,
            )
            self._actors.extend(self._start(i) for i in range(n))
        except BaseException:
            self.close()
            raise
        self._incarnations: list[str | None] = [None] * n
        self._job = job
        log.info("transport ray: %d site actor(s) of %g CPU(s)%s each, on %s", n, cfg.cpus_per_site,
                 f" and {gpus:g} GPU" if gpus else "", "a local Ray instance" if self._owned else "the Ray cluster")

    @staticmethod
    def _gpus(job: Job, cfg: RayConfig) -> float:
        """The GPU share each actor asks for: ``gpus_per_site`` when the job runs on GPUs."""
        import ray

        found = ray.cluster_resources().get("GPU", 0.0)
        if job.device == "cuda" and (found <= 0 or cfg.gpus_per_site <= 0):
            why = "the Ray cluster has no GPU" if found <= 0 else "ray.gpus_per_site is 0"
            raise ConfigError(f"device: 'cuda', but {why}; use device: auto or cpu, or give the sites GPUs")
        return cfg.gpus_per_site if job.device != "cpu" and found > 0 else 0.0

    @staticmethod
    def _capacity(cfg: RayConfig, gpus: float) -> int:
        """How many actors the cluster's CPUs (and GPUs) hold at once: its total, not what is
        free this moment, so the same cluster always gets the same actors (on a cluster that
        others use, bound them with ``max_concurrent``)."""
        import ray

        total = ray.cluster_resources()
        cpus = total.get("CPU", 0.0)
        n = int(cpus / cfg.cpus_per_site + 1e-9)
        if gpus:
            n = min(n, int(total.get("GPU", 0.0) / gpus + 1e-9))
        if n < 1:
            raise ConfigError(
                f"ray.cpus_per_site: each site's actor asks for {cfg.cpus_per_site:g} CPU(s), but the Ray cluster has "
                f"{cpus:g}; lower cpus_per_site, or give the run more (threads, for a local instance)"
            )
        return n

    # ---------------------------------------------------------------- the sites' data

    def summaries(self, timeout: float) -> list[SiteSummary]:
        """Each site's summary, in the job's order, once every actor has built its data
        (within ``timeout`` seconds). Raises DataError with an actor's cause."""
        groups = [[s for s, a in self._assign.items() if a == i] for i in range(len(self._actors))]
        firsts = [g[0] for g in groups]
        found: dict[str, SiteSummary] = {}
        for group, answer in zip(groups, self._call(firsts, lambda a, k: a.describe.remote(), timeout)):
            if isinstance(answer, SiteFailure):
                raise DataError(f"transport ray: the actor of site(s) {group}: {answer.cause}")
            for row in json.loads(answer[1]):
                summary = SiteSummary.model_validate(row)
                found[summary.name] = summary
        missing = [s for s in self._job.site_names if s not in found]
        if missing:
            raise DataError(f"transport ray: no actor built the data of site(s) {missing}")
        return [found[s] for s in self._job.site_names]

    # ---------------------------------------------------------------- requests

    def fit(self, requests: Sequence[FitRequest], timeout: float) -> list[Update | SiteFailure]:
        models = _Shared(lambda r: codec.encode_model(r.params, r.plan.extras), lambda r: (id(r.params), id(r.plan.extras)))
        plans = [json.dumps(codec.plan_to_dict(r.plan)) for r in requests]
        spool = Spool()  # each update decoded as it arrives; past the memory budget, to disk
        return self._call([r.site for r in requests],
                          lambda a, k: a.fit.remote(requests[k].site, models.ref(requests[k]), plans[k]), timeout,
                          lambda site, payload: _decoded(site, lambda: spool.blob(memoryview(payload))))

    def evaluate(self, requests: Sequence[EvalRequest], timeout: float) -> list[list[EvalResult] | SiteFailure]:
        models = _Shared(lambda r: codec.encode_params(r.params), lambda r: id(r.params))
        raw = self._call(
            [r.site for r in requests],
            lambda a, k: a.evaluate.remote(requests[k].site, models.ref(requests[k]),
                                           [s.value for s in requests[k].splits], requests[k].arm.value),
            timeout,
        )
        return [r if isinstance(r, SiteFailure) else
                _decoded(req.site, lambda r=r, req=req: codec.decode_eval_results(req.site, r[1], req.splits))
                for req, r in zip(requests, raw)]

    def exchange(self, messages: Sequence[Message], timeout: float) -> list[dict | SiteFailure]:
        bodies = [json.dumps(m.body) for m in messages]
        raw = self._call(
            [m.site for m in messages],
            lambda a, k: a.exchange.remote(messages[k].site, messages[k].topic, messages[k].round, bodies[k]),
            timeout,
        )
        return [r if isinstance(r, SiteFailure) else json.loads(r[1]) for r in raw]

    def save_predictions(self, params: Params, folder: Path, count: int, timeout: float) -> None:
        """Write the predicted masks of ``params`` on each site's first ``count`` test
        examples to ``folder/<site>/``, drawn by the site's actor (the test images stay
        there). A site that fails is logged and left out."""
        sites = list(self._job.site_names)
        models = _Shared(lambda _: codec.encode_params(params), lambda _: 0)
        for site, r in zip(sites, self._call(sites, lambda a, k: a.predictions.remote(sites[k], models.ref(None), count),
                                             timeout)):
            if isinstance(r, SiteFailure):
                log.warning("site '%s': no predicted masks saved: %s", site, r.cause)
                continue
            for rel, blob in r[1].items():
                path = (folder / rel).resolve()
                if path.parent != (folder / site).resolve():  # a file of this site's folder, nowhere else
                    raise MedfedError(f"site '{site}': its actor returned a prediction file '{rel}' outside its folder")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(blob)

    # ---------------------------------------------------------------- the bounded wait

    def _call(self, sites: Sequence[str], submit: Callable[[Any, int], Any], timeout: float,
              take: Callable[[str, Any], Any] = lambda site, payload: (site, payload)) -> list[Any]:
        """``submit(actor, k)`` for each site k, at most ``max_concurrent`` in flight, all
        answered (or failed) by one deadline ``timeout`` seconds away; in request order.
        ``take(site, payload)`` turns each answer into what is returned as soon as it
        arrives (the default: the pair as it is)."""
        import ray

        deadline = time.monotonic() + timeout
        out: list[Any] = [None] * len(sites)
        queue: deque[int] = deque()
        for k, site in enumerate(sites):
            if site in self._assign:
                queue.append(k)
            else:
                out[k] = SiteFailure(site, "unknown site")
        running: dict[Any, int] = {}
        waiting: list[tuple[float, int]] = []  # (when, k): sent again once its restarting actor may be back
        while queue or running or waiting:
            now = time.monotonic()
            queue.extendleft(k for when, k in waiting if when <= now)
            waiting = [(when, k) for when, k in waiting if when > now]
            while queue and len(running) < self._limit:
                k = queue.popleft()
                running[submit(self._actors[self._assign[sites[k]]], k)] = k
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if not running:
                time.sleep(min(left, RETRY_PAUSE))
                continue
            done, _ = ray.wait(list(running), num_returns=1, timeout=min(left, RETRY_PAUSE) if waiting else left)
            for ref in done:
                k = running.pop(ref)
                answer = self._answer(sites[k], ref)
                if answer is _AGAIN:
                    waiting.append((time.monotonic() + RETRY_PAUSE, k))
                else:
                    out[k] = answer if isinstance(answer, SiteFailure) else take(*answer)
        for _, k in waiting:
            out[k] = SiteFailure(sites[k], f"its Ray actor was still restarting at round_timeout={timeout:g}s")
        stalled = {self._assign[sites[k]] for k in running.values()}
        for k in running.values():
            out[k] = SiteFailure(sites[k], f"no answer within round_timeout={timeout:g}s")
        for k in queue:
            out[k] = SiteFailure(sites[k], f"not started within round_timeout={timeout:g}s (at most {self._limit} site "
                                           "tasks run at once: ray.max_concurrent, or the actors the cluster holds)")
        for i in stalled:  # a hung actor must not block later rounds: stopped, and a new one started
            ray.kill(self._actors[i], no_restart=True)
            self._actors[i] = self._start(i)
        return out

    def _answer(self, site: str, ref: Any) -> tuple[str, Any] | SiteFailure | object:
        """The answer of a finished task; ``_AGAIN`` when its actor was restarting (send it
        again: a restarted actor has lost what the task would have changed anyway)."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError, RayError

        try:
            status, payload, incarnation = ray.get(ref, timeout=0)
        except ActorUnavailableError:
            return _AGAIN
        except RayActorError as e:  # Ray restarts it; its sites' kept state is gone
            return SiteFailure(site, f"its Ray actor died: {describe_exception(e)}")
        except (RayError, ValueError, TypeError) as e:
            return SiteFailure(site, f"Ray task failed: {describe_exception(e)}")
        self._seen(self._assign[site], str(incarnation))
        return SiteFailure(site, str(payload)) if status != "ok" else (site, payload)

    def _seen(self, i: int, incarnation: str) -> None:
        """Log the loss of the kept state of actor ``i``'s sites when a new actor answers."""
        before, self._incarnations[i] = self._incarnations[i], incarnation
        if before is not None and before != incarnation:
            sites = [s for s, a in self._assign.items() if a == i]
            log.warning(
                "transport ray: the actor of site(s) %s was restarted and built their data again; what they kept "
                "between rounds (an algorithm's site state such as control variates or a personal model, error "
                "feedback, local layers) was lost and starts afresh", sites,
            )

    def close(self) -> None:
        self._release()  # once; later calls do nothing


def _release(actors: list, owned: bool) -> None:
    """Stop ``actors`` and, when ``owned``, the Ray instance the transport started."""
    import ray

    for a in actors:
        try:
            ray.kill(a, no_restart=True)
        except Exception:  # already gone, or Ray already stopped: closing must not fail
            pass
    actors.clear()
    if owned and ray.is_initialized():
        ray.shutdown()


class _Shared:
    """Each distinct model of one call encoded once and put once into Ray's object store;
    requests that carry the same tensors share its reference."""

    def __init__(self, encode: Callable[[Any], Any], key: Callable[[Any], Any]):
        self._encode, self._key, self._refs = encode, key, {}

    def ref(self, request: Any) -> Any:
        import ray

        k = self._key(request)
        if k not in self._refs:
            self._refs[k] = ray.put(as_array(self._encode(request)))
        return self._refs[k]


def _decoded(site: str, decode: Callable[[], Any]) -> Any:
    """A site's answer parsed by the codec, or a SiteFailure naming what was malformed."""
    try:
        return decode()
    except MedfedError as e:
        return SiteFailure(site, describe_exception(e))


def _start_local(ray: Any, cpus: int, kwargs: dict[str, Any], attempts: int = 2) -> None:
    """Start a local Ray instance of ``cpus`` CPUs. Ray gives its raylet 30 s to register,
    which a loaded machine can pass: a start that times out is cleaned up and tried once
    more (logged) before the error reaches the run."""
    for attempt in range(1, attempts + 1):
        try:
            ray.init(num_cpus=cpus, **kwargs)
            return
        except Exception as e:  # Ray raises a bare Exception when its node does not come up in time
            ray.shutdown()
            if attempt == attempts or "timed out during startup" not in str(e):
                raise ConfigError(f"transport: ray: the local Ray instance did not start ({describe_exception(e)})") from None
            log.warning("transport: ray: the local Ray instance did not start in time (%s); trying once more",
                        describe_exception(e))
