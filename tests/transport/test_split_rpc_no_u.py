"""The Split call without the U (``topology.u_shaped: false``): a real mutual-TLS server on
127.0.0.1 holding the rest of the network and the loss; a site in its turn sends its
activations then its batch's labels and gets the gradient at the cut. Labels that do not
fit the task, or frames out of order, are refused naming the reason, and audited."""

from __future__ import annotations

import copy

import grpc
import pytest
import torch
from pydantic import TypeAdapter
from torch.nn import functional as F

from medfed.config.job import Job
from medfed.core.types import Arm
from medfed.server.split import MiddleSession
from medfed.tasks.targets import TargetSpec, target_spec
from medfed.transport.grpc import wire
from medfed.transport.grpc.splitting import Seat, encode_tensor
from transport.test_split_rpc import JOB_ID, SETTINGS, SHAPE, Consortium, _channel, _middle, _refused_turn, _split_rows

CLASSES = TargetSpec((), torch.int64, 3, False, "labels")  # 3 classes: the middle's 3 logits
MULTILABEL = TargetSpec((3,), torch.float32, None, True, "labels")


@pytest.fixture(scope="module")
def cons(tmp_path_factory):
    c = Consortium(tmp_path_factory.mktemp("split_no_u"))
    yield c
    c.close()


def _turn(cons, targets: TargetSpec | None, loss=F.cross_entropy):
    """A fit task of hospital_a with a seat that holds the loss (``targets``; None: a
    U-shaped seat): (the seat, the middle's reference copy, the task header, end)."""
    _, _, hdr, end_task = cons.turn("hospital_a", seat=False)
    middle = _middle()
    reference = copy.deepcopy(middle)
    session = MiddleSession(middle, SETTINGS, torch.device("cpu"), loss if targets is not None else None)
    seat = Seat("hospital_a", Arm.FEDERATED.value, cons.round, session, SHAPE, SETTINGS.batch_size, targets)
    cons.hub.seats.open(seat)

    def end():
        end_task()
        cons.hub.seats.close(seat)

    return seat, reference, hdr, end


def test_a_site_sends_activations_and_labels_and_gets_the_gradient_at_the_cut(cons):
    seat, reference, hdr, end = _turn(cons, CLASSES)
    x, y = torch.randn(3, *SHAPE), torch.tensor([0, 2, 1])
    with _channel(cons, "hospital_a", hdr["task_id"]) as channel:
        below = channel.step(x, y)
    end()
    xr = x.clone().requires_grad_()
    loss = F.cross_entropy(reference(xr), y)
    loss.backward()
    assert torch.allclose(below, xr.grad)
    step = reference[1].weight.detach() - 0.1 * reference[1].weight.grad
    assert torch.allclose(seat.middle.middle[1].weight, step)
    assert seat.middle.mean_loss == pytest.approx(float(loss))
    assert channel.sent == seat.received == 3 * 32 * 4 + 3 * 8 and channel.received == seat.sent == 3 * 32 * 4
    row = _split_rows(cons)[-1]
    assert (row["site"], row["round"], row["status"], seat.batches) == ("hospital_a", seat.round, "accepted", 1)


@pytest.mark.parametrize("targets, labels, reason", [
    (CLASSES, torch.tensor([0.0, 1.0]), "labels: torch.float32, expected torch.int64"),
    (CLASSES, torch.tensor([0, 1, 1]), "labels of shape (3,), expected (2,) (one per example of the activations"),
    (CLASSES, torch.tensor([[0], [1]]), "labels of shape (2, 1), expected (2,)"),
    (CLASSES, torch.tensor([0, 3]), "labels: class index 3 outside [0, 2] (task.num_classes: 3)"),
    (CLASSES, torch.tensor([-1, 0]), "labels: class index -1 outside [0, 2]"),
    (MULTILABEL, torch.tensor([[0.0, 1.0, float("nan")], [0.0, 0.0, 1.0]]), "labels: holds NaN or Inf"),
    (MULTILABEL, torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 1.0]]), "labels: values outside [0, 1]"),
], ids=["dtype", "batch", "shape", "class-too-high", "class-negative", "nan", "not-0-1"])
def test_labels_that_do_not_fit_the_task_are_refused(cons, targets, labels, reason):
    def bce(logits, y):
        return F.binary_cross_entropy_with_logits(logits, y)

    seat, _, hdr, end = _turn(cons, targets, F.cross_entropy if targets is CLASSES else bce)
    why = _refused_turn(cons, "hospital_a", hdr["task_id"], lambda c: c.step(torch.zeros(2, *SHAPE), labels))
    assert "INVALID_ARGUMENT" in why and reason in why
    end()
    row = _split_rows(cons)[-1]
    assert row["status"] == "refused" and reason in row["reason"]
    assert seat.middle.steps == 0  # the server computed nothing with them


