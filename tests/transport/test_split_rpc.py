"""The Split call (split learning's per-batch exchange in a deployment): a real mutual-TLS
server on 127.0.0.1, a site in its turn computing against the server's middle, and sites
that break one rule each: the call is refused naming the reason, and audited."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from torch import nn

from deploy_kits import make_kits
from medfed.config import builtin_job_path, load_job
from medfed.core.errors import NetworkError
from medfed.core.types import Arm, FitRequest, RoundPlan, TrainSettings
from medfed.server.split import MiddleSession
from medfed.server.store import RunStore
from medfed.transport.grpc import wire
from medfed.transport.grpc.client import Connection
from medfed.transport.grpc.hub import Hub
from medfed.transport.grpc.split_client import GrpcSplitChannel
from medfed.transport.grpc.splitting import Seat, encode_tensor
from medfed.transport.grpc.transport import GrpcTransport, start_server
from medfed.transport.pki import load_kit

JOB_ID = "job-under-test"
SHAPE = (2, 4, 4)  # activations of one example at the cut
SETTINGS = TrainSettings(1, 4, 0.1, "sgd", 0.0, 0.0, 1)  # batch size 4


def _summary(site: str) -> dict:
    return {"name": site, "train": 10, "val": 2, "test": 2, "class_counts": {"train": [5, 5]}, "shape": [1, 8, 8]}


def _middle() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(32, 3))


class Consortium:
    def __init__(self, tmp: Path):
        self.kits, self.port = make_kits(tmp)
        job = load_job(builtin_job_path("quickstart")).model_copy(update={"output": tmp / "run"})
        self.store = RunStore(tmp / "state.sqlite")
        self.hub = Hub(job, JOB_ID, self.store)
        kit = load_kit(self.kits / "server", role="server")
        self.server = start_server(self.hub, f"127.0.0.1:{self.port}",
                                   wire.server_credentials(kit.ca_pem, kit.cert_pem, kit.key_pem), 3)
        self.transport = GrpcTransport(self.hub)
        self.pool = ThreadPoolExecutor(2)
        self.conns: dict[str, Connection] = {}
        self.round = 0

    def ready(self, site: str) -> Connection:
        if site not in self.conns:
            kit = load_kit(self.kits / site, role="site")
            conn = Connection(f"127.0.0.1:{self.port}", kit.ca_pem, kit.cert_pem, kit.key_pem, site)
            conn.join()
            conn.ready(JOB_ID, _summary(site))
            self.conns[site] = conn
        return self.conns[site]

    def turn(self, site: str, seat: bool = True):
        """A fit task of ``site`` taken by it, with (or without) its seat open:
        (the seat, the middle's reference copy, the task header, a function that ends the turn)."""
        self.round += 1
        conn = self.ready(site)
        middle = _middle()
        reference = copy.deepcopy(middle)
        s = Seat(site, Arm.FEDERATED.value, self.round, MiddleSession(middle, SETTINGS, torch.device("cpu")), SHAPE,
                 SETTINGS.batch_size)
        if seat:
            self.hub.seats.open(s)
        plan = RoundPlan(JOB_ID, self.round, Arm.FEDERATED, SETTINGS)
        self.hub.sessions.seen(site)  # it answered the last task a moment ago: connected
        fut = self.pool.submit(self.transport.fit, [FitRequest(site, {"w": torch.zeros(2)}, plan)], 20.0)
        hdr, _ = conn.poll(JOB_ID, 30.0)
        assert hdr["kind"] == "fit", fut.result()

        def end():
            conn.submit({"task_id": hdr["task_id"], "job_id": JOB_ID, "round": hdr["round"], "kind": "error",
                         "cause": "test over"}, b"", 60)
            fut.result(timeout=20)
            self.hub.seats.close(s)

        return s, reference, hdr, end

    def close(self):
        for c in self.conns.values():
            c.close()
        self.server.stop(0).wait(5)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.store.close()


@pytest.fixture(scope="module")
def cons(tmp_path_factory):
    c = Consortium(tmp_path_factory.mktemp("split"))
    yield c
    c.close()


def _channel(cons, site: str, task_id: str) -> GrpcSplitChannel:
    return GrpcSplitChannel(cons.ready(site).split, site, JOB_ID, task_id, 30.0)


def _split_rows(cons) -> list[dict]:
    return [r for r in cons.store.audit_rows() if r["kind"] == "split"]


def test_a_site_in_its_turn_gets_the_middles_output_and_gradient_and_the_turn_is_audited(cons):
    seat, reference, hdr, end = cons.turn("hospital_a")
    x = torch.randn(3, *SHAPE)
    with _channel(cons, "hospital_a", hdr["task_id"]) as channel:
        out = channel.forward(x)
        g = torch.randn_like(out)
        below = channel.backward(g)
    end()
    # what the server computed is its middle's forward and backward, then an SGD step
    xr = x.clone().requires_grad_()
    expected = reference(xr)
    expected.backward(g)
    assert torch.allclose(out, expected.detach()) and torch.allclose(below, xr.grad)
    step = reference[1].weight.detach() - 0.1 * reference[1].weight.grad
    assert torch.allclose(seat.middle.middle[1].weight, step)
    assert channel.sent == seat.received == (3 * 32 + 3 * 3) * 4 and channel.received == seat.sent
    row = _split_rows(cons)[-1]
    assert (row["site"], row["round"], row["status"]) == ("hospital_a", seat.round, "accepted")
    assert row["bytes_received"] == seat.wire_received > channel.sent


def _refused_turn(cons, site, task_id, send) -> str:
    """Open a Split call for ``task_id`` as ``site`` and run ``send(channel)``: the refusal's text."""
    with pytest.raises(NetworkError) as e:
        with _channel(cons, site, task_id) as channel:
            send(channel)
    return str(e.value)


def test_a_site_not_in_its_turn_is_refused(cons):
    _, _, hdr, end = cons.turn("hospital_a")
    cons.ready("hospital_b")
    why = _refused_turn(cons, "hospital_b", hdr["task_id"], lambda c: c.forward(torch.zeros(1, *SHAPE)))
    assert "PERMISSION_DENIED" in why and "was given to site 'hospital_a', not to 'hospital_b'" in why
    # the turn's owner is still served afterwards
    with _channel(cons, "hospital_a", hdr["task_id"]) as channel:
        channel.forward(torch.zeros(1, *SHAPE))
    why = _refused_turn(cons, "hospital_a", hdr["task_id"], lambda c: c.forward(torch.zeros(1, *SHAPE)))
    assert "ALREADY_EXISTS" in why and "has a call already" in why  # one call per turn
    end()
    _, _, hdr, end = cons.turn("hospital_a", seat=False)  # a fit task that is no split turn
    why = _refused_turn(cons, "hospital_a", hdr["task_id"], lambda c: c.forward(torch.zeros(1, *SHAPE)))
    assert "no split turn of site 'hospital_a' is open" in why
    end()


@pytest.mark.parametrize("activations, reason", [
    (torch.zeros(2, 3, 4, 4), "activations of shape (2, 3, 4, 4), expected (B, 2, 4, 4) with 1 <= B <= 4"),
    (torch.zeros(2, 2, 4, 4, dtype=torch.float64), "forward: torch.float64, expected torch.float32"),
    (torch.zeros(5, *SHAPE), "expected (B, 2, 4, 4) with 1 <= B <= 4 (train.batch_size)"),
    (torch.full((2, *SHAPE), float("nan")), "forward: holds NaN or Inf"),
])
def test_activations_that_do_not_fit_the_cut_are_refused(cons, activations, reason):
    _, _, hdr, end = cons.turn("hospital_a")
    why = _refused_turn(cons, "hospital_a", hdr["task_id"], lambda c: c.forward(activations))
    assert "INVALID_ARGUMENT" in why and reason in why
    end()
    row = _split_rows(cons)[-1]
    assert row["status"] == "refused" and reason in row["reason"]


def test_a_gradient_of_another_shape_than_the_output_is_refused(cons):
    _, _, hdr, end = cons.turn("hospital_a")

    def wrong_gradient(c):
        out = c.forward(torch.zeros(2, *SHAPE))
        c.backward(torch.zeros(out.shape[0], out.shape[1] + 1))

    why = _refused_turn(cons, "hospital_a", hdr["task_id"], wrong_gradient)
    assert "INVALID_ARGUMENT" in why and "(the output sent)" in why
    end()


def test_an_oversized_or_unframed_message_is_refused_before_it_is_read(cons):
    _, _, hdr, end = cons.turn("hospital_a")
    conn = cons.ready("hospital_a")
    start = wire.encode_header({"site": "hospital_a", "job_id": JOB_ID, "task_id": hdr["task_id"]})
    huge = wire.encode_header({"op": "forward", "size": 1 << 30})
    with pytest.raises(grpc.RpcError) as e:
        list(conn.split(iter([start, huge]), timeout=20))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"declares {1 << 30} bytes, the most allowed here is {4 * 32 * 4 + 1024}" in e.value.details()
    end()
    _, _, hdr, end = cons.turn("hospital_a")
    start = wire.encode_header({"site": "hospital_a", "job_id": JOB_ID, "task_id": hdr["task_id"]})
    blob = encode_tensor("backward", torch.zeros(1, 3))
    gradient_first = [wire.encode_header({"op": "backward", "size": len(blob)}), blob]
    with pytest.raises(grpc.RpcError) as e:
        list(conn.split(iter([start, *gradient_first]), timeout=20))
    assert "a gradient arrived before the activations of its batch" in e.value.details()
    end()


def test_a_header_naming_another_site_is_refused(cons):
    _, _, hdr, end = cons.turn("hospital_a")
    conn = cons.ready("hospital_a")
    start = wire.encode_header({"site": "hospital_b", "job_id": JOB_ID, "task_id": hdr["task_id"]})
    with pytest.raises(grpc.RpcError) as e:
        list(conn.split(iter([start]), timeout=20))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "certificate is 'hospital_a'" in e.value.details()
    end()


def test_a_turn_whose_seat_closed_is_refused_at_the_next_batch(cons):
    seat, _, hdr, end = cons.turn("hospital_a")

    def late(c):
        c.forward(torch.zeros(1, *SHAPE))
        cons.hub.seats.close(seat)  # the round loop is done with this turn (its task closed)
        c.forward(torch.zeros(1, *SHAPE))

    why = _refused_turn(cons, "hospital_a", hdr["task_id"], late)
    assert "DEADLINE_EXCEEDED" in why and f"the split turn of round {seat.round} is over" in why
    end()
    row = _split_rows(cons)[-1]
    assert row["status"] == "refused" and seat.batches == 1
