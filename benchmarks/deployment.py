"""The deployment transport (gRPC over mutual TLS) on loopback: throughput, round overhead
and server memory.

Usage: python benchmarks/deployment.py [--quick] [--repeats N] [--sites 3,10,20,30]
                                       [--params 25000000] [--only throughput,overhead,memory]

Every site here is an *echo* site: it decodes the model it receives and answers at once
with an update holding the same parameters but one value per tensor (no training; each
round's model is new, as after training), or with one dummy metric per requested split
for an evaluation. Everything else is medfed's own code: ``Hub``,
``GrpcTransport`` and ``start_server`` on 127.0.0.1 with a server certificate of a
consortium CA made by ``medfed.transport.pki``; ``Connection`` and ``serve_tasks`` in
separate processes (multiprocessing, spawn), each site presenting its own certificate.
The model is float32 tensors of ``--params`` parameters in 4 tensors (25M = 100 MB).
MB = 10^6 bytes.

1. throughput: one site process, one site. Each repeat is one ``transport.fit`` of a
   new round. Download (server -> site) is timed on the site, from the arrival of the
   task's header to the arrival of the last chunk of the model (the figure comes back
   through a multiprocessing queue); upload (site -> server) on the server, from the
   submission's header to its last chunk. Encoding/decoding, hashing and the server's
   checks of an update are timed apart (in the same runs, and alone). After each
   repeat, plain grpcio moves the same bytes with the same credentials and options (see
   ``RawReference``): the ceiling medfed's figures are compared with.
2. overhead: 3 site processes (one site each). One round = ``transport.fit`` to the 3
   sites + ``FedAvg().aggregate`` + ``transport.evaluate`` (val and test) of the 3 sites.
   One warm-up round is not counted.
3. memory: for each site count a fresh server process (same as above, full rounds) and
   ONE site process running every site as a thread with its own ``Connection``. The
   server reports its resident memory before round 1 (after imports, the model, the gRPC
   server, the sites joined) and its peak (VmHWM, see ``peak_rss_mb``) after the rounds.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import queue as queue_mod
import resource
import socket
import statistics
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

MB = 1e6
ROUND_TIMEOUT = 600.0  # seconds: the job's round_timeout, the bound of every fit / evaluate
START_TIMEOUT = 120.0  # seconds for site processes to start, import torch and join
SPLITS = ("val", "test")

# --------------------------------------------------------------------------- shared helpers


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / MB  # kB
    return float("nan")


def rss_mb() -> float:
    """Current resident memory of this process (VmRSS), MB."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """Peak resident memory of this process since it started (VmHWM), MB.

    Not ``ru_maxrss``: Linux carries ``ru_maxrss`` across fork + exec, so a process
    started with multiprocessing's spawn reports at least the RSS its parent had when it
    was started (measured here: a server child of a 2.2 GB parent "peaked" at 2.2 GB).
    VmHWM belongs to the process's own address space."""
    return _status_mb("VmHWM")


