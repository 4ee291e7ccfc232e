"""The files under an input folder: recursive, in a deterministic (sorted) order, symlinks followed once.

Every regular file is yielded, whatever its name or extension: whether it is DICOM is decided by its
content (``dens.dicom.read``), so a non-DICOM file becomes a ``skipped`` row, not a silent omission. Paths
are ``str``; a name that is not UTF-8 carries its bytes as ``surrogateescape`` characters, as ``os`` gives it.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)

# The names dens.preprocess.load reads as plain images rather than DICOM (a test holds the two equal: this
# process never imports preprocess, which loads the decoders). dens-infer reads them only when asked.
PLAIN_IMAGE_SUFFIXES = (".png", ".pgm", ".tif", ".tiff", ".jpg", ".jpeg")


@dataclass(frozen=True)
class Entry:
    """A path to account for. ``problem`` is set when it cannot even be opened for reading (a broken
    symlink, a directory that cannot be listed): it still gets a row, an ``error`` one."""

    path: str
    problem: str = ""


def walk(root: str | os.PathLike, exclude: Iterable[str | os.PathLike] = ()) -> Iterator[Entry]:
    """Yield every file under ``root`` (or ``root`` itself when it is a file), depth first, entries of a
    folder in sorted name order. Symlinked folders are followed; a folder already visited (a symlink
    loop, two links to one folder) is entered once only, keyed by (st_dev, st_ino). Paths are
    ``root`` joined with the relative path, as the user spelt ``root``. ``exclude``: files never to
    yield (dens-infer's own outputs when they lie inside ``root``)."""
    root = os.fspath(root)
    excluded = {_file_id(p) for p in exclude}
    excluded.discard(None)
    if not os.path.isdir(root):
        yield Entry(root) if os.path.exists(root) else Entry(root, f"{root} does not exist")
        return
    seen: set[tuple[int, int]] = set()
    yield from _walk_dir(root, seen, excluded)


def _walk_dir(folder: str, seen: set[tuple[int, int]], excluded: set) -> Iterator[Entry]:
    try:
        st = os.stat(folder)
    except OSError as exc:
        yield Entry(folder, f"folder cannot be read: {exc.strerror or exc}")
        return
    key = (st.st_dev, st.st_ino)
    if key in seen:
        log.debug("%s: folder already visited (symlink loop or second link), not entered again", folder)
        return
    seen.add(key)
    try:
        with os.scandir(folder) as it:
            names = sorted(entry.name for entry in it)
    except OSError as exc:
        yield Entry(folder, f"folder cannot be listed: {exc.strerror or exc}")
        return
    for name in names:
        path = os.path.join(folder, name)
        try:
            st = os.stat(path)  # follows symlinks
        except OSError as exc:
            problem = "broken symlink" if os.path.islink(path) else f"cannot stat: {exc.strerror or exc}"
            yield Entry(path, problem)
            continue
        if stat.S_ISDIR(st.st_mode):
            yield from _walk_dir(path, seen, excluded)
        elif (st.st_dev, st.st_ino) in excluded:
            continue
        else:
            # Sockets, FIFOs and device files are accounted for too; opening a FIFO would block, so
            # they get an error row instead of a decode.
            yield Entry(path) if stat.S_ISREG(st.st_mode) else Entry(path, "not a regular file")


def _file_id(path: str | os.PathLike) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino
