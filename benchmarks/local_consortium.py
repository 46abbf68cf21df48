"""A consortium on 127.0.0.1 for the deployment benchmarks (reconnect.py, attacks.py): kits
for a server and three sites, and the quick-start job made small (16x16 pixels, 160, 120
and 200 training images) so that a round takes about a second."""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Any

SITES = ("hospital_a", "hospital_b", "hospital_c")
CLI = [sys.executable, "-c", "from medfed.cli import main; main()"]  # a medfed command in a child process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_kits(folder: Path, name: str = "bench") -> tuple[Path, int]:
    """Kits for a server on 127.0.0.1 (a free port) and :data:`SITES`: (kits folder, port)."""
    import yaml

    from medfed.transport.pki import provision

    port = free_port()
    cons = folder / "consortium.yaml"
    cons.write_text(yaml.safe_dump({"name": name, "server": {"host": "127.0.0.1", "port": port},
                                    "sites": list(SITES)}))
    provision(cons, folder / "kits")
    return folder / "kits", port


def small_job(path: Path, output: Path, **settings: Any) -> Path:
    """The quick-start job, small, one thread per process, no baselines; ``settings``
    (``rounds``, ``round_timeout``, ``min_sites``...) replace the job's own. Written to
    ``path``."""
    import yaml

    from medfed.config import builtin_job_path

    raw = yaml.safe_load(builtin_job_path("quickstart").read_text())
    raw.update({"output": str(output), "threads": 1, "compare": [], **settings})
    raw.pop("finetune_epochs", None)
    raw["data"]["image_size"] = 16
    for site, n in zip(raw["data"]["sites"], (160, 120, 200)):
        site.update(n_train=n, n_val=20, n_test=20)
    path.write_text(yaml.safe_dump(raw))
    return path
