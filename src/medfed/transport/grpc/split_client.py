"""The site's end of split learning's per-batch exchange in a deployment: a
:class:`~medfed.site.split.SplitChannel` over one ``Split`` call to the server (the frames
and the server's checks: splitting.py). The site dials out, as for every other call.

A reply is bounded before it is read: the gradient at the cut must have the shape of the
activations sent; the middle's output at most ``OUTPUT_FACTOR`` times their size (or
``OUTPUT_FLOOR`` bytes) and the batch's number of examples. The call's deadline is the
round timeout: a turn cannot outlast its round. Without the U it is a
:class:`~medfed.site.split.LabelChannel` (``step``: the activations, then the labels, and
the gradient at the cut back).
"""

from __future__ import annotations

import queue
import time
import grpc
import torch

from medfed.core.errors import CodecError, NetworkError
from medfed.transport.grpc import wire
from medfed.transport.grpc.splitting import (
    BACKWARD,
    FORWARD,
    GRADIENT,
    LABELS,
    OUTPUT,
    decode_tensor,
    encode_tensor,
    frame_header,
    frames,
    read_body,
    tensor_limit,
)

OUTPUT_FACTOR = 16  # the middle's output may be at most this many times the activations' bytes...
OUTPUT_FLOOR = 64 << 20  # ...or this many bytes, whichever is more
_END = object()


class GrpcSplitChannel:
    """One site's turn over a ``Split`` call: ``forward`` and ``backward`` of
    :class:`~medfed.site.split.SplitChannel`. ``sent``/``received``: tensor bytes, as the
    in-process channel counts them; ``round_trips``: seconds from sending each tensor to
    having the reply. Use as a context manager: leaving it ends the call."""

    def __init__(self, call: grpc.StreamStreamMultiCallable, site: str, job_id: str, task_id: str, timeout: float):
        self._out: queue.Queue[object] = queue.Queue()
        self._out.put(wire.encode_header({"site": site, "job_id": job_id, "task_id": task_id}))
        self._call = call(iter(self._out.get, _END), timeout=timeout)
        self._replies = iter(self._call)
        self._cut_shape: tuple[int, ...] = ()  # of the activations sent last: the gradient at the cut has it
        self.sent = 0
        self.received = 0
        self.round_trips: list[float] = []

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        self._cut_shape = tuple(activations.shape)
        limit = max(OUTPUT_FLOOR, OUTPUT_FACTOR * tensor_limit(self._cut_shape))
        out = self._ask(FORWARD, activations, OUTPUT, limit)
        if out.dim() == 0 or out.shape[0] != activations.shape[0]:
            raise CodecError(f"split turn: the server's output has shape {tuple(out.shape)} for a batch of "
                             f"{activations.shape[0]}")
        return out

    def backward(self, gradient: torch.Tensor) -> torch.Tensor:
        below = self._ask(BACKWARD, gradient, GRADIENT, tensor_limit(self._cut_shape))
        if tuple(below.shape) != self._cut_shape:
            raise CodecError(f"split turn: the gradient at the cut has shape {tuple(below.shape)}, the activations "
                             f"sent {self._cut_shape}")
        return below

    def step(self, activations: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Without the U: the activations and the batch's labels up, the gradient at the cut
        back (the server computed the loss and stepped)."""
        self._cut_shape = tuple(activations.shape)
        self._send(FORWARD, activations)
        below = self._ask(LABELS, labels, GRADIENT, tensor_limit(self._cut_shape))
        if tuple(below.shape) != self._cut_shape:
            raise CodecError(f"split turn: the gradient at the cut has shape {tuple(below.shape)}, the activations "
                             f"sent {self._cut_shape}")
        return below

    def _send(self, op: str, t: torch.Tensor) -> None:
        for m in frames(op, encode_tensor(op, t)):
            self._out.put(m)
        self.sent += t.numel() * t.element_size()

    def _ask(self, op: str, t: torch.Tensor, want: str, limit: int) -> torch.Tensor:
        """Send ``t`` as ``op``; the server's reply ``want``, at most ``limit`` bytes."""
        t0 = time.perf_counter()
        self._send(op, t)
        try:
            got, size = frame_header(next(self._replies), "split reply")
            if got != want:
                raise CodecError(f"split reply: '{got}', expected '{want}'")
            reply = decode_tensor(read_body(self._replies, size, limit, f"split {want}"), want, f"split {want}")
        except StopIteration:
            raise NetworkError("split turn: the server ended the call before answering") from None
        except grpc.RpcError as e:
            raise NetworkError(f"split turn: {e.code().name}: {e.details()}") from None
        self.received += reply.numel() * reply.element_size()
        self.round_trips.append(time.perf_counter() - t0)
        return reply

    def __enter__(self) -> GrpcSplitChannel:
        return self

    def __exit__(self, kind: object, *exc: object) -> None:
        """Close the site's side and drain the server's (which ends when it has seen the
        close); after a failure, cancel the call."""
        self._out.put(_END)
        if kind is not None:
            self._call.cancel()
            return
        try:
            for _ in self._replies:
                pass
        except grpc.RpcError:
            pass  # the turn's outcome is told by the fit answer the site submits next
