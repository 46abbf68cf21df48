"""Buffers for payloads of a model's size, reused instead of allocated anew."""

from __future__ import annotations

import sys
import threading

ROUND_UP = 1 << 20  # buffer sizes are rounded up to this: room for a payload a little larger


class BufferPool:
    """Large buffers reused from one payload to the next (models and updates received or
    encoded every round).

    Fresh memory costs the kernel a page fault and a zeroed page for every 4 KiB, which
    slows a transfer into it markedly (benchmarks/deployment.py: ``wire.gather`` into a
    fresh buffer against a reused one); a buffer used before is already in place. A buffer is
    handed out as a memoryview of the payload's length and handed out again only once
    nothing else refers to it (no memoryview, tensor or array made from it is alive), so
    reuse never overwrites data in use. At most ``keep`` buffers are kept."""

    def __init__(self, keep: int):
        self.keep = keep
        self._buffers: list[bytearray] = []
        self._lock = threading.Lock()

    def _idle(self, i: int) -> bool:
        # the only references: the pool's list and getrefcount's argument
        return sys.getrefcount(self._buffers[i]) <= 2

    def take(self, size: int) -> memoryview:
        with self._lock:
            for i in range(len(self._buffers)):
                if len(self._buffers[i]) >= size and self._idle(i):
                    return memoryview(self._buffers[i])[:size]
            buf = bytearray(-(-size // ROUND_UP) * ROUND_UP or ROUND_UP)  # room for payloads a little larger
            if len(self._buffers) < self.keep:
                self._buffers.append(buf)
            else:  # make room by dropping an idle buffer (too small for this payload)
                idle = [i for i in range(len(self._buffers)) if self._idle(i)]
                if idle:
                    self._buffers[idle[0]] = buf
            return memoryview(buf)[:size]
