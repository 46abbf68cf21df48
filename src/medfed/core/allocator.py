"""glibc's memory allocator, set for training loops.

Each batch of local training allocates and frees tensors of the same few sizes, many of
them above glibc's threshold for serving an allocation with its own ``mmap`` (128 KiB to
start, raised as blocks are freed). Depending on the order of those sizes, glibc keeps
handing the memory back to the kernel (``munmap``, or trimming the top of the heap) and
taking it again, and every page of it is faulted in anew: on the 2-core machine a plain
PyTorch FedAvg loop of 100 sites spent from 1 to 8 s of its 16-21 s in the kernel from one
run to the next, with 1.1 to 3.7 million page faults (benchmarks/RESULTS.md).

Fixing both thresholds (``mallopt``) keeps freed blocks below them in the process for
the next batch: tensors up to :data:`MMAP_THRESHOLD` come from the heap, and up to
:data:`TRIM_THRESHOLD` of free memory at its top is kept. Larger tensors (a big model's
parameters) are still mapped and returned at once. Results do not change, only where the
bytes live.

Left alone: other C libraries (macOS, Windows, musl), a process whose environment already
sets glibc's malloc (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
``GLIBC_TUNABLES``) or preloads another allocator (``LD_PRELOAD``), and
``MEDFED_MALLOC=default``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys
from collections.abc import Mapping

log = logging.getLogger("medfed")

MMAP_THRESHOLD = 32 << 20  # bytes: smaller blocks come from the heap and are reused
TRIM_THRESHOLD = 128 << 20  # bytes of free memory kept at the top of the heap
OFF_SWITCH = "MEDFED_MALLOC"  # "default": leave glibc's allocator as it is
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)

_done: bool | None = None  # once per process


def why_not_tuned(environ: Mapping[str, str] | None = None) -> str | None:
    """Why the allocator is left as it is (None: it is tuned): the switch, the user's own
    settings, or a C library other than glibc."""
    env = os.environ if environ is None else environ
    if env.get(OFF_SWITCH, "").strip().lower() == "default":
        return f"{OFF_SWITCH}=default"
    own = [k for k in USER_SETTINGS if env.get(k)]
    if own:
        return f"the environment sets {', '.join(own)}"
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return "the C library is not glibc"
    return None


def as_environment() -> dict[str, str]:
    """The same thresholds as glibc's environment variables, for a process medfed does not
    start itself (a plain loop measured beside medfed, benchmarks/)."""
    return {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}


def tune_allocator() -> bool:
    """Fix glibc's mmap and trim thresholds for this process (see the module's docstring);
    True when they are set now or were set before. Idempotent; never raises."""
    global _done
    if _done is not None:
        return _done
    reason = why_not_tuned()
    if reason is not None:
        log.debug("memory allocator left as it is: %s", reason)
        _done = False
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        _done = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    except (OSError, AttributeError) as e:
        log.debug("memory allocator left as it is: %s", e)
        _done = False
    return _done
