"""Folders a run writes into before renaming them into place, and the removal of those a killed run left.

A run removes its own unfinished folders on the way out, Ctrl-C and SIGTERM included. SIGKILL (the
out-of-memory killer, a CI runner's hard timeout) gives it no way out, and an export or a staged
artifact can hold gigabytes. So each such folder holds a lock file that its process keeps locked
(flock) while it lives; the kernel drops the lock when the process dies, however it dies. Creating a
folder first removes every sibling of the same prefix whose lock nobody holds any more. A folder
without a lock file (another tool's, or one being created or sealed this instant) is left alone.

Replacing a published folder (`replace`) moves the old one aside as `.retired-*` under a lock of its
own, so a swap killed halfway leaves a folder the next swap in the same place removes.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK = ".converter.lock"
RETIRED = ".retired-"
_held: dict[Path, int] = {}  # folder -> the descriptor holding its lock


@contextmanager
def folder(parent: Path, prefix: str, mode: int = 0o700) -> Iterator[Path]:
    """A new folder `parent/<prefix>XXXX`, locked while this process lives and removed on exit (unless
    it was renamed into place: call seal() first, so the lock file does not travel with it)."""
    parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(parent, prefix)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        path.chmod(mode)
        _lock(path)
        yield path
    finally:
        _release(path)
        shutil.rmtree(path, ignore_errors=True)


def _lock(path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".lock-", dir=path)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.rename(tmp, path / LOCK)  # visible under its name only once locked: a sweeper cannot win the race
    _held[path] = fd


def replace(staging: Path, final: Path) -> None:
    """Rename the staging folder to `final`, replacing a folder already there.

    The old folder is renamed aside (`.retired-<name>-<pid>`) and locked, the new one renamed into
    place, then the old one removed. `final` names a complete folder, old or new, at every moment but
    the one between the two renames. A swap killed before the removal leaves a retired folder that the
    next `replace` into the same parent removes (unless it died in the instant between moving the old
    folder aside and locking it: a folder without a lock is never removed).
    """
    seal(staging)
    remove_abandoned(final.parent, RETIRED)
    if not final.exists():
        staging.rename(final)
        return
    retired = final.with_name(f"{RETIRED}{final.name}-{os.getpid()}")
    final.rename(retired)
    _lock(retired)
    staging.rename(final)
    shutil.rmtree(retired, ignore_errors=True)
    _release(retired)


def seal(path: Path) -> None:
    """Drop the lock file of `path` before it is renamed into place (it is ours until then)."""
    lock = path / LOCK
    if lock.exists():
        lock.unlink()
    _release(path)


def _release(path: Path) -> None:
    fd = _held.pop(path, None)
    if fd is not None:
        os.close(fd)


def remove_abandoned(parent: Path, prefix: str) -> list[Path]:
    """Remove the folders `parent/<prefix>*` whose lock no process holds. Returns those removed."""
    removed = []
    for candidate in sorted(parent.glob(f"{prefix}*")):
        try:
            fd = os.open(candidate / LOCK, os.O_RDONLY)
        except OSError:  # no lock file, or not ours to read
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a live run holds it
            os.close(fd)
            continue
        try:
            shutil.rmtree(candidate, ignore_errors=True)
        finally:
            os.close(fd)
        if not candidate.exists():
            removed.append(candidate)
    if removed:
        from converter.progress import warn

        warn(f"removed {len(removed)} unfinished folder(s) left in {parent} by a killed run: "
             + ", ".join(p.name for p in removed))
    return removed
