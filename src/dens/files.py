"""Writing a file all at once: what every artifact dens leaves behind (checkpoints, CSVs, the cache, the
report) is written through, so that a reader, or a run killed half-way, never sees half a file."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *, fsync: bool = False, **open_args: Any) -> Iterator[IO]:
    """Yield a file open on a hidden temporary beside ``path`` (named for this process and thread, so that
    concurrent writers never share one); when the block ends without an error it is renamed over ``path``.
    ``fsync``: the file is flushed to the disk before the rename and the folder after it, so that once the
    block ends the file survives a crash or a power cut. On an error ``path`` is left as it was."""
    path = Path(path)
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


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or a new entry in the folder ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
