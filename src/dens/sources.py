"""Where a run's files come from, and which of them it takes: the one walk of an input folder, a manifest's
paths, and ``--shard i/N``.

* A folder is walked recursively, in a deterministic (sorted) order, symlinked folders followed once. Every
  regular file is yielded, whatever its name or extension: whether it is DICOM is decided by its content
  (``dens.route.dicom.read``), so a non-DICOM file becomes a ``skipped`` row, not a silent omission. Paths are
  ``str``; a name that is not UTF-8 carries its bytes as ``surrogateescape`` characters, as ``os`` gives it.
* A manifest is a CSV or Parquet file with a ``path`` column, the way archives are exported. Its relative
  paths are relative to its own folder, and each is resolved (``os.path.realpath``), so however a file is
  spelt (``a/../x``, its absolute path, a symlink) it is one file: listed twice, it is taken once, and the
  repeats are counted (:class:`Repeats`). It is read in chunks, so a manifest of millions of paths is never
  held whole (only the set of its resolved paths). Identity columns, where it has them (patient, accession,
  study, series, SOP, laterality, view: dens's names, and those public sets and DICOM use,
  :data:`IDENTITY_ALIASES`), travel with each path (:attr:`Entry.identity`) to its row: a plain image has no
  header, so they are all it has. :func:`fill_identity` says how they meet what a file's header says.
* ``--shard i/N`` takes the files whose path hashes to ``i`` modulo ``N`` (CRC-32 of the path as the walk
  writes it, or of a manifest's resolved path: the same on every machine and every run), so N array jobs of a
  scheduler without Ray (Slurm, Kubernetes) split an archive between them with no coordination, and
  ``dens-merge`` joins their outputs.

Standard library and pandas only: dens-infer's main process imports this, and never the decoders.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from dens import labels
from dens.route.errors import PLAIN_IMAGE_REASON, Reason

log = logging.getLogger(__name__)

# The names dens.route.preprocess.load reads as plain images rather than DICOM; the stages read them only when asked.
PLAIN_IMAGE_SUFFIXES = (".png", ".pgm", ".tif", ".tiff", ".jpg", ".jpeg")

MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")
PATH_COLUMN = "path"
_CHUNK = 65_536  # manifest rows read at a time

# The manifest columns read as a file's identity, by the preds.csv column each fills: dens's own name first,
# then those of public sets' CSVs (RSNA screening, VinDr-Mammo, CBIS-DDSM, EMBED) and the DICOM keywords. A
# column's name is compared in lower case, with spaces and hyphens as underscores; of several present, the
# first listed is read.
IDENTITY_ALIASES: dict[str, tuple[str, ...]] = {
    labels.PATIENT_ID: (labels.PATIENT_ID, "patientid", "patient", "empi_anon"),
    labels.ACCESSION: (labels.ACCESSION, "accession_number", "accessionnumber", "acc_anon"),
    labels.STUDY_UID: (labels.STUDY_UID, "studyinstanceuid", "study_id", "exam_id", "study"),
    labels.SERIES_UID: (labels.SERIES_UID, "seriesinstanceuid", "series_id"),
    labels.SOP_UID: (labels.SOP_UID, "sopinstanceuid"),
    labels.LATERALITY: (labels.LATERALITY, "imagelaterality", "image_laterality", "left_or_right_breast", "side"),
    labels.VIEW: (labels.VIEW, "viewposition", "view_position", "image_view"),
}
_LATERALITY = {"L": "L", "LEFT": "L", "R": "R", "RIGHT": "R"}
# ``laterality_source`` of a laterality the manifest gave (the route's are 'tag', 'orientation' and 'pixels').
MANIFEST_SOURCE = "manifest"
_LATERALITY_SOURCE = "laterality_source"

Identity = tuple[tuple[str, str], ...]  # (preds.csv column, value) pairs, the non-empty ones


@dataclass(frozen=True)
class Entry:
    """A path to account for. ``problem`` is set when it cannot even be opened for reading (a broken
    symlink, a directory that cannot be listed): it still gets a row, an ``error`` one. ``identity``: what a
    manifest says of the file (:data:`IDENTITY_ALIASES`), empty for a folder's files."""

    path: str
    problem: str = ""
    identity: Identity = ()


class Item(NamedTuple):
    """An entry as a scoring engine takes it: the path, the reason it is not decoded ('' to decode it) and
    the manifest's identity for its row."""

    path: str
    problem: str
    identity: Identity = ()


