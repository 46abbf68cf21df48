"""Tensors gone through in parts, in memory or on disk.

The server holds some updates as files (transport/grpc/hub.py spools them) and checks and
averages every update a part at a time, so that its memory stays at a few parts whatever
the number of sites. :class:`PartedTensors` is a mapping of tensors that can give part of
a tensor without loading it whole (core/codec.py's ``FileTensors`` reads a safetensors
file); :func:`describe`, :func:`flat_slice` and :func:`flat_slices` serve it and plain dicts alike.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Iterator, Mapping

import torch


class PartedTensors(Mapping):
    """Tensors whose shapes are known without reading them, and which can be read in parts.
    ``finite`` keeps what a check found per name (the tensors cannot change)."""

    finite: dict[str, bool]

    @abstractmethod
    def describe(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) of a tensor, without reading it."""

    @abstractmethod
    def flat_slice(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements ``start:stop`` of the flattened tensor ``name`` (into ``out`` when given,
        a 1-D tensor of the right dtype and length)."""


SLICE = 1 << 18  # elements per part when a large tensor is gone through in parts (a float64 part fits in cache)


def describe(params: Mapping[str, torch.Tensor], name: str) -> tuple[tuple[int, ...], torch.dtype]:
    """(shape, dtype) of ``params[name]``; read from the header for a file."""
    if isinstance(params, PartedTensors):
        return params.describe(name)
    t = params[name]
    return tuple(t.shape), t.dtype


def flat_slice(params: Mapping[str, torch.Tensor], name: str, start: int, stop: int,
          out: torch.Tensor | None = None) -> torch.Tensor:
    """Elements ``start:stop`` of the flattened ``params[name]``: a view of an in-memory
    tensor, or read from a file (into ``out`` when given: 1-D, of that length and dtype)."""
    if isinstance(params, PartedTensors):
        return params.flat_slice(name, start, stop, out)
    return params[name].reshape(-1)[start:stop]


def flat_slices(params: Mapping[str, torch.Tensor], name: str, size: int = SLICE) -> Iterator[torch.Tensor]:
    """The flattened tensor ``params[name]`` in consecutive parts of at most ``size``
    elements: views of an in-memory tensor, or reads into one reused buffer for a file
    (each part is valid until the next one is produced)."""
    shape, dtype = describe(params, name)
    count = math.prod(shape)
    buf = torch.empty(min(size, count), dtype=dtype) if isinstance(params, PartedTensors) else None
    for start in range(0, count, size):
        stop = min(start + size, count)
        yield flat_slice(params, name, start, stop, None if buf is None else buf[: stop - start])
