"""Where a run's files come from, and which of them it takes: the one walk of an input folder, a manifest's
paths, and ``--shard i/N``.

* A folder is walked recursively, in a deterministic (sorted) order, symlinked folders followed once. Every
  regular file is yielded, whatever its name or extension: whether it is DICOM is decided by its content
  (``dens.route.dicom.read``), so a non-DICOM file becomes a ``skipped`` row, not a silent omission. Paths are
  ``str``; a name that is not UTF-8 carries its bytes as ``surrogateescape`` characters, as ``os`` gives it.
* A manifest is a CSV or Parquet file with a ``path`` column, the way archives are exported. Its relative
  paths are relative to its own folder. It is read in chunks, so a manifest of millions of paths is never
  held whole.
* ``--shard i/N`` takes the files whose path hashes to ``i`` modulo ``N`` (CRC-32 of the path as written:
  the same on every machine and every run), so N array jobs of a scheduler without Ray (Slurm, Kubernetes)
  split an archive between them with no coordination, and ``dens-merge`` joins their outputs.

Standard library and pandas only: dens-infer's main process imports this, and never the decoders.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from dens.route.errors import PLAIN_IMAGE_REASON, Reason

log = logging.getLogger(__name__)

# The names dens.route.preprocess.load reads as plain images rather than DICOM; the stages read them only when asked.
PLAIN_IMAGE_SUFFIXES = (".png", ".pgm", ".tif", ".tiff", ".jpg", ".jpeg")

MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")
PATH_COLUMN = "path"
_CHUNK = 65_536  # manifest rows read at a time


@dataclass(frozen=True)
class Entry:
    """A path to account for. ``problem`` is set when it cannot even be opened for reading (a broken
    symlink, a directory that cannot be listed): it still gets a row, an ``error`` one."""

    path: str
    problem: str = ""


class ManifestError(ValueError):
    """A manifest that cannot be read as one (no ``path`` column, not CSV or Parquet)."""


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based): the files whose path's CRC-32 is ``index`` modulo ``count``."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index}/{self.count}: needs 0 <= i < N (e.g. --shard 0/4 ... 3/4)")

    @classmethod
    def parse(cls, text: str | None) -> Shard:
        """``"i/N"`` (e.g. ``"2/8"``); None or ``""``: the whole archive."""
        if not text:
            return cls()
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match:
            raise ValueError(f"--shard {text!r}: expected i/N, e.g. 0/4 (shards 0/4 to 3/4 cover the archive)")
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def whole(self) -> bool:
        return self.count == 1

    def takes(self, path: str) -> bool:
        """Whether this shard takes ``path`` (as the walk or the manifest spells it)."""
        if self.count == 1:
            return True
        return zlib.crc32(os.fsencode(path)) % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def entries(studies: str | os.PathLike, exclude=(), shard: Shard | None = None) -> Iterator[Entry]:
    """The files to account for: the walk of a folder (``exclude``: files never to yield) or a manifest's
    paths (one that does not exist is an entry with its problem), those of ``shard`` only."""
    shard = shard or Shard()
    if is_manifest(studies):
        found = (Entry(p) if os.path.isfile(p) else Entry(p, _missing(p)) for p in manifest_paths(studies))
    else:
        found = walk(studies, exclude)
    return (entry for entry in found if shard.takes(entry.path))


def _missing(path: str) -> str:
    return "is a folder, not a file" if os.path.isdir(path) else "does not exist"


def is_manifest(studies: str | os.PathLike) -> bool:
    """Whether STUDIES names a manifest file rather than a folder (or a single image)."""
    path = Path(studies)
    return path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES


def manifest_paths(manifest: str | os.PathLike) -> Iterator[str]:
    """The paths a manifest lists, in its order, read a chunk at a time; relative ones joined to the
    manifest's folder; empty cells skipped. Raises :class:`ManifestError` for a file that is no manifest."""
    manifest = Path(manifest)
    base = manifest.parent
    for chunk in _chunks(manifest):
        for value in chunk:
            if value is None or value != value or not str(value).strip():  # None, NaN or blank
                continue
            text = str(value).strip()
            yield text if os.path.isabs(text) else os.path.join(base, text)


def _chunks(manifest: Path) -> Iterator[list]:
    if manifest.suffix.lower() == ".csv":
        import pandas as pd

        try:
            reader = pd.read_csv(manifest, usecols=[PATH_COLUMN], dtype=str, chunksize=_CHUNK, keep_default_na=False)
            for frame in reader:
                yield frame[PATH_COLUMN].tolist()
        except ValueError as exc:  # pandas: usecols not found, or not CSV at all
            raise ManifestError(f"{manifest}: not a manifest with a '{PATH_COLUMN}' column ({exc})") from exc
        return
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(manifest)
        if PATH_COLUMN not in table.schema_arrow.names:
            names = ", ".join(table.schema_arrow.names)
            raise ManifestError(f"{manifest}: no '{PATH_COLUMN}' column (columns: {names})")
        for batch in table.iter_batches(batch_size=_CHUNK, columns=[PATH_COLUMN]):
            yield batch.column(0).to_pylist()
    except ManifestError:
        raise
    except Exception as exc:  # pyarrow's errors for a file that is not Parquet
        raise ManifestError(f"{manifest}: not a readable Parquet manifest ({exc})") from exc


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


def is_plain_image(path: str) -> bool:
    """Whether ``path`` is named as a plain image (PNG/PGM/TIFF/JPEG) rather than a DICOM file."""
    return path.lower().endswith(PLAIN_IMAGE_SUFFIXES)


def pool_items(found: Iterable[Entry], plain_images: bool) -> Iterator[tuple[str, str]]:
    """``(path, problem)`` for the decode engine: an entry that cannot be opened gets its ``error`` reason, and
    a plain image, unless ``plain_images``, its ``skipped`` one (never decoded, so that pictures in an archive,
    Grad-CAM maps and thumbnails among them, get no density call)."""
    for entry in found:
        if entry.problem:
            yield entry.path, f"{Reason.UNREADABLE.value}: {entry.problem}"
        elif not plain_images and is_plain_image(entry.path):
            yield entry.path, PLAIN_IMAGE_REASON
        else:
            yield entry.path, ""
