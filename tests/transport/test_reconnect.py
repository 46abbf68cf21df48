"""A site reconnects on a bounded schedule, and accepts from the server only what it can
know to be sensible: the waits between its attempts (medfed's and gRPC's own) never pass
the cap, the first retry comes within a second, a model task larger than the site's own
model (twice, for the algorithm's extras) is refused before any buffer is set aside, and
``medfed site`` checks its data file and options before it connects. No wall clock here:
waits are recorded, not slept."""

from __future__ import annotations

import random
from pathlib import Path

import grpc
import pytest
import yaml
from typer.testing import CliRunner

from deploy_kits import make_kits
from medfed.cli import app
from medfed.config import builtin_job_path, load_job
from medfed.core import codec
from medfed.core.errors import CodecError
from medfed.server.admission import members as _members
from medfed.server.store import RunStore
from medfed.transport.grpc import client, wire
from medfed.transport.grpc.client import (
    EXCHANGE_LIMIT,
    RECONNECT_FIRST,
    RECONNECT_MAX,
    Backoff,
    ConnectionLost,
    channel_options,
    serve_tasks,
)
from medfed.transport.pki import load_kit

runner = CliRunner()


# ---------------------------------------------------------------- the schedule of waits


def test_the_default_backoff_retries_within_a_second_and_never_waits_longer_than_the_cap():
    backoff = Backoff(rng=random.Random(0))
    waits = [backoff.next() for _ in range(10_000)]  # hours of retries: no overflow, no growth
    assert waits[0] <= RECONNECT_FIRST <= 1.0
    assert max(waits) <= RECONNECT_MAX <= 2.0
    nominal = [backoff.nominal(n) for n in range(5)]
    assert nominal == [0.25, 0.5, 1.0, 1.0, 1.0]
    # jitter: each wait between 80 % and all of its nominal length, and not all alike
    assert all(0.8 * backoff.nominal(n) <= w <= backoff.nominal(n) for n, w in enumerate(waits))
    assert len({round(w, 6) for w in waits[2:]}) > 100


@pytest.mark.parametrize("cap", [0.05, 0.3, 2.5, 30.0])
def test_a_chosen_cap_bounds_every_wait(cap):
    backoff = Backoff(cap=cap, rng=random.Random(1))
    waits = [backoff.next() for _ in range(200)]
    assert max(waits) <= cap and waits[0] <= min(RECONNECT_FIRST, cap)
    assert min(waits[-50:]) >= 0.8 * cap  # it reaches the cap and stays there
    backoff.reset()
    assert backoff.next() <= min(RECONNECT_FIRST, cap)


@pytest.mark.parametrize("kwargs", [{"cap": 0}, {"cap": -1}, {"base": 0}, {"cap": float("nan")}, {"jitter": 1.0}])
def test_a_backoff_without_a_positive_cap_is_refused(kwargs):
    with pytest.raises(ValueError):
        Backoff(**kwargs)


def test_grpc_reconnects_on_the_same_bounded_schedule():
    opts = dict(channel_options())
    assert opts["grpc.initial_reconnect_backoff_ms"] == 250  # gRPC's default: 1 s
    assert opts["grpc.max_reconnect_backoff_ms"] == 1000  # gRPC's default: 120 s
    assert opts["grpc.min_reconnect_backoff_ms"] == 5000  # one attempt's time to connect; gRPC's default 20 s
    assert set(wire.CHANNEL_OPTIONS) <= set(channel_options())
    assert dict(channel_options(7.5))["grpc.max_reconnect_backoff_ms"] == 7500
    tiny = dict(channel_options(0.01))  # gRPC's floor is 100 ms
    assert tiny["grpc.max_reconnect_backoff_ms"] == tiny["grpc.initial_reconnect_backoff_ms"] == 100
    with pytest.raises(ValueError):
        channel_options(0)


def test_a_connection_uses_the_bounded_options(tmp_path):
    kits, port = make_kits(tmp_path)
    kit = load_kit(kits / "hospital_a", role="site")
    conn = client.Connection(f"127.0.0.1:{port}", kit.ca_pem, kit.cert_pem, kit.key_pem, "hospital_a",
                             reconnect_max=3.0)
    try:
        assert dict(conn.options)["grpc.max_reconnect_backoff_ms"] == 3000
        assert conn.reconnect_max == 3.0
    finally:
        conn.close()