def processes_cpu_s(procs) -> float:
    """User + system CPU seconds used so far by the processes ``procs`` (all threads)."""
    total = 0
    for p in procs:
        with open(f"/proc/{p.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_params(n: int) -> dict:
    """``n`` float32 parameters in 4 tensors (40/30/20/10 %), random values."""
    import torch

    g = torch.Generator().manual_seed(0)
    sizes = [int(n * 0.4), int(n * 0.3), int(n * 0.2)]
    sizes.append(n - sum(sizes))
    return {f"layer{i}.weight": torch.rand(s, generator=g, dtype=torch.float32) for i, s in enumerate(sizes)}


def new_model(params: dict) -> dict:
    """A copy of ``params`` with one value per tensor changed (new tensors, new bytes)."""
    out = {k: v.clone() for k, v in params.items()}
    for t in out.values():
        t.view(-1)[0] += 1.0
    return out


def nbytes(params: dict) -> int:
    return sum(t.numel() * t.element_size() for t in params.values())


def site_names(n: int) -> list[str]:
    return [f"site_{i}" for i in range(n)]


def make_pki(folder: Path, n_sites: int) -> Path:
    """A consortium CA, a server certificate for 127.0.0.1 and one certificate per site,
    written as PEM files into ``folder``."""
    from medfed.transport import pki

    folder.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = pki.create_ca("bench", 1)
    (folder / "ca.crt").write_bytes(ca_cert)
    cert, key = pki.issue_certificate(ca_cert, ca_key, "server", "server", host="127.0.0.1", consortium="bench")
    (folder / "server.crt").write_bytes(cert)
    (folder / "server.key").write_bytes(key)
    for name in site_names(n_sites):
        cert, key = pki.issue_certificate(ca_cert, ca_key, name, "site", consortium="bench")
        (folder / f"{name}.crt").write_bytes(cert)
        (folder / f"{name}.key").write_bytes(key)
    return folder


def make_job(n_sites: int, out: Path):
    """A valid job naming ``site_0 .. site_{n-1}`` (synthetic data that is never generated:
    the hub only uses the site names, the round timeout and the job's site view)."""
    from medfed.config import parse_job

    raw = {
        "name": f"deployment-bench-{n_sites}",
        "seed": 0,
        "output": str(out),
        "rounds": 1,
        "device": "cpu",
        "round_timeout": ROUND_TIMEOUT,
        "data": {
            "source": "synthetic",
            "image_size": 32,
            "sites": [{"name": s, "n_train": 100, "n_val": 10, "n_test": 10} for s in site_names(n_sites)],
        },
        "model": {"name": "small_cnn", "width": 16},
        "task": {"labels": "binary", "monitor": "auc"},
        "compare": [],
    }
    return parse_job(raw, source="benchmark job")


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _timed_iter_class():
    class TimedIter:
        """Wraps a gRPC message stream: when the first message (the header) and the last
        one arrived, and how many bytes came after the header."""

        def __init__(self, it):
            self.it = it
            self.first_msg = None
            self.t_first = self.t_last = self.t_end = None
            self.n_bytes = 0

        def __iter__(self):
            return self

        def __next__(self):
            try:
                m = next(self.it)
            except StopIteration:
                self.t_end = time.perf_counter()  # the sender closed the stream
                raise
            now = time.perf_counter()
            if self.t_first is None:
                self.t_first, self.first_msg = now, m
            else:
                self.t_last = now
                self.n_bytes += len(m)
            return m

        def cancel(self):
            return self.it.cancel()

    return TimedIter


# --------------------------------------------------------------------------- the site process


def site_process(target: str, pki_dir: str, names: list[str], results, measure: bool, answer_slots: int) -> None:
    """Serve ``names`` as echo sites, one thread and one Connection each, until the server
    says the job is done. With ``measure``, every answered task puts one record of
    timings on ``results``."""

    from medfed.core import codec
    from medfed.core.buffers import BufferPool
    from medfed.core.types import EvalResult, Split, Update
    from medfed.transport.grpc.client import Backoff, Connection, serve_tasks

    TimedIter = _timed_iter_class()
    folder = Path(pki_dir)
    ca = (folder / "ca.crt").read_bytes()
    slots = threading.BoundedSemaphore(answer_slots)
    errors: list[str] = []

    def run_site(name: str) -> None:
        encoded, decoded = BufferPool(keep=1), BufferPool(keep=1)  # as RemoteSite: the update sent, the model received
        conn = Connection(target, ca, (folder / f"{name}.crt").read_bytes(), (folder / f"{name}.key").read_bytes(), name)
        rec: dict = {}
        poll_call, submit_call = conn._poll, conn._submit

        def timed_poll(request, timeout=None):
            conn.last_stream = TimedIter(poll_call(request, timeout=timeout))
            return conn.last_stream

        def timed_submit(messages, timeout=None):
            t0 = time.perf_counter()
            rec["up_gap_s"] = t0 - rec.pop("t_answer_end", t0)  # from the answer to the Submit call
            try:
                return submit_call(messages, timeout=timeout)
            finally:
                rec["up_call_s"] = time.perf_counter() - t0
                if measure:
                    results.put(dict(rec))

        conn._poll, conn._submit = timed_poll, timed_submit

        def setup(job: dict, job_id: str):
            summary = {"name": name, "train": 100, "val": 10, "test": 10,
                       "class_counts": {"train": [50, 50], "val": [5, 5], "test": [5, 5]}, "shape": [1, 32, 32]}
            return summary, float(job.get("round_timeout", ROUND_TIMEOUT))

        def answer(hdr: dict, blob: bytes):
            t_in = time.perf_counter()
            s = conn.last_stream
            rec.clear()
            rec.update(site=name, kind=hdr.get("kind"), round=hdr.get("round"), down_bytes=s.n_bytes,
                       down_wire_s=(s.t_last - s.t_first) if s.t_last else 0.0,
                       down_close_s=(s.t_end or t_in) - (s.t_last or s.t_first),  # until the stream ends
                       down_after_s=t_in - (s.t_end or s.t_last or s.t_first))  # until poll returns the payload
            with slots:
                t0 = time.perf_counter()
                params, extras = codec.decode_model(blob, decoded)
                t1 = time.perf_counter()
                if hdr.get("kind") == "fit":
                    plan = codec.plan_from_dict(hdr.get("plan"), extras)
                    for t in params.values():  # change the model, as training would: each round's is new
                        t.view(-1)[0] += 1.0
                    payload = codec.encode_update(Update(name, plan.round, params, 100, 1), encoded)
                    what = "fit"
                else:
                    payload = codec.encode_eval_results(
                        [EvalResult(name, Split(sp), 10, {"auc": 0.5}) for sp in hdr.get("splits", [])])
                    what = "evaluate"
                t2 = time.perf_counter()
                del params, extras
            rec.update(decode_s=t1 - t0, encode_s=t2 - t1, up_bytes=len(payload), t_answer_end=time.perf_counter())
            return what, payload

        try:
            serve_tasks(conn, setup, answer, give_up_after=60.0, backoff=Backoff(base=0.2, cap=2.0))
        except Exception as e:  # reported to the parent; the benchmark fails with it
            errors.append(f"{name}: {type(e).__name__}: {e}")
        finally:
            conn.close()

    threads = [threading.Thread(target=run_site, args=(n,), name=n, daemon=True) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        results.put({"error": "; ".join(errors)})
    results.put({"done": names, "peak_mb": peak_rss_mb()})


# --------------------------------------------------------------------------- the server side


def start_hub(job, pki_dir: Path, port: int):
    """A Hub that times every submission's transfer, the gRPC server and the transport."""
    from medfed.transport.grpc import wire
    from medfed.transport.grpc.hub import Hub
    from medfed.transport.grpc.transport import GrpcTransport, start_server

    TimedIter = _timed_iter_class()

    class TimedHub(Hub):
        uploads: list[dict]

        def submit(self, messages, context):
            it = TimedIter(messages)
            try:
                return super().submit(it, context)
            finally:
                end = time.perf_counter()
                try:
                    hdr = json.loads(it.first_msg)
                except (TypeError, ValueError):
                    hdr = {}
                self.uploads.append({"site": hdr.get("site"), "round": hdr.get("round"), "kind": hdr.get("kind"),
                                     "bytes": it.n_bytes, "wire_s": (it.t_last - it.t_first) if it.t_last else 0.0,
                                     "close_s": (it.t_end or end) - (it.t_last or it.t_first or end),
                                     "check_s": end - (it.t_end or it.t_last or it.t_first or end)})

    class TimedTransport(GrpcTransport):
        encode_s = 0.0

        def _model(self, params, extras):
            t = time.perf_counter()
            try:
                return super()._model(params, extras)
            finally:
                self.encode_s += time.perf_counter() - t

    hub = TimedHub(job, job.job_id)
    hub.uploads = []
    creds = wire.server_credentials(*((pki_dir / f).read_bytes() for f in ("ca.crt", "server.crt", "server.key")))
    server = start_server(hub, f"127.0.0.1:{port}", creds, len(job.site_names))
    return hub, server, TimedTransport(hub)


def spawn_sites(ctx, target: str, pki_dir: Path, groups: list[list[str]], measure: bool, answer_slots: int = 1_000):
    results = ctx.Queue()
    procs = [ctx.Process(target=site_process, args=(target, str(pki_dir), g, results, measure, answer_slots),
                         daemon=True) for g in groups]
    for p in procs:
        p.start()
    return procs, results


def stop_processes(procs, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(5.0)
        if p.is_alive():
            p.kill()
            p.join(5.0)


def wait_ready(hub, names: list[str], procs) -> None:
    ready = hub.wait_ready(names, START_TIMEOUT)
    if len(ready) != len(names):
        dead = [p.exitcode for p in procs if not p.is_alive()]
        raise RuntimeError(f"only {len(ready)} of {len(names)} sites joined within {START_TIMEOUT:g} s "
                           f"(exited site processes: {dead})")


def fit_requests(job, params: dict, rnd: int, names: list[str]):
    from medfed.core.types import Arm, FitRequest
    from medfed.server.loop import make_plan

    return [FitRequest(site=s, params=params, plan=make_plan(job, job.job_id, Arm.FEDERATED, rnd, i))
            for i, s in enumerate(names)]


def eval_requests(job, params: dict, rnd: int, names: list[str]):
    from medfed.core.types import EvalRequest, Split
    return [EvalRequest(site=s, params=params, splits=tuple(Split(x) for x in SPLITS), job_id=job.job_id, round=rnd)
            for s in names]


def check_answers(answers, kind: str) -> None:
    from medfed.core.types import SiteFailure

    bad = [a for a in answers if isinstance(a, SiteFailure)]
    if bad:
        raise RuntimeError(f"{kind}: {len(bad)} site(s) failed: " + "; ".join(f"{f.site}: {f.cause}" for f in bad))


def drain(results, what: str, timeout: float = 60.0) -> dict:
    try:
        rec = results.get(timeout=timeout)
    except queue_mod.Empty:
        raise RuntimeError(f"no {what} record from the site process within {timeout:g} s") from None
    if "error" in rec:
        raise RuntimeError(f"site process: {rec['error']}")
    return rec


def full_round(job, transport, algorithm, params: dict, rnd: int, names: list[str], phase=None) -> tuple[dict, dict]:
    """fit + FedAvg + evaluate; returns (new params, timings). ``phase(name)`` is told
    which part runs."""
    phase = phase or (lambda _name: None)
    phase("fit")
    t0 = time.perf_counter()
    updates = transport.fit(fit_requests(job, params, rnd, names), ROUND_TIMEOUT)
    t1 = time.perf_counter()
    check_answers(updates, f"fit round {rnd}")
    phase("aggregate")
    new = algorithm.aggregate(params, updates)
    del updates
    t2 = time.perf_counter()
    phase("evaluate")
    results = transport.evaluate(eval_requests(job, new, rnd, names), ROUND_TIMEOUT)
    t3 = time.perf_counter()
    phase("between rounds")
    check_answers(results, f"evaluate round {rnd}")
    return new, {"fit": t1 - t0, "aggregate": t2 - t1, "evaluate": t3 - t2, "total": t3 - t0}



# --------------------------------------------------------------------------- plain grpcio reference
#
# Plain grpcio with medfed's TLS credentials, channel and server options and 4 MB chunks
# (``wire.chunks``), no hub and no checks, timed the same way as medfed's transfers. Its
# receivers either only count the bytes ("count": the ceiling of gRPC streaming from
# Python on this machine) or join them with ``wire.gather`` as medfed does ("gather").
# One download and one upload per mode run right after each medfed repeat.


def raw_client(target: str, pki_dir: str, size: int, commands, results) -> None:
    import grpc

    from medfed.transport.grpc import wire

    TimedIter = _timed_iter_class()
    folder = Path(pki_dir)
    creds = wire.channel_credentials((folder / "ca.crt").read_bytes(), (folder / "site_0.crt").read_bytes(),
                                     (folder / "site_0.key").read_bytes())
    channel = grpc.secure_channel(target, creds, options=wire.CHANNEL_OPTIONS)
    down, up = channel.unary_stream("/bench.Raw/Down"), channel.stream_unary("/bench.Raw/Up")
    payload = bytes(size)
    try:
        while True:
            mode = commands.get(timeout=ROUND_TIMEOUT)
            if mode is None:
                return
            hdr = json.dumps({"mode": mode}).encode()
            it = TimedIter(down(hdr, timeout=120))
            next(it)
            n = len(wire.gather(it, size, size, "download")[0]) if mode == "gather" else sum(len(m) for m in it)
            if n != size:
                raise RuntimeError(f"reference download: {n} of {size} bytes")

            def messages(first: bytes):
                yield first
                yield from wire.chunks(payload)

            up(messages(hdr), timeout=120)
            results.put({"down_wire_s": it.t_last - it.t_first})
    except Exception as e:
        results.put({"error": f"{type(e).__name__}: {e}"})
    finally:
        channel.close()


class RawReference:
    def __init__(self, ctx, pki_dir: Path, blob: bytes):
        from concurrent.futures import ThreadPoolExecutor

        import grpc

        from medfed.transport.grpc import wire

        TimedIter = _timed_iter_class()
        self.uploads: list[tuple[int, float]] = []
        size = len(blob)

        def down(request, context):
            yield b"{}"
            yield from wire.chunks(blob)

        def up(messages, context):
            it = TimedIter(messages)
            mode = json.loads(next(it))["mode"]
            n = len(wire.gather(it, size, size, "upload")[0]) if mode == "gather" else sum(len(m) for m in it)
            self.uploads.append((n, it.t_last - it.t_first))
            return b"{}"

        handlers = grpc.method_handlers_generic_handler("bench.Raw", {
            "Down": grpc.unary_stream_rpc_method_handler(down), "Up": grpc.stream_unary_rpc_method_handler(up)})
        self.server = grpc.server(ThreadPoolExecutor(max_workers=4), handlers=[handlers], options=wire.SERVER_OPTIONS)
        creds = wire.server_credentials(*((pki_dir / f).read_bytes() for f in ("ca.crt", "server.crt", "server.key")))
        port = free_port()
        if self.server.add_secure_port(f"127.0.0.1:{port}", creds) == 0:
            raise OSError(f"cannot listen on 127.0.0.1:{port}")
        self.server.start()
        self.size = size
        self.commands, self.results = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=raw_client, args=(f"127.0.0.1:{port}", str(pki_dir), size, self.commands,
                                                         self.results), daemon=True)
        self.proc.start()

    def transfer(self, mode: str) -> dict:
        """One download and one upload; their wire seconds."""
        self.commands.put(mode)
        rec = drain(self.results, "reference transfer", START_TIMEOUT)
        n, up_s = self.uploads[-1]
        if n != self.size:
            raise RuntimeError(f"reference upload: {n} of {self.size} bytes")
        return {"down_wire_s": rec["down_wire_s"], "up_wire_s": up_s}

    def close(self) -> None:
        try:
            self.commands.put(None)
        finally:
            self.server.stop(grace=1.0).wait(5.0)
            stop_processes([self.proc])


# --------------------------------------------------------------------------- 1. throughput


def codec_alone(params: dict, repeats: int) -> dict:
    """Median seconds of each CPU piece of one transfer, alone in this process."""
    import hashlib

    from medfed.core import codec
    from medfed.core.buffers import BufferPool
    from medfed.core.types import Update
    from medfed.server.deploy import save_state
    from medfed.server.validate import full_spec, update_problem
    from medfed.transport.grpc import wire

    t: dict[str, list[float]] = {}
    spec = full_spec(params)
    # one pool per use, as the server and the site have
    encoded, received_at_site, decoded, update_buf, received_at_server = (BufferPool(keep=1) for _ in range(5))

    def clock(key, fn, *args, **kwargs):
        s = time.perf_counter()
        out = fn(*args, **kwargs)
        t.setdefault(key, []).append(time.perf_counter() - s)
        return out

    def send_copies(blob):
        return sum(len(p) for p in wire.chunks(blob))

    def sha(blob):
        return hashlib.sha256(blob).hexdigest()

    for _ in range(repeats + 1):  # the first pass fills the pool; its figures are dropped below
        clock("encode_model, fresh buffer", codec.encode_model, params, {})
        blob = clock("encode_model, reused buffer", codec.encode_model, params, {}, encoded)
        clock("sha256", sha, blob)
        clock("wire.chunks", send_copies, blob)
        pieces = list(wire.chunks(blob))
        clock("gather, fresh buffer", wire.gather, iter(pieces), len(blob), 1 << 40, "x", hashed=False)
        got, _ = clock("gather, reused buffer", wire.gather, iter(pieces), len(blob), 1 << 40, "x", hashed=False,
                       pool=received_at_site)
        del pieces, blob
        clock("decode_model, fresh tensors", codec.decode_model, got)
        received, _ = clock("decode_model", codec.decode_model, got, decoded)
        del got
        up = clock("encode_update, reused buffer", codec.encode_update, Update("s", 1, received, 100, 1), update_buf)
        del received
        up_bytes = bytes(up)
        del up
        pieces = list(wire.chunks(up_bytes))
        buf, _ = wire.gather(iter(pieces), len(up_bytes), 1 << 40, "x", hashed=False, pool=received_at_server)
        upd = clock("view_update", codec.view_update, buf)
        clock("update_problem, in memory", update_problem, upd, spec, 1)
        del upd, buf
        f, _ = clock("gather_to_file", wire.gather_to_file, iter(pieces), len(up_bytes), 1 << 40, "x")
        upd = clock("read_update_file", codec.read_update_file, f, len(up_bytes))
        clock("update_problem, file", update_problem, upd, spec, 1)
        f.close()
        del upd, pieces, up_bytes
        with tempfile.TemporaryDirectory() as d:
            clock("save_state", save_state, Path(d), 1, params, {}, "bench")
    return {k: median(v[1:]) for k, v in t.items()}


def bench_throughput(args, ctx, tmp: Path) -> dict:
    params = make_params(args.params)
    size = nbytes(params)
    names = site_names(1)
    job = make_job(1, tmp / "run-throughput")
    pki_dir = make_pki(tmp / "pki-throughput", 1)
    port = free_port()
    hub, server, transport = start_hub(job, pki_dir, port)
    from medfed.core import codec

    procs, rows, raw, reference = [], [], {"count": [], "gather": []}, None
    try:
        reference = RawReference(ctx, pki_dir, codec.encode_model(params, {}))
        procs, results = spawn_sites(ctx, f"127.0.0.1:{port}", pki_dir, [names], measure=True)
        wait_ready(hub, names, procs)
        for rep in range(args.repeats + 1):  # repeat 0 warms the connection up, not counted
            transport.encode_s = 0.0
            hub.uploads.clear()
            params = new_model(params)  # a model the site does not hold yet: it is sent in full
            t0 = time.perf_counter()
            answers = transport.fit(fit_requests(job, params, rep + 1, names), ROUND_TIMEOUT)
            fit_s = time.perf_counter() - t0
            check_answers(answers, "fit")
            del answers
            site = drain(results, "site")
            up = hub.uploads[-1]
            row = {"rep": rep, "fit_s": fit_s, "server_encode_sha_s": transport.encode_s, **site,
                   "up_wire_s": up["wire_s"], "up_close_s": up["close_s"], "up_check_s": up["check_s"], "up_bytes_server": up["bytes"]}
            rows.append(row)
            ref = {mode: reference.transfer(mode) for mode in ("count", "gather")}
            if rep > 0:
                for mode, r in ref.items():
                    raw[mode].append(r)
            print(f"  throughput rep {rep}{' (warm-up)' if rep == 0 else ''}: medfed down {size / MB / row['down_wire_s']:.0f} "
                  f"MB/s, up {row['up_bytes'] / MB / row['up_wire_s']:.0f} MB/s, fit() {fit_s:.2f} s; plain grpcio "
                  + ", ".join(f"({m}) down {size / MB / r['down_wire_s']:.0f} up {size / MB / r['up_wire_s']:.0f} MB/s"
                              for m, r in ref.items()), flush=True)
        hub.finish(grace=7.0)
    finally:
        server.stop(grace=1.0).wait(5.0)
        stop_processes(procs)
        if reference is not None:
            reference.close()
    alone = codec_alone(params, max(1, min(args.repeats, 3)))
    return {"size": size, "rows": rows[1:], "raw": raw, "alone": alone}


def report_throughput(res: dict) -> list[str]:
    rows, size = res["rows"], res["size"]

    def mbps(key, nbytes_key=None):
        return [(r[nbytes_key] if nbytes_key else size) / MB / r[key] for r in rows]

    down = mbps("down_wire_s")
    down_all = [size / MB / (r["down_wire_s"] + r["down_close_s"] + r["down_after_s"]) for r in rows]
    up = mbps("up_wire_s", "up_bytes")
    up_all = [r["up_bytes"] / MB / (r["up_gap_s"] + r["up_wire_s"] + r["up_close_s"] + r["up_check_s"]) for r in rows]
    lines = [
        f"Model: {size / MB:.1f} MB (float32, 4 tensors); {len(rows)} repeats (+1 warm-up), 1 site process.",
        "",
        "| direction | wire MB/s median (min-max) | wire s median | end to end MB/s median | target (wire) |",
        "| --- | --- | --- | --- | --- |",
        f"| server -> site (poll) | {median(down):.0f} ({min(down):.0f}-{max(down):.0f}) | "
        f"{median([r['down_wire_s'] for r in rows]):.3f} | {median(down_all):.0f} | >= 500 MB/s: "
        f"{'met' if median(down) >= 500 else 'NOT met'} |",
        f"| site -> server (submit) | {median(up):.0f} ({min(up):.0f}-{max(up):.0f}) | "
        f"{median([r['up_wire_s'] for r in rows]):.3f} | {median(up_all):.0f} | >= 500 MB/s: "
        f"{'met' if median(up) >= 500 else 'NOT met'} |",
    ]
    for mode in ("count", "gather"):
        for label, key in (("server -> site", "down_wire_s"), ("site -> server", "up_wire_s")):
            xs = [size / MB / r[key] for r in res["raw"][mode]]
            lines.append(f"| reference: plain grpcio, receiver {'only counts' if mode == 'count' else 'joins into a fresh buffer'}, "
                         f"{label} | {median(xs):.0f} ({min(xs):.0f}-{max(xs):.0f}) | "
                         f"{median([r[key] for r in res['raw'][mode]]):.3f} | - | |")
    lines += [
        "",
        "Reference: plain grpcio, run right after each medfed repeat with the same TLS credentials, channel and",
        "server options and chunks, no hub and no checks; its receiver only counts the bytes (the ceiling of gRPC",
        "streaming from Python on this machine at that moment) or joins and hashes them in a fresh buffer",
        "(`wire.gather` without a buffer pool, as medfed did before 2026-11-24).",
        "Wire: from the arrival of the header to the arrival of the last chunk, timed by the receiver. End to end:",
        "download until `Connection.poll` returns the payload (+ end of stream); upload from the site's answer",
        "until the server has received, hashed (SHA-256, for its audit) and checked the update and answered the",
        "call. Encoding the model and the update, and the site decoding the model, are in neither figure.",
        "Every repeat sends a new model (one value changed), so the site's copy of the last model does not apply.",
        "",
        "CPU pieces around one transfer, seconds (median; 'in run' = measured during the repeats above, 'alone' =",
        "the same call alone in the benchmark process; 'reused buffer' = from a `BufferPool`, as medfed does):",
        "",
        "| piece | in run | alone |",
        "| --- | --- | --- |",
    ]
    a = res["alone"]
    pieces = [
        ("server: encode_model, reused buffer (GrpcTransport._model)", median([r["server_encode_sha_s"] for r in rows]),
         a["encode_model, reused buffer"]),
        ("server: encode_model, fresh buffer", None, a["encode_model, fresh buffer"]),
        ("wire.chunks: copies of the payload when sending", None, a["wire.chunks"]),
        ("site: last chunk -> end of the poll stream", median([r["down_close_s"] for r in rows]), None),
        ("site: end of stream -> poll returns", median([r["down_after_s"] for r in rows]), None),
        ("receive and join the chunks (wire.gather), reused buffer", None, a["gather, reused buffer"]),
        ("receive and join the chunks (wire.gather), fresh buffer", None, a["gather, fresh buffer"]),
        ("site: decode_model, into a reused buffer (RemoteSite)", median([r["decode_s"] for r in rows]), a["decode_model"]),
        ("site: decode_model, fresh tensors", None, a["decode_model, fresh tensors"]),
        ("site: encode_update, reused buffer", median([r["encode_s"] for r in rows]), a["encode_update, reused buffer"]),
        ("site: answer returned -> Submit call starts", median([r["up_gap_s"] for r in rows]), None),
        ("server: last chunk -> end of the submit stream", median([r["up_close_s"] for r in rows]), None),
        ("server: end of stream -> submission answered (SHA-256, view_update, checks)",
         median([r["up_check_s"] for r in rows]),
         a["sha256"] + a["view_update"] + a["update_problem, in memory"]),
        ("server: SHA-256 of an update (its audit row, replay check)", None, a["sha256"]),
        ("server: update_problem, update in memory (names, shapes, finite values)", None, a["update_problem, in memory"]),
        ("server, beyond the updates held in memory: receive into a temporary file, hashing (wire.gather_to_file)",
         None, a["gather_to_file"]),
        ("server: read_update_file (header) + update_problem reading the file in parts", None,
         a["read_update_file"] + a["update_problem, file"]),
        ("server: save_state, the checkpoint a deployed server writes after each round (with fsync)", None,
         a["save_state"]),
        ("site: Submit call, from its start to the server's reply", median([r["up_call_s"] for r in rows]), None),
        ("whole transport.fit() (server)", median([r["fit_s"] for r in rows]), None),
    ]
    for name, run, alone in pieces:
        lines.append(f"| {name} | {'-' if run is None else f'{run:.3f}'} | {'-' if alone is None else f'{alone:.3f}'} |")
    return lines


# --------------------------------------------------------------------------- 2. round overhead


def bench_overhead(args, ctx, tmp: Path) -> dict:
    from medfed.algorithms.fedavg import FedAvg

    n = args.overhead_sites
    params = make_params(args.params)
    names = site_names(n)
    job = make_job(n, tmp / "run-overhead")
    pki_dir = make_pki(tmp / "pki-overhead", n)
    port = free_port()
    hub, server, transport = start_hub(job, pki_dir, port)
    procs = []
    rows = []
    try:
        procs, _ = spawn_sites(ctx, f"127.0.0.1:{port}", pki_dir, [[s] for s in names], measure=False)
        wait_ready(hub, names, procs)
        algorithm = FedAvg()
        for rnd in range(args.repeats + 1):  # round 0: warm-up, not counted
            transport.encode_s = 0.0
            hub.uploads.clear()
            encoded: dict[str, float] = {}

            def phase(name, encoded=encoded):
                encoded[name] = transport.encode_s  # GrpcTransport._model time before each part

            cpu0, sites0 = resource.getrusage(resource.RUSAGE_SELF), processes_cpu_s(procs)
            params, t = full_round(job, transport, algorithm, params, rnd + 1, names, phase)
            cpu1, sites1 = resource.getrusage(resource.RUSAGE_SELF), processes_cpu_s(procs)
            t["server_cpu"] = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
            t["sites_cpu"] = sites1 - sites0
            fits = [u for u in hub.uploads if u["kind"] == "fit"]
            t["encode_fit"] = encoded["aggregate"]
            t["encode_eval"] = encoded["between rounds"] - encoded["evaluate"]
            t["up_check_max"] = max((u["check_s"] for u in fits), default=0.0)
            rows.append(t)
            print(f"  overhead round {rnd}{' (warm-up)' if rnd == 0 else ''}: total {t['total']:.2f} s "
                  f"(fit {t['fit']:.2f}, aggregate {t['aggregate']:.2f}, evaluate {t['evaluate']:.2f})", flush=True)
        hub.finish(grace=7.0)
    finally:
        server.stop(grace=1.0).wait(5.0)
        stop_processes(procs)
    return {"size": nbytes(params), "sites": n, "rows": rows[1:]}


def report_overhead(res: dict) -> list[str]:
    rows = res["rows"]
    tot = [r["total"] for r in rows]
    lines = [
        f"Model: {res['size'] / MB:.1f} MB; {res['sites']} echo sites, one site process each (all on the same "
        f"{os.cpu_count()} cores as the server); {len(rows)} rounds (+1 warm-up). No checkpoint is written (a deployed "
        "server also saves state.safetensors after each round).",
        "",
        "| part of the round | median s | min-max s |",
        "| --- | --- | --- |",
    ]
    for key, label in [("fit", "fit over the transport (send, 3 echo updates back, checks)"),
                       ("encode_fit", "  of which: server encode_model of the global model"),
                       ("up_check_max", "  of which: slowest update's checks after its upload"),
                       ("aggregate", "FedAvg aggregate"),
                       ("evaluate", "evaluate over the transport (new model sent, trivial answers)"),
                       ("encode_eval", "  of which: server encode_model of the new model"),
                       ("total", "**whole round**"),
                       ("server_cpu", "server process CPU time in the round (user + system, all threads), s"),
                       ("sites_cpu", "site processes' CPU time in the round (the same, all sites together), s")]:
        xs = [r[key] for r in rows]
        lines.append(f"| {label} | {median(xs):.3f} | {min(xs):.3f}-{max(xs):.3f} |")
    cpu = [r["server_cpu"] + r["sites_cpu"] for r in rows]
    lines += ["", f"Target < 1.5 s per round: {'met' if median(tot) < 1.5 else 'NOT met'} (median {median(tot):.2f} s). "
              f"Server and sites together used {median(cpu):.2f} CPU-seconds per round (median) of the "
              f"{os.cpu_count()} cores they share: at least {median(cpu) / os.cpu_count():.2f} s of wall time."]
    return lines


# --------------------------------------------------------------------------- 3. server memory


def memory_server(n_sites: int, n_params: int, rounds: int, pki_dir: str, port: int, tmp: str, out) -> None:
    """The server process of the memory benchmark: one fresh process per site count."""
    try:
        from medfed.algorithms.fedavg import FedAvg

        params = make_params(n_params)
        names = site_names(n_sites)
        job = make_job(n_sites, Path(tmp) / f"run-memory-{n_sites}")
        hub, server, transport = start_hub(job, Path(pki_dir), port)
        out.put({"listening": True})
        try:
            ready = hub.wait_ready(names, START_TIMEOUT)
            if len(ready) != n_sites:
                raise RuntimeError(f"only {len(ready)} of {n_sites} sites joined within {START_TIMEOUT:g} s")
            baseline, peak_before = rss_mb(), peak_rss_mb()
            # the highest RSS seen in each part of the round, sampled every 10 ms
            current, highest, stop = ["between rounds"], {}, threading.Event()

            def sample():
                while not stop.wait(0.01):
                    name = current[0]
                    highest[name] = max(highest.get(name, 0.0), rss_mb())

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            algorithm = FedAvg()
            times = []
            for rnd in range(1, rounds + 1):
                params, t = full_round(job, transport, algorithm, params, rnd, names,
                                       phase=lambda name: current.__setitem__(0, name))
                times.append(t)
            stop.set()
            sampler.join(5.0)
            peak = peak_rss_mb()
            hub.finish(grace=7.0)
        finally:
            server.stop(grace=1.0).wait(5.0)
        end = rss_mb()
        import ctypes  # how much of what stays resident is free memory that malloc keeps

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        out.put({"trimmed_mb": rss_mb(), "sites": n_sites, "model_mb": nbytes(params) / MB, "baseline_mb": baseline,
                 "peak_before_mb": peak_before, "peak_mb": peak, "end_mb": end, "times": times,
                 "phases": highest})
    except Exception as e:  # the parent reports it
        out.put({"error": f"{type(e).__name__}: {e}"})


def bench_memory(args, ctx, tmp: Path) -> list[dict]:
    counts = [int(x) for x in args.sites.split(",")]
    pki_dir = make_pki(tmp / "pki-memory", max(counts))
    res = []
    for n in counts:
        port = free_port()
        out = ctx.Queue()
        server = ctx.Process(target=memory_server, args=(n, args.params, args.rounds, str(pki_dir), port, str(tmp), out),
                             daemon=True)
        procs = [server]
        server.start()
        try:
            rec = drain(out, "server start", START_TIMEOUT)
            # ONE site process for all sites: one thread and one Connection per site. At most
            # 2 threads decode and encode at a time (2 cores), which bounds the memory of the
            # site process, not of the server: every site still downloads and uploads at once.
            sites, site_out = spawn_sites(ctx, f"127.0.0.1:{port}", pki_dir, [site_names(n)], measure=False,
                                          answer_slots=2)
            procs += sites
            rec = drain(out, "server result", START_TIMEOUT + 3 * ROUND_TIMEOUT * args.rounds)
            rec["site_peak_mb"] = drain(site_out, "site process result", 30.0).get("peak_mb", float("nan"))
            res.append(rec)
            grow = rec["peak_mb"] - rec["baseline_mb"]
            print(f"  memory {n} sites: baseline {rec['baseline_mb']:.0f} MB, peak {rec['peak_mb']:.0f} MB, "
                  f"peak - baseline {grow:.0f} MB = {grow / rec['model_mb']:.1f} model copies; round "
                  f"{median([t['total'] for t in rec['times']]):.1f} s", flush=True)
        finally:
            stop_processes(procs)
    return res


def report_memory(res: list[dict], rounds: int) -> list[str]:
    from medfed.transport.grpc.hub import UPDATES_IN_MEMORY

    lines = [
        f"Model: {res[0]['model_mb']:.1f} MB; {rounds} full rounds (fit + FedAvg + evaluate) per site count; a fresh "
        "server process per site count; all sites as threads of one site process (at most 2 of them decode or "
        "encode at a time). Peak = VmHWM of the server process (exact; not ru_maxrss, which a spawned process inherits from its parent); the per-part figures are RSS sampled every 10 ms by a thread "
        "of the server and can miss short spikes. The hub keeps the first "
        f"{UPDATES_IN_MEMORY} updates of a round in reused buffers and spools the others to temporary files (page "
        "cache, not in RSS), read back in parts when they are used; the site processes hold each site's last model "
        "and the buffers of the next one and of its update.",
        "",
        "| sites | server RSS before round 1, MB | server peak RSS, MB | peak - baseline, MB | in model copies | "
        "highest RSS - baseline during fit / aggregate / evaluate, MB | RSS after the rounds / after malloc_trim, MB | "
        "round s (median) | site process peak RSS, MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in res:
        grow = r["peak_mb"] - r["baseline_mb"]
        ph = " / ".join(f"{r['phases'].get(k, float('nan')) - r['baseline_mb']:.0f}" for k in ("fit", "aggregate", "evaluate"))
        lines.append(f"| {r['sites']} | {r['baseline_mb']:.0f} | {r['peak_mb']:.0f} | {grow:.0f} | "
                     f"{grow / r['model_mb']:.1f} | {ph} | {r['end_mb']:.0f} / {r['trimmed_mb']:.0f} | "
                     f"{median([t['total'] for t in r['times']]):.1f} | {r['site_peak_mb']:.0f} |")
    if len(res) >= 2:
        a, b = res[0], res[-1]
        slope = ((b["peak_mb"] - b["baseline_mb"]) - (a["peak_mb"] - a["baseline_mb"])) / (b["sites"] - a["sites"])
        lines += ["", f"Growth from {a['sites']} to {b['sites']} sites: {slope:.0f} MB per extra site "
                      f"({slope / a['model_mb']:.2f} model copies per site)."]
    return lines


# --------------------------------------------------------------------------- main


def machine() -> str:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = next(int(x.split()[1]) for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal"))
        mem_s = f"{mem / 1024 / 1024:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        mem_s = "?"
    import grpc
    import safetensors
    import torch

    return (f"{os.cpu_count()} cores ({cpu or platform.processor()}), {mem_s} RAM, Python {platform.python_version()}, "
            f"torch {torch.__version__}, grpcio {grpc.__version__}, safetensors {safetensors.__version__}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 2.5M-parameter model, sites 2,4, 3 repeats: under a minute")
    ap.add_argument("--repeats", type=int, default=None, help="transfers (throughput) and rounds (overhead); default 5")
    ap.add_argument("--sites", default=None, help="site counts of the memory benchmark; default 3,10,20,30")
    ap.add_argument("--params", type=int, default=None, help="model parameters (float32); default 25000000")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per site count (memory); default 3")
    ap.add_argument("--overhead-sites", type=int, default=3)
    ap.add_argument("--only", default="throughput,overhead,memory")
    args = ap.parse_args()
    quick = args.quick
    args.repeats = args.repeats or (3 if quick else 5)
    args.sites = args.sites or ("2,4" if quick else "3,10,20,30")
    args.params = args.params or (2_500_000 if quick else 25_000_000)
    args.rounds = args.rounds or (2 if quick else 3)
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    unknown = only - {"throughput", "overhead", "memory"}
    if unknown:
        ap.error(f"--only: unknown part(s) {sorted(unknown)}")

    ctx = mp.get_context("spawn")
    load0 = os.getloadavg()[0]
    out: dict[str, list[str]] = {}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="medfed-deploy-bench-") as tmp:
        if "throughput" in only:
            print(f"== 1. throughput, {args.params / 1e6:g}M parameters", flush=True)
            out["Transfer throughput on loopback"] = report_throughput(bench_throughput(args, ctx, Path(tmp)))
            print("\n".join(out["Transfer throughput on loopback"]) + "\n", flush=True)
        if "overhead" in only:
            print(f"== 2. round overhead, {args.params / 1e6:g}M parameters, {args.overhead_sites} sites", flush=True)
            out["Round overhead excluding training"] = report_overhead(bench_overhead(args, ctx, Path(tmp)))
            print("\n".join(out["Round overhead excluding training"]) + "\n", flush=True)
        if "memory" in only:
            print(f"== 3. server memory, {args.params / 1e6:g}M parameters, sites {args.sites}", flush=True)
            out["Server peak memory against the number of sites"] = report_memory(bench_memory(args, ctx, Path(tmp)),
                                                                                  args.rounds)
            print("\n".join(out["Server peak memory against the number of sites"]) + "\n", flush=True)

    cmd = "python benchmarks/deployment.py" + ("" if len(sys.argv) == 1 else " " + " ".join(sys.argv[1:]))
    print("----- Markdown for benchmarks/RESULTS.md -----\n")
    print(f"## Deployment transport: gRPC over mutual TLS on loopback ({date.today().isoformat()})\n")
    print(f"Command: `{cmd}` ({time.perf_counter() - t_start:.0f} s)\n")
    print(f"Machine: {machine()}. Load average (1 min) at the start {load0:.2f}, at the end {os.getloadavg()[0]:.2f}. "
          "Echo sites (no training); MB = 10^6 bytes.\n")
    for title, lines in out.items():
        print(f"### {title}\n")
        print("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
