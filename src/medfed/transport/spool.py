"""A round's updates held by a simulation's server: in memory up to a budget, past it on disk.

The round loop aggregates once every drawn site has answered, so a server that kept every
update in memory would grow with the number of sites drawn (50 sites of a 3D U-Net of 20 M
parameters: 4 GB). As the deployment hub does (transport/grpc/intake.py), the simulation
transports (in-process, process pool, Ray) keep a round's updates in memory up to
:data:`UPDATES_BUDGET` bytes of tensors; every update past it is written, as it arrives, to
an anonymous temporary file (gone when closed, or when the process ends) and its tensors are
read back a part at a time when used (core/payload.FileTensors): the server's checks and
the weighted mean go through them with buffers of bounded size. The values are the same
bit for bit, so the metrics of a run do not depend on the budget.

``MEDFED_UPDATES_BUDGET`` (bytes; ``0`` spools every update) sets the budget for a run.
"""

from __future__ import annotations

import os
import tempfile

from medfed.core import codec
from medfed.core.errors import ConfigError
from medfed.core.params import nbytes
from medfed.core.types import Update

__all__ = ["UPDATES_BUDGET", "Spool", "budget_from_environment"]

UPDATES_BUDGET = 512 << 20  # bytes of update tensors a round keeps in memory before spooling the rest
ENVIRONMENT = "MEDFED_UPDATES_BUDGET"


def budget_from_environment() -> int:
    """The budget ``MEDFED_UPDATES_BUDGET`` sets, or :data:`UPDATES_BUDGET`."""
    raw = os.environ.get(ENVIRONMENT, "").strip()
    if not raw:
        return UPDATES_BUDGET
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError(f"{ENVIRONMENT}={raw!r}: expected a number of bytes, 0 or more (0 spools every update)")
    return value


class Spool:
    """One call's updates: each kept as it is while the bytes kept fit ``budget``, the rest
    written to temporary files (see the module's text). One per batch of answers."""

    def __init__(self, budget: int | None = None):
        self.budget = budget_from_environment() if budget is None else budget
        self.held = 0  # bytes of tensors kept in memory
        self.spooled = 0  # updates written to files

    def _fits(self, size: int) -> bool:
        if self.held + size <= self.budget:
            self.held += size
            return True
        return False

    def update(self, update: Update) -> Update:
        """``update`` as it is, or read back from a file it was written to."""
        if self._fits(nbytes(update.params) + nbytes(update.extras)):
            return update
        return self._to_file(codec.encode_update(update))

    def blob(self, blob: bytes | bytearray | memoryview) -> Update:
        """An update sent as the codec's bytes, decoded in memory or from a file (a
        malformed one: the codec's error)."""
        if self._fits(memoryview(blob).nbytes):
            return codec.decode_update(blob)
        return self._to_file(blob)

    def _to_file(self, blob: bytes | bytearray | memoryview) -> Update:
        f = tempfile.TemporaryFile(prefix="medfed-update-")
        try:
            f.write(blob)
            f.flush()
            update = codec.read_update_file(f, memoryview(blob).nbytes)
        except BaseException:
            f.close()
            raise
        self.spooled += 1
        return update
