"""Writing a file all at once: what every artifact dens leaves behind (checkpoints, CSVs, the cache, the
report) is written through, so that a reader, or a run killed half-way, never sees half a file.

A run killed mid-write leaves its temporary behind (``.NAME.PID.THREAD.tmp``); the next write of the same file
removes it, once its writer's process is gone and it has not changed for :data:`STALE_AFTER_S` (the grace
covers a writer on another machine sharing the folder). A process lists a folder for such leftovers once, at
its first write there: the training cache and the spool write thousands of files into one folder, and a
listing per write would make each write cost the folder's size. Leftovers are older than the process that
finds them, so the first listing holds them all."""

from __future__ import annotations

import collections
import contextlib
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

STALE_AFTER_S = 60.0
_TMP = re.compile(r"\.(.+)\.([0-9]+)\.[0-9]+\.tmp")
# Folder -> target file name -> the temporaries of it found at this process's first write there; the folders
# most recently written to, at most _FOLDERS_REMEMBERED (a node that runs for months writes to a folder per
# study: one forgotten is listed again at its next write, which finds what is left there).
_leftovers: collections.OrderedDict[Path, dict[str, list[str]]] = collections.OrderedDict()
_leftovers_lock = threading.Lock()
_FOLDERS_REMEMBERED = 4096


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
    with _leftovers_lock:
        if path.parent not in _leftovers:
            _leftovers[path.parent] = _list_leftovers(path.parent)
            while len(_leftovers) > _FOLDERS_REMEMBERED:
                _leftovers.popitem(last=False)
        _leftovers.move_to_end(path.parent)
        names = _leftovers[path.parent].pop(path.name, [])
    removed, kept = [], []
    for name in names:
        tmp = path.with_name(name)
        try:
            if _running(int(_TMP.fullmatch(name).group(2))) or time.time() - tmp.stat().st_mtime < STALE_AFTER_S:
                kept.append(name)
                continue
            tmp.unlink()
        except OSError:
            continue  # gone already, or not ours to remove
        removed.append(tmp)
    if kept:  # looked at again at the next write of ``path``
        with _leftovers_lock:
            _leftovers.setdefault(path.parent, {}).setdefault(path.name, []).extend(kept)
    return removed


def _list_leftovers(folder: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    try:
        names = os.listdir(folder)
    except OSError:
        return found
    for name in names:
        if match := _TMP.fullmatch(name):
            found.setdefault(match.group(1), []).append(name)
    return found


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
