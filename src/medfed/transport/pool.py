"""Process-pool transport: sites train in parallel worker processes on this machine.

Each worker process serves a fixed subset of sites (site i goes to worker i mod W), so a
site's algorithm state stays in one process for the whole run. Workers are started with
``spawn`` (safe with torch's thread pools), build their sites' data themselves from the
job (data never crosses the process boundary) and exchange parameters as safetensors
bytes through the codec. Every wait is bounded by ``timeout``. A round's updates past the
memory budget are written to disk as they arrive (transport/spool.py).
"""

from __future__ import annotations

import json
import multiprocessing as mp
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from medfed.config import Job
from medfed.core import codec
from medfed.core.errors import CodecError
from medfed.core.types import Arm, EvalRequest, EvalResult, FitRequest, Message, SiteFailure, Split, Update
from medfed.transport.base import Transport, describe_exception
from medfed.transport.spool import Spool

# --------------------------------------------------------------------------- worker side

_APPS: dict[str, Any] = {}


def _init_worker(job_json: str, sites: list[str], pooled: str | None, threads: int, state_dir: str | None) -> None:
    from medfed.data.sites import build_sites
    from medfed.site.app import build_site_apps
    from medfed.site.device import resolve_device, set_threads

    set_threads(threads)
    job = Job.model_validate(json.loads(job_json))
    all_sites = build_sites(job)
    mine = [s for s in all_sites if s.name in sites]
    # a worker that replaces one that died takes its sites' algorithm state up from their files
    _APPS.update(build_site_apps(job, mine, resolve_device(job.device),
                                 state_dir=Path(state_dir) if state_dir is not None else None))
    if pooled is not None:
        from medfed.site.app import SiteApp, pooled_site_data

        training = [s for s in all_sites if s.name not in job.held_out]
        _APPS[pooled] = SiteApp(pooled_site_data(training, pooled), job, resolve_device(job.device))


def _worker_fit(blob: bytes) -> tuple[str, bytes | str]:
    try:
        req = codec.decode_fit_request(blob)
        update = _APPS[req.site].fit(req.params, req.plan)
        return "ok", codec.encode_update(update)
    except Exception as e:
        return "error", describe_exception(e)


def _worker_evaluate(site: str, params_blob: bytes, splits: list[str], arm: str) -> tuple[str, bytes | str]:
    try:
        results = _APPS[site].evaluate(codec.decode_params(params_blob), tuple(Split(s) for s in splits), Arm(arm))
        return "ok", codec.encode_eval_results(results)
    except Exception as e:
        return "error", describe_exception(e)


def _worker_exchange(site: str, topic: str, rnd: int, body_json: str) -> tuple[str, str]:
    try:
        return "ok", json.dumps(_APPS[site].exchange(topic, rnd, json.loads(body_json)))
    except Exception as e:
        return "error", describe_exception(e)


# --------------------------------------------------------------------------- server side


