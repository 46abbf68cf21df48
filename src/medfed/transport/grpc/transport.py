"""The deployment :class:`Transport`: the round loop's requests become tasks that sites
poll for over gRPC (see hub.py); answers come back in request order."""

from __future__ import annotations

import gc
import json
import logging
import math
import secrets
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc

from medfed.core import codec
from medfed.core.buffers import BufferPool
from medfed.core.errors import NetworkError
from medfed.core.types import Arm, EvalRequest, EvalResult, FitRequest, Message, Params, SiteFailure, Spec, Update
from medfed.server.validate import full_spec
from medfed.transport.base import Transport
from medfed.transport.grpc import handshakes, wire
from medfed.transport.grpc.dispatch import Dispatcher
from medfed.transport.grpc.hub import Hub, Task
from medfed.transport.grpc.tasks import TaskKind

log = logging.getLogger("medfed")

EVAL_ANSWER_LIMIT = 1 << 20  # bytes: evaluation results are a few metrics per split
EXCHANGE_ANSWER_LIMIT = 16 << 20  # bytes: key shares for every other site of a round


_M_ARENA_MAX = -8  # glibc's mallopt parameter numbers
_M_MMAP_THRESHOLD = -3


def spec_bytes(spec: Spec) -> int:
    """The bytes of the tensors ``spec`` describes."""
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in spec.values())


def _libc():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return None


def tune_malloc(arenas: int = 2) -> None:
    """Cap glibc's per-thread memory arenas, and fix the size from which a block gets its
    own mapping at 4 MiB. The 1 MiB chunks that gRPC handler threads receive and send are
    then reused from the heap, while glibc's default threshold, which rises as large blocks
    are freed, would let larger ones pile up in the arenas: with an arena per thread, the
    server's memory grew with the number of sites although it held no more data."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_ARENA_MAX, arenas)
        libc.mallopt(_M_MMAP_THRESHOLD, 4 << 20)


def release_memory() -> None:
    """Return freed heap memory to the system (after each batch of a round)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _handler(method, kind: str):
    # every message is bytes: no (de)serializer, the hub parses headers itself. Every method
    # streams in on the server's side (sites call Join and Ready as unary, Poll as server
    # streaming: the same messages on the wire), so that the hub's handler runs as soon as a
    # call opens and bounds the wait for its first message (see guard.py)
    if kind == "stream_out":
        return grpc.stream_stream_rpc_method_handler(method)
    return grpc.stream_unary_rpc_method_handler(method)


def start_server(hub: Hub | Dispatcher, address: str, credentials: grpc.ServerCredentials, max_sites: int,
                 extra: Sequence[grpc.GenericRpcHandler] = ()) -> grpc.Server:
    """Serve ``hub`` on ``address`` (``host:port``) with mutual TLS only: there is no
    plain-text port. Enough threads for every site to hold a poll and a submission.
    ``hub``: one job's, or a queue server's :class:`~.dispatch.Dispatcher`; ``extra``: more
    services on the same port (a queue server's admin service, admin.py)."""
    handlers = grpc.method_handlers_generic_handler(
        wire.SERVICE,
        {
            "Join": _handler(hub.join, "stream_in"),
            "Ready": _handler(hub.ready, "stream_in"),
            "Poll": _handler(hub.poll, "stream_out"),
            "Submit": _handler(hub.submit, "stream_in"),
            "Split": _handler(hub.split, "stream_out"),
        },
    )
    tune_malloc()
    # the objects alive now (modules, the model...) stay for good: keep them out of the
    # garbage collector's full passes, which gRPC's many small objects set off often
    gc.freeze()
    workers = 2 * max_sites + 8
    server = grpc.server(
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="medfed-rpc"),
        handlers=[handlers, *extra],
        options=wire.SERVER_OPTIONS,
        maximum_concurrent_rpcs=4 * max_sites + 16,
    )
    try:
        port = server.add_secure_port(address, credentials)
    except RuntimeError as e:  # grpcio raises here when the port is taken (older versions return 0)
        raise NetworkError(f"cannot listen on {address}: {e}; is another server using the port?") from None
    if port == 0:
        raise NetworkError(f"cannot listen on {address}: is the port taken?")
    server.start()
    # refused TLS handshakes audited in the job's trail too, when the process watches them
    # (a queue server's dispatcher attaches each job's trail while the job runs)
    handshakes.attach(hub.audit if isinstance(hub, Hub) else None)
    return server


