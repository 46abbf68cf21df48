"""Which folder the dashboard reads, as a run goes on.

A simulation (``medfed run``) builds its run in a hidden staging folder beside the output,
``.<name>.partial-<pid>`` (server/runner.make_staging), and moves it into place when it is
complete; a failed run removes it. A deployment (``medfed server``) writes its output folder
directly (``state.sqlite`` first). So the dashboard is given the output folder (or a staging
folder) and, every time it reads, follows the run:

* a staging folder of that output whose process is alive: the run in progress (also when an
  older run sits at the output, to be replaced with ``--overwrite``);
* else the output folder, if it holds a run;
* else a staging folder left behind by a process that is gone (a run that was killed).

A folder that is none of these is refused at start (:func:`check_run_folder`) with what to do.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from medfed.core.errors import RunDirError
from medfed.server.store import STORE_NAME

MARKERS = ("job.yaml", "metrics.jsonl", "run.json", STORE_NAME)  # any of them: a run folder
WATCHED = ("job.yaml", "sites.json", "metrics.jsonl", "run.json", "run.log", "audit.json", STORE_NAME,
           STORE_NAME + "-wal")
_STAGING = re.compile(r"^\.(?P<name>.+)\.partial-(?P<pid>\d+)$")


def is_run(folder: Path) -> bool:
    """Whether ``folder`` holds any of the files a run folder starts with."""
    return folder.is_dir() and any((folder / m).is_file() for m in MARKERS)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


@dataclass(frozen=True)
class Where:
    """Where the run is now: ``folder`` (None: nowhere, the run is gone), whether it is a
    staging folder, and the pid of the process writing it (staging only) and whether it lives."""

    folder: Path | None
    staging: bool = False
    pid: int | None = None
    alive: bool = False


class RunSource:
    """The run of one output folder, followed from its staging folder into place.

    ``path`` is the output folder a run writes (``medfed run -o PATH``, the job's ``output``)
    or one of its ``.<name>.partial-<pid>`` staging folders."""

    def __init__(self, path: Path):
        path = Path(path).absolute()
        m = _STAGING.match(path.name)
        self.output = path.parent / m["name"] if m else path
        self.given = path

    def stagings(self) -> list[tuple[Path, int]]:
        """The staging folders of the output, newest first, with their pids."""
        found = []
        try:
            entries = list(self.output.parent.iterdir())
        except OSError:
            return []
        for entry in entries:
            m = _STAGING.match(entry.name)
            if m and m["name"] == self.output.name and entry.is_dir():
                try:
                    found.append((entry.stat().st_mtime, entry, int(m["pid"])))
                except OSError:
                    continue
        return [(p, pid) for _, p, pid in sorted(found, key=lambda t: t[0], reverse=True)]

    def where(self) -> Where:
        """Where the run is now (see the module's docstring for the order)."""
        stagings = self.stagings()
        for folder, pid in stagings:
            if pid_alive(pid) and is_run(folder):
                return Where(folder, True, pid, True)
        if is_run(self.output):
            return Where(self.output)
        for folder, pid in stagings:
            if is_run(folder):
                return Where(folder, True, pid, False)
        return Where(None)


def check_run_folder(path: Path) -> RunSource:
    """The source of ``path``, or RunDirError saying why it is not a run and what to pass."""
    source = RunSource(path)
    if source.where().folder is not None:
        return source
    shown = source.given
    if not shown.exists():
        raise RunDirError(
            f"'{shown}' does not exist, and no run is being written there (no staging folder "
            f"'.{source.output.name}.partial-*' beside it); pass the output folder of a run (`medfed run -o`, "
            "or the job's output; a deployment's run folder) once its run has started")
    if not shown.is_dir():
        raise RunDirError(f"'{shown}' is a file, not a run folder; pass the folder a run writes")
    runs = []
    try:
        runs = sorted(p.name for p in shown.iterdir() if is_run(p))
    except OSError as e:
        raise RunDirError(f"'{shown}' cannot be read: {e.strerror or e}") from None
    hint = f"; it holds run folders ({', '.join(runs[:5])}{', ...' if len(runs) > 5 else ''}): pass one of them" \
        if runs else "; pass the output folder of a run (`medfed run -o`, or a deployment's run folder)"
    raise RunDirError(f"'{shown}' is not a run folder: it holds none of {', '.join(MARKERS)}{hint}")


def stamp(where: Where) -> str:
    """A short digest of the state of the watched files (size, time, inode) and of where the
    run is: it changes whenever the run writes something the dashboard shows."""
    h = hashlib.sha256(f"{where.folder}|{where.alive}".encode())
    if where.folder is not None:
        for name in WATCHED:
            try:
                st = (where.folder / name).stat()
            except OSError:
                h.update(b"-")
                continue
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino};".encode())
    return h.hexdigest()[:16]