# ---------------------------------------------------------------- serve_tasks while the server is away


class _Unavailable(grpc.RpcError):
    def __init__(self, code=grpc.StatusCode.UNAVAILABLE, details="failed to connect to all addresses"):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


class _AwayServer:
    """A connection to a server that is away for ``failures`` joins, then says the job is
    done. ``connects``: whether waiting on the channel ends early (it connected)."""

    site, target = "hospital_a", "server:1"

    def __init__(self, failures: int, connects: bool = False, reconnect_max: float = RECONNECT_MAX):
        self.failures, self.connects, self.reconnect_max = failures, connects, reconnect_max
        self.joins, self.waited = 0, []

    def join(self):
        self.joins += 1
        if self.joins <= self.failures:
            raise _Unavailable()
        return {"job_id": "j", "job": {}, "medfed_version": client.__version__}

    def ready(self, job_id, summary):
        pass

    def poll(self, job_id, round_timeout):
        return {"kind": "done"}, None

    def wait_connected(self, timeout):
        self.waited.append(timeout)
        return self.connects


@pytest.fixture
def slept(monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr(client.time, "sleep", waits.append)
    return waits


def _setup(job, job_id):
    return {}, 60.0


def test_a_site_retries_within_the_cap_however_long_the_server_is_away(slept):
    conn = _AwayServer(failures=40)
    serve_tasks(conn, _setup, lambda h, b: ("fit", b""))
    waits = slept + conn.waited
    assert len(waits) == 40 and conn.joins == 41
    assert max(waits) <= RECONNECT_MAX and max(conn.waited[:1] or slept[:1]) <= 1.0
    assert conn.waited, "a site that lost the server waits on the channel, to call again once it connects"
    # and it still stops after --give-up-after without contact
    with pytest.raises(ConnectionLost, match="no contact"):
        serve_tasks(_AwayServer(failures=10**9), _setup, lambda h, b: ("fit", b""), give_up_after=0.0)


def test_the_cap_of_the_connection_is_the_cap_of_the_waits(slept):
    conn = _AwayServer(failures=20, reconnect_max=0.4)
    serve_tasks(conn, _setup, lambda h, b: ("fit", b""))
    assert max(slept + conn.waited) <= 0.4


def test_a_server_that_refuses_while_connected_is_not_called_again_at_once(slept):
    conn = _AwayServer(failures=10, connects=True)  # the channel is up, yet the call fails UNAVAILABLE
    serve_tasks(conn, _setup, lambda h, b: ("fit", b""))
    # it waits on the channel, which is up at once; then the next wait is a full one
    assert len(conn.waited) == len(slept) == 5


# ---------------------------------------------------------------- what a site accepts from the server


class _Stream:
    def __init__(self, messages):
        self._it = iter(messages)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._it)

    def cancel(self):
        pass


class _NoBuffers:
    def take(self, size):
        raise AssertionError(f"a buffer of {size} bytes was set aside")


@pytest.fixture
def conn(tmp_path):
    kits, port = make_kits(tmp_path)
    kit = load_kit(kits / "hospital_a", role="site")
    c = client.Connection(f"127.0.0.1:{port}", kit.ca_pem, kit.cert_pem, kit.key_pem, "hospital_a")
    c._buffers = _NoBuffers()
    yield c
    c.close()


def _serve(conn, header: dict, *chunks: bytes) -> None:
    conn._poll = lambda request, timeout=None: _Stream([wire.encode_header(header), *chunks])


def test_a_model_larger_than_the_site_accepts_is_refused_before_a_buffer_is_set_aside(conn):
    conn.max_model = 10_000
    _serve(conn, {"kind": "fit", "size": 3 << 30, "model_id": "m"})  # 3 GiB: below the old 64 GiB limit
    with pytest.raises(CodecError) as info:
        conn.poll("j", 60.0)
    assert str(3 << 30) in str(info.value) and "10000" in str(info.value)


def test_a_protocol_message_is_bounded_too(conn):
    _serve(conn, {"kind": "exchange", "size": EXCHANGE_LIMIT + 1, "model_id": "x"})
    with pytest.raises(CodecError, match=f"{EXCHANGE_LIMIT + 1} bytes, more than the {EXCHANGE_LIMIT}"):
        conn.poll("j", 60.0)


def test_a_site_sizes_its_limit_on_its_own_model(tmp_path):
    from medfed.site.remote import RemoteSite, model_limit
    from medfed.transport.grpc.hub import site_view

    job = load_job(builtin_job_path("quickstart")).model_copy(update={"output": tmp_path / "run"})
    site = RemoteSite("hospital_b", None)
    site.setup(site_view(job), "job1")
    params = {k: v.detach().cpu() for k, v in site.app.model.state_dict().items()}
    nbytes = sum(t.numel() * t.element_size() for t in params.values())
    assert site.max_model == model_limit(params)
    assert 2 * nbytes < site.max_model <= 2 * nbytes + (2 << 20)
    # the largest model task the server sends: the parameters and extras as large (SCAFFOLD)
    largest = codec.encode_model(params, {f"c/{k}": v for k, v in params.items()})
    assert len(largest) <= site.max_model


# ---------------------------------------------------------------- medfed site checks before it connects


@pytest.fixture(scope="module")
def site_kit(tmp_path_factory):
    kits, _ = make_kits(tmp_path_factory.mktemp("kits"))  # no server listens on its port
    return kits / "hospital_a"


def _site(kit: Path, *args: str):
    # --give-up-after 1: a site that went on to connect would stop after a second, with another error
    return runner.invoke(app, ["site", "--kit", str(kit), "--give-up-after", "1", *args])


@pytest.mark.parametrize("content, names", [
    (None, ["not found"]),
    ("data: [unclosed", ["not valid YAML"]),
    ({"data": {"source": "pairs", "mask_values": [0, 255], "sites": [{"name": "hospital_a", "image": "x"}]}},
     ["is invalid", "data.sites[0].image"]),
    ({"data": {"source": "pairs", "mask_values": [0, 255], "sites": [{"name": "hospital_b", "images": "x",
                                                                      "masks": "y"}]}},
     ["this site is 'hospital_a'"]),
], ids=["missing", "not-yaml", "schema", "other-site"])
def test_the_data_file_is_checked_before_the_site_connects(site_kit, tmp_path, content, names):
    path = tmp_path / "site.yaml"
    if isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        path.write_text(yaml.safe_dump(content))
    result = _site(site_kit, "--data", str(path))
    assert result.exit_code == 2, result.output
    assert str(path) in result.output.replace("\n", "") and "no contact" not in result.output
    for name in names:
        assert name in result.output


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_reconnect_max_must_be_a_positive_number_of_seconds(site_kit, value):
    result = _site(site_kit, "--reconnect-max", value)
    assert result.exit_code == 2
    assert "--reconnect-max must be a number of seconds > 0" in result.output


# ---------------------------------------------------------------- who a resumed server waits for


def _quickstart(tmp_path: Path, **over):
    job = load_job(builtin_job_path("quickstart"))
    return job.model_copy(update={"output": tmp_path / "run", **over})


def test_a_resumed_server_awaits_the_sites_that_had_joined(tmp_path):
    job = _quickstart(tmp_path, min_sites=2)
    with RunStore(tmp_path / "state.sqlite") as store:
        assert _members(store, job) == []  # nobody joined yet: every site is awaited
        store.site_seen("hospital_c", "f", "ipv4:1", 1.0)
        store.site_seen("hospital_a", "f", "ipv4:2", 2.0)
        store.site_seen("not_in_the_job", "f", "ipv4:3", 3.0)
        assert _members(store, job) == ["hospital_a", "hospital_c"]  # the job's order


def test_members_fewer_than_the_quorum_leave_every_site_awaited(tmp_path):
    job = _quickstart(tmp_path)  # quorum: every site
    with RunStore(tmp_path / "state.sqlite") as store:
        store.site_seen("hospital_a", "f", "ipv4:2", 2.0)
        assert _members(store, job) == []
