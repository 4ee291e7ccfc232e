"""Writing a file all at once: what every artifact dens leaves behind (checkpoints, CSVs, the cache, the
report) is written through, so that a reader, or a run killed half-way, never sees half a file.

A run killed mid-write leaves its temporary behind (``.NAME.PID.THREAD.tmp``); the next write of the same file
removes it, once its writer's process is gone and it has not changed for :data:`STALE_AFTER_S` (the grace
covers a writer on another machine sharing the folder)."""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

STALE_AFTER_S = 60.0


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *, fsync: bool = False, **open_args: Any) -> Iterator[IO]:
    """Yield a file open on a hidden temporary beside ``path`` (named for this process and thread, so that
    concurrent writers never share one); when the block ends without an error it is renamed over ``path``.
    ``fsync``: the file is flushed to the disk before the rename and the folder after it, so that once the
    block ends the file survives a crash or a power cut. On an error ``path`` is left as it was."""
    path = Path(path)
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, mode, **open_args) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if fsync:
        fsync_dir(path.parent)


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that writes of ``path`` killed half-way left behind: those whose process no longer
    runs on this machine, unchanged for :data:`STALE_AFTER_S`. Returns the ones removed."""
    path = Path(path)
    pattern = re.compile(re.escape(f".{path.name}.") + r"([0-9]+)\.[0-9]+\.tmp")
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    removed = []
    for name in names:
        match = pattern.fullmatch(name)
        if not match or _running(int(match.group(1))):
            continue
        tmp = path.with_name(name)
        try:
            if time.time() - tmp.stat().st_mtime < STALE_AFTER_S:
                continue
            tmp.unlink()
        except OSError:
            continue  # gone already, or not ours to remove
        removed.append(tmp)
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process, or a number no pid can be
        return False
    except PermissionError:  # another user's process
        return True
    return True


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or a new entry in the folder ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
