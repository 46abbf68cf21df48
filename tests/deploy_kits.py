"""Helpers for deployment tests: a provisioned consortium on 127.0.0.1, and processes."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from medfed.transport.pki import provision

SITES = ("hospital_a", "hospital_b", "hospital_c")
CLI = [sys.executable, "-c", "from medfed.cli import main; main()"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_kits(folder: Path, sites=SITES, port: int | None = None) -> tuple[Path, int]:
    """Kits for a server on 127.0.0.1 and ``sites``; returns (kits folder, port)."""
    port = port or free_port()
    cons = folder / "consortium.yaml"
    cons.write_text(yaml.safe_dump({"name": "test", "server": {"host": "127.0.0.1", "port": port},
                                    "sites": list(sites)}))
    provision(cons, folder / "kits")
    return folder / "kits", port


def start(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A medfed command in its own process, its output in ``log``; ``env``: its environment
    (default: this process's)."""
    with open(log, "wb") as f:
        return subprocess.Popen([*CLI, *args], stdout=f, stderr=subprocess.STDOUT, env=env)


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


def stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
