"""What travels between a site and the server, and under which limits.

The service ``medfed.Federation`` has five methods; every message is bytes:

* ``Join``   (unary)  site -> ``{"site", "medfed_version"}``; server -> ``{"job", "job_id"}``
  (the job with its file paths removed: paths never travel).
* ``Ready``  (unary)  site -> ``{"site", "job_id", "summary"}`` (sizes and shape of its
  data, no images; under ``"model"`` the description of the model it built: entry names,
  shapes, dtypes and their fingerprint, see core/modelspec.py), or ``{"site", "job_id",
  "error"}`` when it cannot take part in the job; server -> ``{"ok": true}``.
* ``Poll``   (server streaming) site -> ``{"site", "job_id", "have"}`` (``have``: the id
  of the last model it received, or null); server -> a header ``{"kind": "fit" |
  "evaluate" | "exchange" | "wait" | "done", ...}`` then, for a task, its payload (the
  model as safetensors) in chunks, unless the task's model is the one the site has
  (``"cached": true``, no chunks: a model evaluated at the end of a round is not sent again
  to train in the next). Every distinct model has an opaque ``"model_id"``. A poll with
  nothing to do returns ``wait`` after ``POLL_WAIT`` s.
* ``Submit`` (client streaming) site -> a header ``{"task_id", "job_id", "site", "round",
  "kind": "fit" | "evaluate" | "exchange" | "error", "size"}`` (and optionally ``"sha256"``,
  checked when given) then the payload in chunks; the server hashes what it receives (the
  audit trail and replay check use its own hash);
  server -> ``{"accepted": bool, "reason": str}``.
* ``Split``  (bidirectional streaming, ``topology.kind: split`` only) site -> a header
  ``{"site", "job_id", "task_id"}`` naming its open fit task (its turn), then per batch the
  activations at the cut and the gradient at the middle's output; server -> the middle's
  output, then the gradient at the cut. Each tensor is a frame ``{"op", "size"}`` followed by
  a one-tensor safetensors file in chunks (see splitting.py for the frames and the checks).

A queue server (``medfed server --queue``, dispatch.py) answers a ``Join`` with, besides,
``"queue": {"run", "resumed"}`` (the run of its queue the job is), or, while no job of the
site runs, ``{"idle": true}`` after holding the call up to ``POLL_WAIT`` s; its admins'
calls are the ``medfed.Admin`` service on the same port (admin.py).

Every message is at most ``MAX_MESSAGE`` bytes (gRPC refuses larger ones itself), every
call has a deadline, and a payload larger than the receiver allows is refused before it
is read in full.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO

import grpc

from medfed.core.buffers import BufferPool
from medfed.core.errors import CodecError

SERVICE = "medfed.Federation"
JOIN, READY, POLL, SUBMIT, SPLIT = (f"/{SERVICE}/{m}" for m in ("Join", "Ready", "Poll", "Submit", "Split"))

# bytes of payload per message: large enough that per-message costs stay small, small
# enough that the copies each open stream holds (the server streams to many sites at once)
# stay small
CHUNK = 1 << 20
MAX_MESSAGE = CHUNK + (1 << 20)  # the largest single gRPC message either side accepts
MAX_HEADER = 1 << 20  # a JSON header (the job travels in one)
POLL_WAIT = 5.0  # seconds the server holds a poll open before answering "wait"
CALL_DEADLINE = 30.0  # seconds for a unary call (Join, Ready)

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    # notice a dead peer on an idle connection within about a minute
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.max_pings_without_data", 0),
]
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    # the most a connection reads from its socket at once (gRPC's default is 4 MiB per
    # connection, so per site)
    ("grpc.experimental.tcp_max_read_chunk_size", 1 << 20),
    # a fixed receive window per stream instead of one grown by bandwidth probing: with
    # probing, every site's upload stream could buffer many megabytes in the server at
    # once, and its memory grew with the number of sites
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", 4 << 20),
]


def transfer_deadline(nbytes: int, round_timeout: float) -> float:
    """Seconds allowed for a call that moves ``nbytes``: the poll wait plus the round
    timeout, and never less than a transfer at 10 MB/s."""
    return POLL_WAIT + max(round_timeout, nbytes / 10e6, CALL_DEADLINE)


def server_credentials(ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> grpc.ServerCredentials:
    """Mutual TLS: the server presents its certificate and accepts only clients whose
    certificate the consortium CA signed."""
    return grpc.ssl_server_credentials([(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=True)


def channel_credentials(ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> grpc.ChannelCredentials:
    """The site trusts only the consortium CA, checks the server's host name against its
    certificate (gRPC's default) and presents its own certificate."""
    return grpc.ssl_channel_credentials(root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem)


def encode_header(obj: dict[str, Any]) -> bytes:
    data = json.dumps(obj, allow_nan=False, separators=(",", ":")).encode()
    if len(data) > MAX_HEADER:
        raise CodecError(f"header of {len(data)} bytes exceeds the {MAX_HEADER}-byte limit")
    return data


def decode_header(data: Any, what: str) -> dict[str, Any]:
    """A JSON object from ``data``, or CodecError naming ``what``."""
    if not isinstance(data, (bytes, bytearray)):
        raise CodecError(f"{what}: expected bytes")
    if len(data) > MAX_HEADER:
        raise CodecError(f"{what}: header of {len(data)} bytes exceeds {MAX_HEADER}")
    return decode_json_object(data, what)


def decode_json_object(data: bytes, what: str) -> dict[str, Any]:
    """A JSON object from ``data`` (whose size the caller has bounded), or CodecError."""
    try:
        obj = json.loads(bytes(data))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CodecError(f"{what}: not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CodecError(f"{what}: must be a JSON object")
    return obj


def sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def chunks(blob: bytes, size: int = CHUNK) -> Iterator[bytes]:
    """``blob`` in pieces of at most ``size`` bytes (none for an empty blob)."""
    view = memoryview(blob)
    for i in range(0, len(blob), size):
        yield bytes(view[i : i + size])


def _receive(
    messages: Iterable[Any], size: int, limit: int, what: str, write: Callable[[int, bytes], Any], hashed: bool = True
) -> str | None:
    """Pass each chunk with its offset to ``write`` until ``size`` bytes; return their
    SHA-256 hex (None when not ``hashed``). Raises CodecError when ``size`` exceeds
    ``limit``, when more or fewer bytes than ``size`` arrive, or a message is not bytes."""
    if size < 0 or size > limit:
        raise CodecError(f"{what}: declared size {size} bytes, the limit is {limit}")
    h, n = hashlib.sha256() if hashed else None, 0
    for m in messages:
        if not isinstance(m, (bytes, bytearray)):
            raise CodecError(f"{what}: expected bytes")
        if n + len(m) > size:
            raise CodecError(f"{what}: more than the declared {size} bytes")
        write(n, m)
        if h is not None:
            h.update(m)
        n += len(m)
    if n != size:
        raise CodecError(f"{what}: truncated, {n} of {size} bytes")
    return h.hexdigest() if h is not None else None


def gather(
    messages: Iterable[Any], size: int, limit: int, what: str, hashed: bool = True, pool: BufferPool | None = None
) -> tuple[bytearray | memoryview, str | None]:
    """The payload in one buffer (from ``pool`` when given), hashed as it arrives unless
    not ``hashed``: (payload, SHA-256 hex or None)."""
    if size < 0 or size > limit:  # before allocating
        raise CodecError(f"{what}: declared size {size} bytes, the limit is {limit}")
    buf = pool.take(size) if pool is not None else bytearray(size)
    view = memoryview(buf)

    def write(at: int, m: bytes) -> None:
        view[at : at + len(m)] = m

    return buf, _receive(messages, size, limit, what, write, hashed)


def gather_to_file(messages: Iterable[Any], size: int, limit: int, what: str) -> tuple[BinaryIO, str]:
    """The payload in an anonymous temporary file (gone when closed, and never left behind
    by a crash), hashed as it arrives: (the file, its SHA-256 hex)."""
    f = tempfile.TemporaryFile()
    try:
        digest = _receive(messages, size, limit, what, lambda _at, m: f.write(m))
        f.flush()
        return f, digest
    except BaseException:
        f.close()
        raise


def check_payload(digest: str, expected: Any, what: str) -> None:
    """A SHA-256 the sender declared must match what arrived; a sender may leave it out
    (``null`` or absent): TLS already guarantees that the bytes arrive unchanged, and the
    receiver hashes for its own records what it receives."""
    if expected is not None and (not isinstance(expected, str) or digest != expected):
        raise CodecError(f"{what}: SHA-256 does not match the header")
