"""The disk cache of preprocessed examples (``data.cache: disk``), on MONAI's
:class:`~monai.data.PersistentDataset`.

Each example is stored once, under a key that hashes what it was made from: the reader
and its settings, each file's path, size and modification time (in nanoseconds), and the
preprocessing (:attr:`Pipeline.key <medfed.data.stream.Pipeline.key>`). A changed file
or step gives another key, so a stale entry is never read; old entries stay until the
folder is cleared. An entry starts with a SHA-256 digest of its contents, checked on every
read: a damaged entry (a disk error, a write cut short) is logged, deleted and rebuilt.
Entries are written atomically and private to the site's user (files 0600, folders
0700): they hold patient images. They are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
from monai.data import PersistentDataset
from monai.transforms import Transform

from medfed.core.errors import DataError
from medfed.core.files import PRIVATE, atomic_write_bytes
from medfed.data.base import Entry

log = logging.getLogger("medfed")

MAGIC = b"MEDFEDC1"  # format of an entry: MAGIC, SHA-256 of the payload, torch.save payload
_DIGEST = 32


def entry_key(entry: Entry, pipeline_key: str) -> bytes:
    """The cache key of ``entry``: a hex SHA-256 (as bytes, as MONAI's ``hash_func``
    returns) of the pipeline's key, the entry's type and settings, and the path, size and
    modification time of every file it reads. Raises OSError for a file that is gone."""
    h = hashlib.sha256()
    h.update(pipeline_key.encode())
    settings = [(f.name, repr(getattr(entry, f.name))) for f in fields(entry) if f.name != "target"] \
        if is_dataclass(entry) else [("name", entry.name)]
    h.update(repr((type(entry).__name__, settings)).encode())
    for file in entry.files():
        st = os.stat(file)
        h.update(f"\0{file}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest().encode()


def site_folder(root: Path, site: str) -> Path:
    """Where the entries of ``site``'s examples are kept under the cache ``root``."""
    return Path(root) / (site or "all")


def prepare_cache_dir(root: Path, site: str) -> Path:
    """:func:`site_folder` created (0700) and checked writable; a DataError naming the
    folder and what to do otherwise."""
    target = site_folder(root, site)
    try:
        target.mkdir(parents=True, exist_ok=True, mode=0o700)
        probe = target / f".write-check-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise DataError(
            f"site '{site}': cannot write the disk cache in '{target}' ({e.strerror or e}); give a folder this "
            "user may write as data.cache_dir, or set data.cache: none (read the files every epoch) or memory"
        ) from None
    return target


def _encode(item: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(item, buf)
    payload = buf.getvalue()
    return MAGIC + hashlib.sha256(payload).digest() + payload


def _decode(blob: bytes) -> dict[str, Any] | None:
    """The stored item, or None when the blob is not a whole, undamaged entry."""
    head = len(MAGIC) + _DIGEST
    if len(blob) < head or blob[: len(MAGIC)] != MAGIC:
        return None
    payload = blob[head:]
    if hashlib.sha256(payload).digest() != blob[len(MAGIC) : head]:
        return None
    try:
        item = torch.load(io.BytesIO(payload), weights_only=True)
    except Exception:  # a payload that digests right but does not load: treat as damaged
        return None
    return item if isinstance(item, dict) else None


class _Deterministic(Transform):
    """A plain function as a MONAI transform: PersistentDataset caches what deterministic
    transforms produce (a plain callable counts as random)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, data):
        return self.fn(data)


class DiskCache(PersistentDataset):
    """The examples of ``entries``, prepared by ``transform`` (a
    :class:`~medfed.data.stream.Pipeline`) once and then read from the cache under
    ``root``, in each entry's site folder (:func:`site_folder`, made by
    :func:`prepare_cache_dir` when the site's data is built)."""

    def __init__(self, entries: list[Entry], transform, root: Path, pipeline_key: str):
        super().__init__(
            data=entries, transform=_Deterministic(transform), cache_dir=root, hash_func=lambda e: entry_key(e, pipeline_key),
        )

    def _cachecheck(self, item_transformed: Entry) -> dict[str, Any]:
        entry = item_transformed
        if not entry.files():  # an example held in memory: nothing on disk to key it by
            return self._pre_transform(entry)
        try:
            key = self.hash_func(entry).decode()
        except OSError:  # the file is gone: the pipeline reads it and names it unreadable
            return self._pre_transform(entry)
        path = site_folder(Path(self.cache_dir), getattr(entry, "site", "")) / f"{key}.pt"
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            blob = None
        except OSError as e:
            raise DataError(f"disk cache entry '{path}' of '{entry.name}' cannot be read ({e.strerror or e})") from None
        if blob is not None:
            item = _decode(blob)
            if item is not None:
                return item
            log.warning("disk cache entry '%s' of '%s' is damaged; rebuilt from its files", path, entry.name)
            path.unlink(missing_ok=True)
        item = self._pre_transform(entry)
        if "image" in item:  # an unreadable file is never cached: it is tried again next time
            try:
                atomic_write_bytes(path, _encode(item), mode=PRIVATE, durable=False)
            except OSError as e:
                log.warning("disk cache entry '%s' could not be written (%s); the example is used uncached",
                            path, e.strerror or e)
        return item
