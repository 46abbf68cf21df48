"""The site side of the deployment transport: one outgoing mutual-TLS connection.

:func:`serve_tasks` joins the server, reports the site's data summary, then polls for
tasks and answers each with ``answer(header, model_blob) -> (kind, payload)``. Lost
connections (the server restarting, a network cut) are retried up to ``give_up_after``
seconds without contact. A refusal that retrying cannot fix stops the site with the reason:
the server refusing this site's name (not in the job), or ``HANDSHAKE_LIMIT`` TLS handshake
failures in a row that the site can see (the server's certificate is not from this kit's
CA, or does not match the host name). When the server refuses this site's certificate in
the handshake, the site sees only a closed connection, indistinguishable from a server that
is down, and retries until ``give_up_after``; the server's gRPC log names the reason.
(``load_kit`` refuses an expired or foreign certificate before the site ever connects.)

Reconnecting. Two backoffs take turns while the server is away, and both are bounded by the
same cap, ``reconnect_max`` (``medfed site --reconnect-max``, default ``RECONNECT_MAX`` s):

* gRPC's channel retries the TCP and TLS connection by itself: the first retry after
  ``RECONNECT_FIRST`` s, each wait 1.6 times the last (jitter +-20 %) up to the cap (see
  :func:`channel_options`). Between its attempts a call fails at once with UNAVAILABLE
  without trying; with gRPC's defaults (up to 120 s) a site came back minutes after a long
  outage.
* medfed's :class:`Backoff` spaces the site's own calls (join, then poll): waits of
  ``RECONNECT_FIRST``, twice that, ... up to the cap, each up to ``RECONNECT_JITTER``
  shorter. A site that lost the server waits on the channel itself (:meth:`Connection.
  wait_connected`), so it calls again as soon as gRPC has connected, not at the end of its
  wait.

So a site is back within about 1.2 times the cap (gRPC's jitter) of the server listening,
however long the outage lasted.
"""

from __future__ import annotations

import gc
import logging
import math
import random
import time
from collections.abc import Callable
from typing import Any

import grpc

from medfed import __version__
from medfed.core.buffers import BufferPool
from medfed.core.errors import CodecError, MedfedError
from medfed.transport.base import describe_exception
from medfed.transport.grpc import wire

log = logging.getLogger("medfed")

# gRPC codes after which trying again later can succeed
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
}
# bytes: the largest model a Connection accepts until it is given its own limit
# (``Connection.max_model``; ``medfed site`` sizes it on the site's own model)
MAX_MODEL = 64 << 30
EXCHANGE_LIMIT = 16 << 20  # bytes: a protocol message of the update path (JSON: keys and shares of every site)
HANDSHAKE_LIMIT = 5  # TLS handshake failures in a row before the site gives up
RECONNECT_FIRST = 0.25  # seconds: the first wait after the connection is lost (gRPC's and medfed's)
RECONNECT_MAX = 1.0  # seconds: the default cap of every wait between attempts to reach the server
RECONNECT_JITTER = 0.2  # medfed's waits are drawn between (1 - this) and all of their nominal length
CONNECT_TIMEOUT = 5.0  # seconds one connection attempt (TCP and TLS handshakes) is given
QUIET_RETRIES = 60.0  # seconds between log lines while the same error repeats


def _ms(seconds: float) -> int:
    """Milliseconds for a gRPC channel argument: at least gRPC's floor of 100 ms, at most int32."""
    return int(min(max(100.0, seconds * 1000.0), 2**31 - 1))


def channel_options(reconnect_max: float = RECONNECT_MAX) -> list[tuple[str, int]]:
    """The site's gRPC channel options: ``wire.CHANNEL_OPTIONS`` and a bounded reconnection.

    * ``grpc.initial_reconnect_backoff_ms``: the wait after the first failed connection
      attempt (``RECONNECT_FIRST``, gRPC's default 1 s);
    * ``grpc.max_reconnect_backoff_ms``: the cap of the waits, which grow 1.6 times per
      attempt with +-20 % jitter (``reconnect_max``, gRPC's default 120 s);
    * ``grpc.min_reconnect_backoff_ms``: despite its name, the least time one connection
      attempt is given to complete (``CONNECT_TIMEOUT``, gRPC's default 20 s), so that an
      attempt whose packets were lost gives way to a new one soon.

    gRPC raises each of them to 100 ms at least."""
    if not reconnect_max > 0:
        raise ValueError(f"reconnect_max must be > 0 seconds, got {reconnect_max!r}")
    return [
        *wire.CHANNEL_OPTIONS,
        ("grpc.initial_reconnect_backoff_ms", _ms(min(RECONNECT_FIRST, reconnect_max))),
        ("grpc.max_reconnect_backoff_ms", _ms(reconnect_max)),
        ("grpc.min_reconnect_backoff_ms", _ms(CONNECT_TIMEOUT)),
    ]


