"""Split learning's per-batch exchange over the deployment's service: the ``Split`` method.

A site's turn of split learning (``topology: {kind: split}``, server/split.py) is a fit
task whose payload is the site's parts of the network. While the site trains them it opens
one ``Split`` call (bidirectional streaming) for that task, naming it in a first header
``{"site", "job_id", "task_id"}``, and then, batch by batch:

    site -> {"op": "forward",  "size": n} + n bytes   activations at the cut (B, ...)
    server <- {"op": "output", "size": n} + n bytes   the middle's output for them
    site -> {"op": "backward", "size": n} + n bytes   gradient of the loss at that output
    server <- {"op": "gradient", "size": n} + n bytes gradient at the cut (the server stepped)

Without the U (``topology.u_shaped: false``) the server holds the loss, and per batch:

    site -> {"op": "forward",  "size": n} + n bytes   activations at the cut (B, ...)
    site -> {"op": "labels",   "size": n} + n bytes   the batch's labels (B, ...)
    server <- {"op": "gradient", "size": n} + n bytes gradient at the cut (the server stepped)

Each tensor travels as a safetensors file holding one tensor named by its op (never
pickle), in chunks of at most ``wire.CHUNK`` bytes. The site closes its side when its turn
is done, then submits its trained parts as the task's answer (checked by intake.py like any
update). A hospital thus only dials out: the server answers, never calls.

What the server accepts (:class:`Seat`, :func:`serve_turn`), beyond what the hub checks of
every call (the certificate, revocation, the header naming the site and this job):

* only a site in its turn: the header names an open fit task of that site for which the
  round loop opened a seat, and one call per seat;
* activations of the cut's shape for one example (known from the network and the images'
  shape), float32, at most ``train.batch_size`` examples, finite; a gradient of exactly the
  shape of the output it answers; a declared size above what that shape needs is refused
  before any of it is read;
* without the U, labels right after their activations, never a gradient; labels of the
  task's dtype and of one example's target shape per example sent (tasks/targets.py), finite,
  class indices within ``task.num_classes`` (multi-label values within [0, 1]); with the U
  no labels;
* every wait bounded: ``TURN_WAIT`` s for the site's next message, the call cut when its
  task closes (the round timeout).

One audit row per turn (kind ``split``): its status, the bytes each way and its seconds.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import grpc
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from medfed.core.errors import CodecError
from medfed.tasks.targets import TargetSpec
from medfed.transport.grpc import wire
from medfed.transport.grpc.guard import Call, Refused
from medfed.transport.grpc.tasks import Task, TaskKind

FORWARD, OUTPUT, BACKWARD, GRADIENT = "forward", "output", "backward", "gradient"
LABELS = "labels"  # without the U: a batch's labels, after its activations
SLACK = 1024  # bytes: a one-tensor safetensors file's header, besides the values
TURN_WAIT = 120.0  # s the server waits for a site's next message in its turn (its batch's front and back)
MAX_FRAME_HEADER = 256  # bytes: {"op", "size"}
DTYPE = torch.float32  # what crosses the cut (split learning runs in float32)


class Middle(Protocol):
    """The server's end of a turn (server/split.py's ``MiddleSession``)."""

    def forward(self, activations: torch.Tensor) -> torch.Tensor: ...

    def backward(self, gradient: torch.Tensor) -> torch.Tensor: ...

    def step(self, activations: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...


# ---------------------------------------------------------------------------- frames


def encode_tensor(op: str, t: torch.Tensor) -> bytes:
    """``t`` as a safetensors file holding one tensor named ``op``."""
    return save_tensors({op: t.detach().to("cpu").contiguous()})


def frames(op: str, blob: bytes) -> Iterator[bytes]:
    """The messages of one tensor: its header, then its bytes in chunks."""
    yield wire.encode_header({"op": op, "size": len(blob)})
    yield from wire.chunks(blob)


def frame_header(data: object, what: str) -> tuple[str, int]:
    """(op, size) of a frame's first message, or CodecError."""
    if not isinstance(data, (bytes, bytearray)) or len(data) > MAX_FRAME_HEADER:
        raise CodecError(f"{what}: a frame header must be at most {MAX_FRAME_HEADER} bytes of JSON")
    hdr = wire.decode_json_object(bytes(data), what)
    op, size = hdr.get("op"), hdr.get("size")
    if not isinstance(op, str) or isinstance(size, bool) or not isinstance(size, int):
        raise CodecError(f"{what}: frame header needs a string 'op' and an integer 'size', got {hdr!r}"[:300])
    return op, size


def read_body(messages: Iterator[object], size: int, limit: int, what: str) -> bytes:
    """The ``size`` bytes of a frame, or CodecError when ``size`` is over ``limit`` (before
    any is read), a message is not bytes, or more or fewer arrive."""
    if not 0 < size <= limit:
        raise CodecError(f"{what}: declares {size} bytes, the most allowed here is {limit}")
    buf, n = bytearray(size), 0
    while n < size:
        m = next(messages, None)
        if m is None:
            raise CodecError(f"{what}: truncated, {n} of {size} bytes")
        if not isinstance(m, (bytes, bytearray)) or n + len(m) > size:
            raise CodecError(f"{what}: a chunk that is not bytes or runs past the declared {size} bytes")
        buf[n : n + len(m)] = m
        n += len(m)
    return bytes(buf)


def decode_tensor(blob: bytes, op: str, what: str) -> torch.Tensor:
    """The one tensor named ``op`` of a safetensors file, or CodecError."""
    try:
        tensors = load_tensors(blob)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CodecError(f"{what}: not a safetensors file ({str(e)[:200]})") from None
    if list(tensors) != [op]:
        raise CodecError(f"{what}: must hold one tensor named '{op}', holds {sorted(tensors)[:3]}")
    return tensors[op]


def tensor_limit(shape: tuple[int, ...], dtype: torch.dtype = DTYPE) -> int:
    """The most bytes a frame holding a tensor of ``shape`` may declare."""
    return math.prod(shape) * dtype.itemsize + SLACK


# ---------------------------------------------------------------------------- the server's side


@dataclass(eq=False)
class Seat:
    """The server's end of one site's turn, opened by the round loop before it hands the
    site its fit task and closed when the task is settled. ``shape``: the activations of
    one example at the cut; ``max_batch``: the most examples a batch may have;
    ``targets``: one example's labels without the U (None: U-shaped, no labels taken)."""

    site: str
    arm: str
    round: int
    middle: Middle
    shape: tuple[int, ...]
    max_batch: int
    targets: TargetSpec | None = None
    taken: bool = False  # a site's call has it (one call per turn)
    closed: bool = False
    sent: int = 0  # tensor bytes to the site (outputs, gradients at the cut)
    received: int = 0  # tensor bytes from the site (activations, gradients at the output)
    wire_sent: int = 0  # bytes of the frames, headers included
    wire_received: int = 0
    batches: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)  # one op at a time; closing waits for it