def _raw(cons, hdr, *tensors: tuple[str, torch.Tensor]) -> grpc.RpcError:
    """Send frames of ``(op, tensor)`` on a Split call as hospital_a: the call's error."""
    conn = cons.ready("hospital_a")
    messages = [wire.encode_header({"site": "hospital_a", "job_id": JOB_ID, "task_id": hdr["task_id"]})]
    for op, t in tensors:
        blob = encode_tensor(op, t)
        messages += [wire.encode_header({"op": op, "size": len(blob)}), blob]
    with pytest.raises(grpc.RpcError) as e:
        list(conn.split(iter(messages), timeout=20))
    return e.value


@pytest.mark.parametrize("targets, frames, reason", [
    (None, [("forward", torch.zeros(1, *SHAPE)), ("labels", torch.zeros(1, dtype=torch.int64))],
     "labels arrived, but this split is U-shaped: the labels stay at the site"),
    (CLASSES, [("labels", torch.zeros(1, dtype=torch.int64))], "labels arrived before the activations of their batch"),
    (CLASSES, [("forward", torch.zeros(1, *SHAPE)), ("backward", torch.zeros(1, 3))],
     "the server holds the loss here (topology.u_shaped: false)"),
    (CLASSES, [("forward", torch.zeros(1, *SHAPE)), ("forward", torch.zeros(1, *SHAPE))],
     "activations arrived before the labels of the last batch"),
], ids=["labels-to-u-shaped", "labels-first", "gradient-sent", "no-labels"])
def test_frames_out_of_turn_are_refused(cons, targets, frames, reason):
    seat, _, hdr, end = _turn(cons, targets)
    err = _raw(cons, hdr, *frames)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and reason in err.details()
    end()


def test_an_oversized_labels_frame_is_refused_before_it_is_read(cons):
    _, _, hdr, end = _turn(cons, CLASSES)
    conn = cons.ready("hospital_a")
    blob = encode_tensor("forward", torch.zeros(2, *SHAPE))
    messages = [wire.encode_header({"site": "hospital_a", "job_id": JOB_ID, "task_id": hdr["task_id"]}),
                wire.encode_header({"op": "forward", "size": len(blob)}), blob,
                wire.encode_header({"op": "labels", "size": 1 << 20})]
    with pytest.raises(grpc.RpcError) as e:
        list(conn.split(iter(messages), timeout=20))
    assert f"declares {1 << 20} bytes, the most allowed here is {2 * 8 + 1024}" in e.value.details()
    end()


@pytest.mark.parametrize("task, shape, expected", [
    ({"kind": "classification", "labels": "binary"}, (1, 8, 8), ((), torch.int64, 2)),
    ({"kind": "classification", "labels": "multilabel", "num_classes": 4}, (3, 8, 8), ((4,), torch.float32, None)),
    ({"kind": "segmentation", "num_classes": 3}, (1, 6, 8, 8), ((6, 8, 8), torch.int64, 3)),
    ({"kind": "reconstruction"}, (1, 8, 8), ((1, 8, 8), torch.float32, None)),
])
def test_the_targets_of_each_task(task, shape, expected):
    cfg = TypeAdapter(Job.model_fields["task"].annotation).validate_python(task)
    spec = target_spec(cfg, shape)
    assert (spec.shape, spec.dtype, spec.classes) == expected