class PoolTransport(Transport):
    """``workers`` processes (default: one per site, at most the thread count)."""

    def __init__(self, job: Job, workers: int | None = None, pooled: str | None = None, state_dir: Path | None = None):
        names = list(job.site_names)
        n = workers or job.workers or min(len(names), job.num_threads)
        n = max(1, min(n, len(names)))
        self._assign = {name: i % n for i, name in enumerate(names)}
        if pooled is not None:
            self._assign[pooled] = 0
        self._job_json = json.dumps(job.model_dump(mode="json"))
        self._threads = max(1, job.num_threads // n)
        self._pooled = pooled
        self._executors: list[ProcessPoolExecutor | None] = [None] * n
        self._state_dir = str(state_dir) if state_dir is not None else None

    def _executor(self, i: int) -> ProcessPoolExecutor:
        ex = self._executors[i]
        if ex is None:
            sites = [s for s, w in self._assign.items() if w == i and s != self._pooled]
            pooled = self._pooled if self._assign.get(self._pooled) == i else None
            ex = ProcessPoolExecutor(
                max_workers=1,
                mp_context=mp.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self._job_json, sites, pooled, self._threads, self._state_dir),
            )
            self._executors[i] = ex
        return ex

    def _run(self, sites: Sequence[str], submit: Callable[[ProcessPoolExecutor, int], Future], timeout: float,
             take: Callable[[Any], Any] = lambda payload: payload) -> list[Any]:
        """``submit(executor, k)`` for each site k, all answered (or failed) by one deadline
        ``timeout`` seconds away; in request order. ``take`` turns each answer's payload into
        what is returned as soon as that answer arrives (updates past the memory budget go
        to disk then: transport/spool.py)."""
        out: list[Any] = [None] * len(sites)
        running: dict[Future, int] = {}
        for k, site in enumerate(sites):
            if site in self._assign:
                running[submit(self._executor(self._assign[site]), k)] = k
            else:
                out[k] = SiteFailure(site, "unknown site")
        try:  # each answer taken as it arrives (and let go of), until the deadline
            for f in as_completed(list(running), timeout=timeout):
                k = running.pop(f)
                out[k] = self._answer(sites[k], f, take)
        except TimeoutError:  # the ones still running are failures, below
            pass
        for f, k in running.items():
            f.cancel()
            self._kill(self._assign[sites[k]])  # a hung worker must not block later rounds
            out[k] = SiteFailure(sites[k], f"no answer within round_timeout={timeout:g}s")
        return out

    def _answer(self, site: str, f: Future, take: Callable[[Any], Any]) -> Any:
        """A finished task's payload through ``take``, or a SiteFailure saying why there is none."""
        exc = f.exception()
        if exc is not None:
            if isinstance(exc, BrokenProcessPool):  # a worker died: start afresh next time
                self._executors[self._assign[site]] = None
            return SiteFailure(site, f"worker process failed: {describe_exception(exc)}")
        status, payload = f.result()
        if status == "error":
            return SiteFailure(site, payload)
        try:
            return take(payload)
        except CodecError as e:
            return SiteFailure(site, f"its answer could not be read: {e}")

    def fit(self, requests: Sequence[FitRequest], timeout: float) -> list[Update | SiteFailure]:
        blobs = [codec.encode_fit_request(r) for r in requests]
        spool = Spool()
        return self._run([r.site for r in requests], lambda ex, k: ex.submit(_worker_fit, blobs[k]), timeout,
                         spool.blob)

    def evaluate(
        self, requests: Sequence[EvalRequest], timeout: float
    ) -> list[list[EvalResult] | SiteFailure]:
        blobs = [codec.encode_params(r.params) for r in requests]
        raw = self._run(
            [r.site for r in requests],
            lambda ex, k: ex.submit(
                _worker_evaluate, requests[k].site, blobs[k], [s.value for s in requests[k].splits], requests[k].arm.value
            ),
            timeout,
        )
        out: list[list[EvalResult] | SiteFailure] = []
        for req, r in zip(requests, raw):
            if isinstance(r, SiteFailure):
                out.append(r)
                continue
            out.append(codec.decode_eval_results(req.site, r))
        return out

    def exchange(self, messages: Sequence[Message], timeout: float) -> list[dict | SiteFailure]:
        bodies = [json.dumps(m.body) for m in messages]
        raw = self._run(
            [m.site for m in messages],
            lambda ex, k: ex.submit(_worker_exchange, messages[k].site, messages[k].topic, messages[k].round, bodies[k]),
            timeout,
        )
        return [r if isinstance(r, SiteFailure) else json.loads(r) for r in raw]

    def _kill(self, i: int, grace: float = 5.0) -> None:
        """Stop worker ``i`` without waiting on it for more than ``grace`` seconds."""
        ex = self._executors[i]
        if ex is None:
            return
        self._executors[i] = None
        procs = list(getattr(ex, "_processes", {}).values())  # no public handle in 3.11
        ex.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            p.join(timeout=grace)
            if p.is_alive():
                p.terminate()
                p.join(timeout=grace)

    def close(self) -> None:
        for i in range(len(self._executors)):
            self._kill(i)
