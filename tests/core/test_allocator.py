"""glibc's allocator set for training: when it is left alone, and that it stops the page faults."""

import os
import platform
import subprocess
import sys

import pytest

from medfed.core.allocator import OFF_SWITCH, USER_SETTINGS, why_not_tuned

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# tensors of slowly growing sizes, each allocated, written and freed: with glibc's own
# thresholds every one is mapped anew and its pages faulted in; set, the heap reuses them
PATTERN = """
import resource, sys, torch
from medfed.site.device import set_threads
set_threads(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(40):
    t = torch.empty((5 << 20) // 4 + 1024 * i, dtype=torch.float32)
    t.fill_(1.0)
    del t
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(**env: str) -> int:
    clean = {k: v for k, v in os.environ.items() if k not in (*USER_SETTINGS, OFF_SWITCH)}
    out = subprocess.run([sys.executable, "-c", PATTERN], env={**clean, **env}, capture_output=True, text=True,
                         timeout=120, check=True)
    return int(out.stdout.strip())


@pytest.mark.parametrize("env,reason", [
    ({"MEDFED_MALLOC": "default"}, "MEDFED_MALLOC=default"),
    ({"MEDFED_MALLOC": " Default "}, "MEDFED_MALLOC=default"),
    ({"MALLOC_MMAP_THRESHOLD_": "65536"}, "MALLOC_MMAP_THRESHOLD_"),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}, "GLIBC_TUNABLES"),
    ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, "LD_PRELOAD"),
])
def test_the_switch_and_the_users_own_settings_leave_the_allocator_alone(env, reason):
    assert reason in why_not_tuned(env)


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator is tuned on Linux with glibc only")
def test_a_clean_environment_on_glibc_is_tuned():
    assert why_not_tuned({"MEDFED_MALLOC": "", "PATH": "/usr/bin"}) is None


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator is tuned on Linux with glibc only")
def test_tuned_process_stops_faulting_pages_in_anew():
    tuned, default = _faults(), _faults(MEDFED_MALLOC="default")
    # 40 tensors of 5 MiB: about 1,300 pages each when mapped anew, about one tensor's worth when reused
    assert default > 40 * 1000
    assert tuned < default / 3
