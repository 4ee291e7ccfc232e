"""One dens-infer run per output: an advisory lock (``fcntl.flock``) on a hidden file beside preds.csv.

Two runs appending to one preds.csv would write a file twice over, and an ``--overwrite`` run would discard
rows the other still counts on. The second run is refused at once, naming the first's process. The lock is
released when its holder exits, however it exits (kill -9 included: the kernel drops it), and the lock file
is removed by a run that ends normally. dens-infer --gradcam takes it again for the step that rewrites
preds.csv after inference.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


class OutputLocked(RuntimeError):
    """Another run holds the output; the message names it and what to do."""


def lock_path(out: str | os.PathLike) -> Path:
    """The lock file of the output ``out``: ``.<name>.lock`` beside it, after resolving symlinks, so every
    spelling of one output takes one lock."""
    out = Path(out).resolve()
    return out.with_name(f".{out.name}.lock")


@contextlib.contextmanager
def output_lock(out: str | os.PathLike) -> Iterator[Path]:
    """Hold the lock of ``out`` for the block (creating its folder if need be); raises OutputLocked when
    another holder has it (another process, or another block of this one), OSError when the folder cannot
    be written."""
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, out)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still holding it: a waiting run then finds the file gone and retries
        os.close(fd)


def _acquire(path: Path, out: str | os.PathLike) -> int:
    for _ in range(100):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            raise OutputLocked(
                f"another dens-infer run (process {holder or '?'}) is writing {out}: wait for it to finish, "
                f"or choose another --out (the lock is {path}; it is released when that process ends)"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:  # not a file that a finishing run unlinked between our open and our lock
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)
    raise OutputLocked(f"could not take the lock {path} of {out}: it keeps changing; retry")