class GrpcTransport(Transport):
    """Sends each round's requests through ``hub`` to the sites that poll it."""

    def __init__(self, hub: Hub):
        self.hub = hub
        # blob, model id and the objects encoded (holding them keeps their ids from being
        # reused), for this batch and the last one: the model a round evaluates is the
        # next round's start
        self._batch: dict[tuple, tuple[bytes, str, Params, Params]] = {}
        self._last: dict[tuple, tuple[bytes, str, Params, Params]] = {}
        self._encoded = BufferPool(keep=2)  # this batch's model and the last one's

    def _model(self, params: Params, extras: Params) -> tuple[bytes, str]:
        """One encoded blob per distinct (params, extras): every site of a round gets the
        same bytes, encoded once, and a model evaluated then trained is encoded once."""
        key = (id(params), tuple((k, id(v)) for k, v in params.items()),
               tuple(sorted((k, id(v)) for k, v in extras.items())))
        if key not in self._batch:
            if key in self._last:
                self._batch[key] = self._last[key]
            else:
                blob = codec.encode_model(params, extras, self._encoded)
                # an opaque name for this blob, by which a site says it holds it (a content
                # hash would cost a pass over the model before the first byte is sent)
                self._batch[key] = (blob, secrets.token_hex(16), params, extras)
        return self._batch[key][:2]

    def _start_batch(self) -> None:
        self._batch = {}

    def _end_batch(self) -> None:
        self._last, self._batch = self._batch, {}

    def fit(self, requests: Sequence[FitRequest], timeout: float) -> list[Update | SiteFailure]:
        self._start_batch()
        tasks = []
        specs: dict[int, Spec] = {}  # the full spec of each distinct params, when a request gives none
        for req in requests:
            blob, model_id = self._model(req.params, req.plan.extras)
            spec = req.expect
            if spec is None:
                spec = specs.setdefault(id(req.params), full_spec(req.params))
            tasks.append(Task(
                site=req.site, kind=TaskKind.FIT, arm=req.plan.arm.value, round=req.plan.round,
                header={"plan": codec.plan_to_dict(req.plan)}, blob=blob, model_id=model_id,
                # the parameters (as large as the model or as the spec says an encoded update is:
                # a CKKS one is 8 times the model), extras as large as the model, and the header
                limit=len(blob) + max(len(blob), spec_bytes(spec)) + (1 << 20),
                spec=spec, encoding=req.encoding,
            ))
        self._end_batch()
        if self.hub.store is not None and requests:
            plan = requests[0].plan
            self.hub.store.round_started(plan.arm.value, plan.round, [r.site for r in requests], time.time())
        self.hub.run(tasks, timeout)
        release_memory()
        return [t.answer for t in tasks]

    def evaluate(self, requests: Sequence[EvalRequest], timeout: float) -> list[list[EvalResult] | SiteFailure]:
        self._start_batch()
        tasks = []
        for req in requests:
            blob, model_id = self._model(req.params, {})
            tasks.append(Task(
                site=req.site, kind=TaskKind.EVALUATE, arm=req.arm.value, round=req.round,
                header={"job_id": req.job_id, "splits": [s.value for s in req.splits]}, blob=blob, model_id=model_id,
                limit=EVAL_ANSWER_LIMIT, splits=tuple(req.splits),
            ))
        self._end_batch()
        self.hub.run(tasks, timeout)
        release_memory()
        return [t.answer for t in tasks]

    def exchange(self, messages: Sequence[Message], timeout: float) -> list[dict | SiteFailure]:
        tasks = []
        for m in messages:
            blob = json.dumps(m.body).encode()
            tasks.append(Task(
                site=m.site, kind=TaskKind.EXCHANGE, arm=Arm.FEDERATED.value, round=m.round,
                header={"job_id": m.job_id, "topic": m.topic}, blob=blob, model_id=secrets.token_hex(16),
                # an answer may be as large as the message asking it (a decrypted sum: smaller than its
                # ciphertexts), or as the message says (a relayed topology's sealed model)
                limit=max(EXCHANGE_ANSWER_LIMIT, len(blob), m.answer_limit or 0),
            ))
        self.hub.run(tasks, timeout)
        return [t.answer for t in tasks]
