"""Files of a run folder, each written atomically.

Every file is written the same way (:func:`replacing`): into a temporary file created next
to it under a random name (``O_CREAT | O_EXCL``, so an existing file or a planted link is
never written through), flushed to disk, then moved over the target with ``os.replace``; a
reader sees the old file or the new one, never half of one, and a failed write leaves no
temporary file behind.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PRIVATE = 0o600  # files only the run's user may read: the audit trail and what is exported from it


def _create_beside(path: Path, mode: int) -> tuple[int, Path]:
    """A new, empty file in ``path``'s folder under a random name, open for writing, with
    ``mode`` (less the umask). Like ``tempfile.mkstemp``, but with the mode of our choosing."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            return os.open(tmp, flags, mode), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name next to '{path}' after 100 tries")


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (some file systems cannot open a folder: skipped)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def replacing(path: Path, mode: int = 0o666) -> Iterator[Path]:
    """Yield a fresh temporary file next to ``path`` for the caller to fill (by its name);
    on success it is fsynced and moved over ``path``, on any error removed.

    ``mode`` is the new file's permission bits before the umask: 0o666 (the default) gives
    what ``open`` would, :data:`PRIVATE` a file only its owner can read."""
    path = Path(path)
    fd, tmp = _create_beside(path, mode)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def atomic_write_text(path: Path, text: str, mode: int = 0o666) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically; see :func:`replacing` for ``mode``."""
    with replacing(path, mode) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o666, durable: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (readers see the old file or the whole new one);
    see :func:`replacing` for ``mode``. ``durable: False`` skips the fsyncs, for files that
    are checked when read and rebuilt when damaged (a cache)."""
    if durable:
        with replacing(path, mode) as tmp:
            tmp.write_bytes(data)
        return
    path = Path(path)
    fd, tmp = _create_beside(path, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


BUNDLE_CODE_FOLDERS = ("configs", "scripts")  # what of a MONAI Bundle runs: its configs and its Python


def bundle_sha256(folder: Path) -> str:
    """The SHA-256 of a MONAI Bundle's code-bearing files: every file under its
    ``configs/`` and ``scripts/`` folders (``__pycache__`` left out), by relative path and
    content, in sorted order. Its weights (``models/``) and outputs do not count.
    OSError as ``open``; a file that is not regular (a link to outside) counts by its target."""
    import hashlib

    h = hashlib.sha256()
    for part in BUNDLE_CODE_FOLDERS:
        root = folder / part
        if not root.is_dir():
            continue
        files = sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        for f in files:
            rel = f.relative_to(folder).as_posix()
            h.update(f"{len(rel)}:{rel}:".encode())
            h.update(sha256_file(f).encode())
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's content, in hex, read in 1 MiB parts (OSError as ``open``)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for part in iter(lambda: f.read(1 << 20), b""):
            h.update(part)
    return h.hexdigest()
