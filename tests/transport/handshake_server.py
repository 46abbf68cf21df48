"""A medfed gRPC server in its own process that watches its refused TLS handshakes (the
watch takes the process's fd 2, so it is tested in a process of its own); run by
test_handshakes.py: ``python handshake_server.py KITS PORT FOLDER``. It writes READY on
stdout once serving, a few ordinary lines on stderr around its life, and stops when its
stdin closes; run.log and state.sqlite are in FOLDER."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from medfed.transport.grpc.handshakes import stop_watching, watch_refused_handshakes

watch = watch_refused_handshakes()  # before anything imports gRPC, as `medfed server` does

from medfed.config import builtin_job_path, load_job  # noqa: E402
from medfed.server.runner import close_run_log, open_run_log  # noqa: E402
from medfed.server.store import RunStore  # noqa: E402
from medfed.transport.grpc import wire  # noqa: E402
from medfed.transport.grpc.hub import Hub  # noqa: E402
from medfed.transport.grpc.transport import start_server  # noqa: E402
from medfed.transport.pki import load_kit  # noqa: E402


def main() -> None:
    kits, port, folder = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    assert watch is not None and (watch.own_trace or os.environ.get("GRPC_TRACE")), "the watch should have turned gRPC's handshaker tracer on"
    handler = open_run_log(folder)
    store = RunStore(folder / "state.sqlite")
    job = load_job(builtin_job_path("quickstart")).model_copy(update={"output": folder / "run"})
    hub = Hub(job, "job-under-test", store)
    kit = load_kit(kits / "server", role="server")
    server = start_server(hub, f"127.0.0.1:{port}", wire.server_credentials(kit.ca_pem, kit.cert_pem, kit.key_pem), 3)
    print("ordinary output before", file=sys.stderr, flush=True)
    os.write(2, b"written to fd 2 directly\n")
    print("READY", flush=True)
    sys.stdin.read()  # until the test closes it
    print("ordinary output after", file=sys.stderr, flush=True)
    sys.stderr.write("an unfinished line")  # no line break: the relay forwards it all the same
    sys.stderr.flush()
    server.stop(0).wait(5)
    stop_watching()  # the counts held back are told (and audited) before the store closes
    store.close()
    close_run_log(handler)


if __name__ == "__main__":
    main()