class ManifestError(ValueError):
    """A manifest that cannot be read as one (no ``path`` column, not CSV or Parquet)."""


MAX_SHARDS = 100_000  # more shards than an archive has files is a typo, not a plan: each would be empty


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based): the files whose path's CRC-32 is ``index`` modulo ``count``."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_SHARDS or not 0 <= self.index < self.count:
            raise ValueError(
                f"shard {self.index}/{self.count}: needs 0 <= i < N <= {MAX_SHARDS} (e.g. --shard 0/4 ... 3/4)"
            )

    @classmethod
    def parse(cls, text: str | None) -> Shard:
        """``"i/N"`` (e.g. ``"2/8"``) in ASCII digits; None or ``""``: the whole archive."""
        if not text:
            return cls()
        match = re.fullmatch(r"\s*([0-9]{1,6})\s*/\s*([0-9]{1,6})\s*", text, re.ASCII)
        if not match:
            raise ValueError(
                f"--shard {text!r}: expected i/N in ASCII digits with N at most {MAX_SHARDS}, e.g. 0/4 (shards 0/4 "
                "to 3/4 cover the archive)"
            )
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


@dataclass
class Repeats:
    """How many of a manifest's entries named a file it had listed already (and were dropped), as counted by
    the last pass of :func:`entries` that reached the manifest's end."""

    count: int = 0


def entries(
    studies: str | os.PathLike, exclude=(), shard: Shard | None = None, repeats: Repeats | None = None
) -> Iterator[Entry]:
    """The files to account for: the walk of a folder (``exclude``: files never to yield) or a manifest's
    files, each once (one that cannot be read is an entry with its problem; ``repeats`` gets the number of
    entries dropped as a file listed again), those of ``shard`` only."""
    shard = shard or Shard()
    if is_manifest(studies):
        return _manifest_files(studies, shard, repeats)
    return (entry for entry in walk(studies, exclude) if shard.takes(entry.path))


def _manifest_files(manifest: str | os.PathLike, shard: Shard, repeats: Repeats | None) -> Iterator[Entry]:
    seen: set[str] = set()
    dropped = 0
    for listed, identity in manifest_entries(manifest):
        path = os.path.realpath(listed)
        if not shard.takes(path):
            continue
        if path in seen:
            dropped += 1
            continue
        seen.add(path)
        yield Entry(path, file_problem(path), identity)
    if repeats is not None:
        repeats.count = dropped


def file_problem(path: str) -> str:
    """Why ``path`` cannot be read as a file ('' when it can): it does not exist, a folder on the way cannot be
    searched, it is a folder or no regular file (a FIFO would block, a device never ends), or it cannot be
    opened for reading."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "does not exist"
    except PermissionError:
        return "permission denied (a folder on its path cannot be searched)"
    except OSError as exc:
        return f"cannot stat: {exc.strerror or exc}"
    if stat.S_ISDIR(st.st_mode):
        return "is a folder, not a file"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if not os.access(path, os.R_OK):
        return "permission denied"
    return ""


def is_manifest(studies: str | os.PathLike) -> bool:
    """Whether STUDIES names a manifest file rather than a folder (or a single image)."""
    path = Path(studies)
    return path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES


def manifest_paths(manifest: str | os.PathLike) -> Iterator[str]:
    """The paths a manifest lists, in its order (:func:`manifest_entries` without their identity)."""
    return (path for path, _ in manifest_entries(manifest))


def manifest_entries(manifest: str | os.PathLike) -> Iterator[tuple[str, Identity]]:
    """``(path, identity)`` for each path a manifest lists, in its order, read a chunk at a time; relative
    paths joined to the manifest's folder; rows without a path skipped. ``identity``: the non-empty cells of
    the identity columns it has (:data:`IDENTITY_ALIASES`), laterality read as L or R (Left, right...; any
    other value is no laterality) and view in upper case. Raises :class:`ManifestError` for a file that is
    no manifest."""
    manifest = Path(manifest)
    base = manifest.parent
    for chunk in _chunks(manifest):
        paths, identity = chunk[PATH_COLUMN], [(c, chunk[c]) for c in IDENTITY_ALIASES if c in chunk]
        for row, value in enumerate(paths):
            text = _cell(value)
            if not text:
                continue
            cells = ((column, _identity_value(column, _cell(values[row]))) for column, values in identity)
            yield (text if os.path.isabs(text) else os.path.join(base, text)), tuple((c, v) for c, v in cells if v)


def _cell(value) -> str:
    return "" if value is None or value != value else str(value).strip()  # None, NaN or blank: ''


def _identity_value(column: str, text: str) -> str:
    if column == labels.LATERALITY:
        return _LATERALITY.get(text.upper(), "")
    return text.upper() if column == labels.VIEW else text


def _identity_columns(names: Iterable[str]) -> dict[str, str]:
    """The manifest's column read for each identity column it has (:data:`IDENTITY_ALIASES`)."""
    by_key = {}
    for name in names:
        by_key.setdefault(re.sub(r"[\s-]+", "_", str(name).strip().lower()), name)
    found = {}
    for column, aliases in IDENTITY_ALIASES.items():
        name = next((by_key[a] for a in aliases if a in by_key), None)
        if name is not None and name != PATH_COLUMN:
            found[column] = name
    return found