class Seats:
    """The seats of the turns in progress, by (site, arm, round)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[tuple[str, str, int], Seat] = {}

    def open(self, seat: Seat) -> None:
        with self._lock:
            self._open[(seat.site, seat.arm, seat.round)] = seat

    def close(self, seat: Seat) -> None:
        """End ``seat``: waits for an op in progress; the call, if still open, is refused at
        its next message."""
        with self._lock:
            self._open.pop((seat.site, seat.arm, seat.round), None)
        with seat.lock:
            seat.closed = True

    def take(self, task: Task) -> Seat:
        """The seat of ``task`` (an open task of the calling site, see TaskBoard.task_for),
        or Refused: a task that is no split turn, or a turn taken already."""
        where = (task.arm, task.round, task.kind.value)
        with self._lock:
            seat = self._open.get((task.site, task.arm, task.round)) if task.kind is TaskKind.FIT else None
            if seat is None:
                raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                              f"no split turn of site '{task.site}' is open for task {task.id} (round {task.round})",
                              task=where)
            if seat.taken:
                raise Refused(grpc.StatusCode.ALREADY_EXISTS,
                              f"the split turn of site '{task.site}' in round {task.round} has a call already",
                              task=where)
            seat.taken = True
        return seat


def serve_turn(seat: Seat, call: Call, messages: Iterator[object]) -> Iterator[bytes]:
    """Answer a site's frames from ``seat`` until the site closes its side; Refused on the
    first frame that breaks a rule (see the module docstring). ``call``'s bound on the
    site is set while the server waits for it."""
    it = iter(messages)
    expected_gradient: tuple[int, ...] | None = None  # the shape of the last output sent
    pending: torch.Tensor | None = None  # without the U: the activations waiting for their labels
    pending_wire = 0  # the bytes of their frame
    where = (seat.arm, seat.round, "split")
    while True:
        call.expect(TURN_WAIT, f"no message for {TURN_WAIT:g} s in a split turn")
        try:
            first = next(it, None)
        except grpc.RpcError:
            if call.cut is None:
                raise
            first = None
        if first is None:
            if call.cut is not None:
                raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED, f"cut off: {call.cut}", task=where)
            return  # the site's turn is over
        try:
            op, size = frame_header(first, "split frame")
            limit = _limit(op, seat, expected_gradient, pending)
            call.expect(TURN_WAIT, f"no message for {TURN_WAIT:g} s in a split turn")  # the body: a bound of its own
            blob = read_body(it, size, limit, f"split {op}")
            call.hold()  # the server computes: its time is not the site's
            t = decode_tensor(blob, op, f"split {op}")
            _check(t, op, seat, expected_gradient, pending)
        except CodecError as e:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"split turn: {e}", task=where) from None
        except grpc.RpcError:  # the stream broke in the middle of a tensor
            if call.cut is None:
                raise
            raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED, f"cut off: {call.cut}", task=where) from None
        if op == FORWARD and seat.targets is not None:  # without the U: the labels come next
            pending, pending_wire = t, len(first) + size
            continue
        with seat.lock:
            if seat.closed:
                raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED,
                              f"the split turn of round {seat.round} is over (its task closed)", task=where)
            try:
                if op == LABELS:
                    assert pending is not None  # _limit refused labels without activations
                    reply = seat.middle.step(pending, t)
                else:
                    reply = seat.middle.forward(t) if op == FORWARD else seat.middle.backward(t)
            except Exception as e:  # the site is told, the round loop skips its turn
                raise Refused(grpc.StatusCode.INTERNAL, f"split turn: the server's part failed on the {op}: "
                              f"{type(e).__name__}: {str(e)[:300]}", task=where) from None
        if op == LABELS and pending is not None:  # the batch's activations, counted once it is served
            seat.received += pending.numel() * pending.element_size()
            seat.wire_received += pending_wire
            seat.batches += 1
        seat.received += t.numel() * t.element_size()
        seat.wire_received += len(first) + size
        seat.batches += op == FORWARD
        expected_gradient = tuple(reply.shape) if op == FORWARD else None
        pending = None
        out_op = OUTPUT if op == FORWARD else GRADIENT
        blob = encode_tensor(out_op, reply)
        seat.sent += reply.numel() * reply.element_size()
        for m in frames(out_op, blob):
            call.expect(TURN_WAIT, f"did not take a message for {TURN_WAIT:g} s in a split turn")
            seat.wire_sent += len(m)
            yield m


def _limit(op: str, seat: Seat, expected_gradient: tuple[int, ...] | None, pending: torch.Tensor | None) -> int:
    """The most bytes the frame of ``op`` may declare here, or CodecError: an op out of turn."""
    if op == FORWARD:
        if pending is not None:
            raise CodecError("activations arrived before the labels of the last batch")
        return tensor_limit((seat.max_batch, *seat.shape))
    if op == BACKWARD:
        if seat.targets is not None:
            raise CodecError("a gradient arrived, but the server holds the loss here (topology.u_shaped: false): a "
                             "site sends 'forward' then 'labels'")
        if expected_gradient is None:
            raise CodecError("a gradient arrived before the activations of its batch")
        return tensor_limit(expected_gradient)
    if op == LABELS:
        if seat.targets is None:
            raise CodecError("labels arrived, but this split is U-shaped: the labels stay at the site")
        if pending is None:
            raise CodecError("labels arrived before the activations of their batch")
        return tensor_limit((int(pending.shape[0]), *seat.targets.shape), seat.targets.dtype)
    sends = "'forward' then 'labels'" if seat.targets is not None else "'forward' or 'backward'"
    raise CodecError(f"unknown op {op!r}: a site sends {sends}")


def _check(t: torch.Tensor, op: str, seat: Seat, expected_gradient: tuple[int, ...] | None,
           pending: torch.Tensor | None) -> None:
    if op == LABELS:
        assert seat.targets is not None and pending is not None  # _limit refused labels out of turn
        problem = seat.targets.problem(t, int(pending.shape[0]))
        if problem is not None:
            raise CodecError(problem)
        return
    if t.dtype != DTYPE:
        raise CodecError(f"{op}: {t.dtype}, expected {DTYPE}")
    if op == FORWARD:
        ok = t.dim() == len(seat.shape) + 1 and tuple(t.shape[1:]) == seat.shape and 1 <= t.shape[0] <= seat.max_batch
        if not ok:
            raise CodecError(f"activations of shape {tuple(t.shape)}, expected (B, {', '.join(map(str, seat.shape))}) "
                             f"with 1 <= B <= {seat.max_batch} (train.batch_size)")
    elif tuple(t.shape) != expected_gradient:
        raise CodecError(f"gradient of shape {tuple(t.shape)}, expected {expected_gradient} (the output sent)")
    if not bool(torch.isfinite(t).all()):
        raise CodecError(f"{op}: holds NaN or Inf")