class ConnectionLost(MedfedError):
    """The server could not be reached for longer than the site waits."""


class Refused(MedfedError):
    """The server refused this site for a reason retrying cannot fix."""


class Connection:
    """The channel to the server and its four calls; every call has a deadline.

    ``reconnect_max``: the longest wait, in seconds, between two attempts to reach the
    server (see the module's docstring). ``max_model``: the most bytes a model task may
    declare; a larger one is refused before any memory is set aside for it;
    ``max_exchange``: likewise for a protocol message of the update path."""

    def __init__(self, target: str, ca_pem: bytes, cert_pem: bytes, key_pem: bytes, site: str,
                 reconnect_max: float = RECONNECT_MAX):
        creds = wire.channel_credentials(ca_pem, cert_pem, key_pem)
        self.site = site
        self.target = target
        self.reconnect_max = reconnect_max
        self.options = channel_options(reconnect_max)
        self.max_model = MAX_MODEL
        self.max_exchange = EXCHANGE_LIMIT
        self.channel = grpc.secure_channel(target, creds, options=self.options)
        self._join = self.channel.unary_unary(wire.JOIN)
        self._ready = self.channel.unary_unary(wire.READY)
        self._poll = self.channel.unary_stream(wire.POLL)
        self._submit = self.channel.stream_unary(wire.SUBMIT)
        self.split = self.channel.stream_stream(wire.SPLIT)  # a split-learning turn (split_client.py)
        self._model: tuple[str, memoryview] | None = None  # (id, payload) of the last model received
        self._buffers = BufferPool(keep=2)  # the model held and the one arriving

    def close(self) -> None:
        self.channel.close()

    def wait_connected(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the channel to be connected to the server (gRPC
        keeps trying in the background, see :func:`channel_options`); True once it is."""
        ready = grpc.channel_ready_future(self.channel)
        try:
            ready.result(timeout=max(0.0, timeout))
            return True
        except grpc.FutureTimeoutError:
            return False
        finally:
            ready.cancel()  # no effect once done; otherwise it stops watching the channel

    def join(self) -> dict[str, Any]:
        reply = self._join(wire.encode_header({"site": self.site, "medfed_version": __version__}),
                           timeout=wire.CALL_DEADLINE)
        return wire.decode_header(reply, "join reply")

    def ready(self, job_id: str, summary: dict[str, Any]) -> None:
        self._ready(wire.encode_header({"site": self.site, "job_id": job_id, "summary": summary}),
                    timeout=wire.CALL_DEADLINE)

    def refuse_job(self, job_id: str, cause: str) -> None:
        """Tell the server this site cannot take part in the job, and why."""
        try:
            self._ready(wire.encode_header({"site": self.site, "job_id": job_id, "error": cause[:2000]}),
                        timeout=wire.CALL_DEADLINE)
        except grpc.RpcError:
            pass  # best effort: the site stops with the cause on its own terminal anyway

    def poll(self, job_id: str, round_timeout: float) -> tuple[dict[str, Any], bytes | None]:
        """The next task header and its payload (None for ``wait`` and ``done``).

        The poll names the model this site received last (the id the server gave it); a
        task that sends that same model again (a model evaluated, then trained in the next
        round) comes with ``"cached": true`` and no payload, and the site uses its copy.
        Payloads arrive in reused buffers (a buffer is reused only once nothing refers to
        what it holds)."""
        have = self._model[0] if self._model is not None else None
        stream = self._poll(wire.encode_header({"site": self.site, "job_id": job_id, "have": have}),
                            timeout=wire.transfer_deadline(0, round_timeout))
        try:
            hdr = wire.decode_header(next(stream), "poll reply")
            kind = hdr.get("kind")
            if kind not in ("fit", "evaluate", "exchange"):
                return hdr, None
            if hdr.get("cached") is True and kind != "exchange":
                if have is None or hdr.get("model_id") != have:
                    raise CodecError(f"{kind} task: the server refers to a model this site does not hold")
                return hdr, self._model[1]
            size = hdr.get("size")
            if isinstance(size, bool) or not isinstance(size, int):
                raise CodecError(f"{kind} task: size must be an integer, got {size!r}")
            limit = self.max_exchange if kind == "exchange" else self.max_model
            if not 0 <= size <= limit:  # before any buffer is set aside for it
                raise CodecError(f"{kind} task: the server declares {size} bytes, more than the {limit} bytes this "
                                 f"site accepts for a {'protocol message' if kind == 'exchange' else 'model'}")
            # not hashed: TLS guarantees that the bytes arrive as the server sent them
            pool = self._buffers if kind != "exchange" else None
            blob, _ = wire.gather(stream, size, limit, f"{kind} task", hashed=False, pool=pool)
            if kind != "exchange":
                model_id = hdr.get("model_id")
                self._model = (model_id, blob) if isinstance(model_id, str) else None
            return hdr, blob
        finally:
            stream.cancel()

    def submit(self, header: dict[str, Any], payload: bytes, round_timeout: float) -> None:
        """Send an answer: its header, then the payload in chunks (the server hashes it)."""
        header = {**header, "site": self.site, "size": len(payload)}

        def messages():
            yield wire.encode_header(header)
            yield from wire.chunks(payload)

        self._submit(messages(), timeout=wire.transfer_deadline(len(payload), round_timeout))


class Backoff:
    """Waits between attempts to reach the server: the n-th (from 0) is drawn between
    ``1 - jitter`` and all of ``min(cap, base * 2**n)`` seconds. With the defaults: at most
    0.25, 0.5, 1, 1, 1 ... s. :meth:`reset` after a success starts again from ``base``."""

    def __init__(self, base: float = RECONNECT_FIRST, cap: float = RECONNECT_MAX, rng: random.Random | None = None,
                 jitter: float = RECONNECT_JITTER):
        if not (base > 0 and cap > 0):
            raise ValueError(f"backoff base and cap must be > 0 seconds, got {base!r} and {cap!r}")
        if not 0 <= jitter < 1:
            raise ValueError(f"backoff jitter must be in [0, 1), got {jitter!r}")
        self.base, self.cap, self.jitter, self.n = min(base, cap), cap, jitter, 0
        self.rng = rng or random.Random()

    def reset(self) -> None:
        self.n = 0

    def nominal(self, n: int) -> float:
        """The longest n-th wait, seconds."""
        doublings = math.ceil(math.log2(self.cap / self.base)) if self.cap > self.base else 0
        return min(self.cap, self.base * 2 ** min(n, doublings))  # n stays small: no overflow after days

    def next(self) -> float:
        wait = self.nominal(self.n)
        self.n += 1
        return self.rng.uniform((1 - self.jitter) * wait, wait)


Answer = Callable[[dict[str, Any], bytes], tuple[str, bytes]]


def serve_tasks(
    conn: Connection,
    setup: Callable[[dict[str, Any], str], tuple[dict[str, Any], float]],
    answer: Answer,
    give_up_after: float = 3600.0,
    backoff: Backoff | None = None,
    new_run: Callable[[str, bool], None] | None = None,
    job_done: Callable[[], None] | None = None,
) -> None:
    """Serve the server's tasks until it says the job is done.

    ``setup(job, job_id)`` is called when the server names a job this site has not set
    up yet; it returns the data summary to report and the job's round timeout.
    ``answer(header, blob)`` runs one task and returns ``("fit" | "evaluate", payload)``
    or ``("error", cause)`` as UTF-8 bytes. ``backoff`` spaces the attempts to reach the
    server (default: ``Backoff(cap=conn.reconnect_max)``).

    Against a queue server (``medfed server --queue``, whose join replies name the run of
    its queue) the site never returns on its own: it serves one job after another.
    ``new_run(run, resumed)`` is called before each new run is set up (the caller starts
    a fresh site for it), ``job_done()`` when the server says a job is done. An idle join
    (no job for this site now) counts as contact: ``give_up_after`` bounds silence from the
    server, not an empty queue. A job this site cannot take (``setup`` raised: its policy,
    its operator, its data) is declined and the site waits for the next; so is a job the
    server leaves this site out of."""
    backoff = backoff or Backoff(cap=conn.reconnect_max)
    job_id: str | None = None
    run: str | None = None  # the queue's run this site set up (None: a one-job server)
    queue = False  # the server is a queue server: after a job, the next one
    declined: set[tuple[str, str | None]] = set()  # (job id, run) this site will not take
    idle_said = False
    summary: dict[str, Any] = {}
    round_timeout = 600.0
    joined = False
    handshakes = 0
    last_contact = time.monotonic()
    woke = False  # the last wait ended because the channel connected
    said: tuple[str, str] | None = None  # the last error logged, and when: the same one is logged once a minute
    said_at = 0.0
    while True:
        try:
            if not joined:
                info = conn.join()
                if info.get("medfed_version") != __version__ and not (queue and idle_said):
                    log.warning("site '%s': the server runs medfed %s, this site %s", conn.site,
                                info.get("medfed_version"), __version__)
                q = info.get("queue")
                queue = queue or isinstance(q, dict)
                if info.get("idle") is True:  # a queue server with no job for this site now: it held the call
                    last_contact, handshakes, woke, said = time.monotonic(), 0, False, None
                    backoff.reset()
                    if not idle_said:
                        log.info("site '%s': no job for this site at %s now; waiting for one", conn.site, conn.target)
                        idle_said = True
                    continue
                this_run = str(q.get("run")) if isinstance(q, dict) and q.get("run") is not None else None
                if (str(info.get("job_id")), this_run) in declined:  # the job it declined still runs
                    last_contact = time.monotonic()
                    time.sleep(wire.POLL_WAIT)
                    continue
                if info.get("job_id") != job_id or this_run != run:
                    job_id, run = str(info.get("job_id")), this_run
                    if run is not None and new_run is not None:
                        gc.unfreeze()  # the last job's data and model may go now
                        new_run(run, isinstance(q, dict) and q.get("resumed") is True)
                    try:
                        summary, round_timeout = setup(info.get("job", {}), job_id)
                    except Exception as e:  # the server's log must say why this site is missing
                        conn.refuse_job(job_id, describe_exception(e))
                        if run is None:
                            raise
                        log.warning("site '%s': declined job %s (run %s of the queue): %s; waiting for the next",
                                    conn.site, job_id, run, describe_exception(e))
                        declined.add((job_id, run))
                        job_id = run = None
                        continue
                    # the data and model loaded stay for good: keep them out of the garbage
                    # collector's full passes, which gRPC's many small objects set off often
                    gc.freeze()
                conn.ready(job_id, summary)
                joined, idle_said = True, False
                log.info("site '%s': joined job %s at %s%s", conn.site, job_id, conn.target,
                         f" (run {run} of its queue)" if run is not None else "")
            hdr, blob = conn.poll(job_id, round_timeout)
            last_contact, handshakes, woke, said = time.monotonic(), 0, False, None
            backoff.reset()
            kind = hdr.get("kind")
            if kind == "done":
                log.info("site '%s': the server says the job is done", conn.site)
                if not queue:
                    return
                if job_done is not None:
                    job_done()
                job_id, run, joined = None, None, False
                continue
            if kind == "wait":
                continue
            what, payload = answer(hdr, blob or b"")
            blob = None  # a site holds at most one model besides its own while it answers
            reply = {"task_id": hdr.get("task_id"), "job_id": job_id, "round": hdr.get("round"), "kind": what}
            if what == "error":
                reply["cause"] = payload.decode(errors="replace")
                payload = b""
            try:
                conn.submit(reply, payload, round_timeout)
            except grpc.RpcError as e:
                if e.code() in RETRYABLE:
                    raise
                log.warning("site '%s': the server refused the %s answer of round %s: %s",
                            conn.site, kind, hdr.get("round"), e.details())
            finally:
                payload = b""
        except CodecError as e:  # a garbled task: report it, keep serving
            log.warning("site '%s': could not read a task from the server: %s", conn.site, e)
        except grpc.RpcError as e:
            code = e.code()
            details = e.details() or ""
            handshakes = handshakes + 1 if "handshake" in details.lower() else 0
            if handshakes >= HANDSHAKE_LIMIT:
                raise Refused(
                    f"site '{conn.site}': TLS handshake with {conn.target} failed {handshakes} times in a row: the "
                    f"server does not accept this site's certificate (another consortium's, or expired?) or its "
                    f"own certificate does not match this kit ({details})"
                ) from None
            if code is grpc.StatusCode.FAILED_PRECONDITION:  # the server restarted or moved to a new job
                joined = False
            elif code in RETRYABLE:
                joined = False
            elif queue and joined and run is not None and code is grpc.StatusCode.PERMISSION_DENIED:
                # left out of this run of a queue server (its model differs...): the next job may fit
                log.warning("site '%s': the server left this site out of job %s (run %s): %s; waiting for the next",
                            conn.site, job_id, run, details)
                declined.add((str(job_id), run))
                joined, job_id, run = False, None, None
                continue
            else:
                raise Refused(f"site '{conn.site}': the server refused this site: {e.details()} ({code.name})") from None
            if time.monotonic() - last_contact > give_up_after:
                raise ConnectionLost(
                    f"site '{conn.site}': no contact with {conn.target} for {give_up_after:g} s "
                    f"(last error: {e.details() or code.name})"
                ) from None
            wait = backoff.next()
            now = time.monotonic()
            if said != (code.name, details) or now - said_at >= QUIET_RETRIES:
                log.info("site '%s': %s (%s); retrying, at most %g s apart", conn.site, code.name, details,
                         backoff.cap)
                said, said_at = (code.name, details), now
            if code is grpc.StatusCode.UNAVAILABLE and not woke:
                # the server is away: call again as soon as gRPC has connected (once: a server
                # that answers UNAVAILABLE while connected is not called again at once)
                woke = conn.wait_connected(wait)
            else:
                woke = False
                time.sleep(wait)