def _chunks(manifest: Path) -> Iterator[dict[str, list]]:
    """The manifest a chunk at a time: its paths (``path``) and its identity columns (by preds.csv's names)."""
    if manifest.suffix.lower() == ".csv":
        import pandas as pd

        try:
            names = list(pd.read_csv(manifest, nrows=0, dtype=str).columns)
            if PATH_COLUMN not in names:
                raise ManifestError(f"{manifest}: no '{PATH_COLUMN}' column (columns: {', '.join(names)})")
            columns = {PATH_COLUMN: PATH_COLUMN, **_identity_columns(names)}
            reader = pd.read_csv(
                manifest, usecols=list(set(columns.values())), dtype=str, chunksize=_CHUNK, keep_default_na=False
            )
            for frame in reader:
                yield {key: frame[name].tolist() for key, name in columns.items()}
        except ManifestError:
            raise
        except ValueError as exc:  # pandas: not CSV at all
            raise ManifestError(f"{manifest}: not a manifest with a '{PATH_COLUMN}' column ({exc})") from exc
        return
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(manifest)
        names = table.schema_arrow.names
        if PATH_COLUMN not in names:
            raise ManifestError(f"{manifest}: no '{PATH_COLUMN}' column (columns: {', '.join(names)})")
        columns = {PATH_COLUMN: PATH_COLUMN, **_identity_columns(names)}
        read = list(dict.fromkeys(columns.values()))
        for batch in table.iter_batches(batch_size=_CHUNK, columns=read):
            values = {name: batch.column(i).to_pylist() for i, name in enumerate(read)}
            yield {key: values[name] for key, name in columns.items()}
    except ManifestError:
        raise
    except Exception as exc:  # pyarrow's errors for a file that is not Parquet
        raise ManifestError(f"{manifest}: not a readable Parquet manifest ({exc})") from exc


def fill_identity(info: Mapping | None, identity: Identity) -> Mapping | None:
    """A file's identity (``info``: what the route read of it, None when it read nothing) with a manifest's
    ``identity`` filling what the file did not say. A DICOM header is the record the images travel with, so
    what it says stays, and the manifest fills the cells it leaves empty; a laterality the route guessed
    from the pixels gives way to the manifest's. A plain image says nothing, so the manifest names it whole.
    A laterality taken from the manifest has ``laterality_source`` 'manifest'."""
    if not identity:
        return info
    filled = dict(info or {})
    for column, value in identity:
        if column == labels.LATERALITY:
            if filled.get(column) and filled.get(_LATERALITY_SOURCE) not in ("", "pixels", None):
                continue
            filled[column], filled[_LATERALITY_SOURCE] = value, MANIFEST_SOURCE
        elif not filled.get(column):
            filled[column] = value
    return filled


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


def items(found: Iterable[Entry], plain_images: bool) -> Iterator[Item]:
    """The entries as the scoring engines take them: an entry that cannot be opened gets its ``error``
    reason, and a plain image, unless ``plain_images``, its ``skipped`` one (never decoded, so that pictures
    in an archive, Grad-CAM maps and thumbnails among them, get no density call)."""
    for entry in found:
        if entry.problem:
            yield Item(entry.path, f"{Reason.UNREADABLE.value}: {entry.problem}", entry.identity)
        elif not plain_images and is_plain_image(entry.path):
            yield Item(entry.path, PLAIN_IMAGE_REASON, entry.identity)
        else:
            yield Item(entry.path, "", entry.identity)


def pool_items(found: Iterable[Entry], plain_images: bool) -> Iterator[tuple[str, str]]:
    """``(path, problem)`` for the decode engine (:func:`items` without the identity)."""
    return ((item.path, item.problem) for item in items(found, plain_images))
