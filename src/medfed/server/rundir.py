"""The run folder of a simulated run: the checks on the output folder, the hidden staging
folder a run is built in, moving the finished run into place, and finding a run that was
stopped (killed, power loss, Ctrl-C) to continue it (``medfed run --resume``).

A run is built in ``.<name>.partial-<pid>`` next to its output folder and moved into place
only when everything, report included, is written. A run that fails leaves the output
folder as it was; a run that is killed, stopped or fails after a round was saved leaves its
staging folder, with the rounds it completed, for ``--resume`` to take over.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from medfed.core.errors import RunDirError

RUN_MARKER = "run.json"
PARTIAL = ".partial-"  # ``.<name>.partial-<pid>``: a run being built, or one that was stopped


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse an output folder that already holds something, unless ``overwrite`` and it
    holds a run medfed wrote (its ``run.json`` marker): medfed never replaces a folder of
    the user's own files."""
    if output.exists() and not output.is_dir():
        raise RunDirError(f"output '{output}' exists and is not a folder")
    if not output.is_dir() or not any(output.iterdir()):
        return
    if not (output / RUN_MARKER).is_file():
        hint = ("--overwrite replaces only a run folder medfed wrote (one with run.json); choose a new output "
                "folder" if overwrite else "choose another output")
        raise RunDirError(f"output folder '{output}' already holds files that are not a medfed run; {hint}")
    if not overwrite:
        raise RunDirError(
            f"output folder '{output}' already holds a run; choose another output or pass --overwrite"
        )


def check_replaceable(output: Path) -> None:
    """Refuse to replace the current folder, the home folder, or a folder above either: a
    run's output is moved into place over the old folder, so it must be a folder of its own
    (``-o .`` or ``-o ~`` would otherwise take everything in it)."""
    output = output.resolve()
    protected = {Path.cwd().resolve(), Path.home().resolve()}
    for p in list(protected):
        protected.update(p.parents)
    if output in protected or output == Path(output.anchor):
        raise RunDirError(
            f"output '{output}' is the current folder, the home folder or a folder above them; a run replaces "
            "its output folder, so name a new folder for it (e.g. -o runs/my-run)"
        )


def make_staging(output: Path, what: str) -> Path:
    """A fresh, empty hidden folder next to ``output`` to build it in (see
    :func:`move_into_place`); a RunDirError naming ``what`` and ``output`` when it cannot
    be made."""
    staging = output.parent / f".{output.name}{PARTIAL}{os.getpid()}"
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    except OSError as e:
        raise RunDirError(f"cannot create {what} '{output}': {e.strerror or e}") from None
    return staging


def move_into_place(staging: Path, output: Path) -> None:
    """Put the finished run at ``output``, replacing what is there only if it is a run
    (checked again: the folder may have changed while the job ran)."""
    if output.exists():  # check_output let it through: empty, or a run with overwrite=True
        check_replaceable(output)
        if output.is_dir() and any(output.iterdir()) and not (output / RUN_MARKER).is_file():
            raise RunDirError(f"output folder '{output}' received files that are not a medfed run while the job "
                              f"ran; nothing was replaced, and the finished run is left in '{staging}'")
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        os.replace(output, old)
        os.replace(staging, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, output)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def stopped_runs(output: Path) -> list[Path]:
    """The staging folders of runs into ``output`` that stopped before they finished (their
    process is gone), newest first. RunDirError when a run into ``output`` is still going."""
    prefix = f".{output.name}{PARTIAL}"
    found = []
    for p in output.parent.glob(f"{prefix}*"):
        pid = p.name[len(prefix):]
        if not pid.isdigit() or not p.is_dir() or int(pid) == os.getpid():
            continue
        if _alive(int(pid)):
            raise RunDirError(f"a run into '{output}' is still going on (process {pid}, folder '{p}'); wait for it "
                              "or stop it first")
        found.append(p)
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def take_over(output: Path) -> Path:
    """The staging folder of the run into ``output`` that stopped last, renamed as this
    process's own; RunDirError when there is none."""
    stopped = stopped_runs(output)
    if not stopped:
        raise RunDirError(f"nothing to resume for '{output}': no stopped run of it ('.{output.name}{PARTIAL}*') "
                          f"next to it; start without --resume")
    staging = output.parent / f".{output.name}{PARTIAL}{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.replace(stopped[0], staging)
    return staging
