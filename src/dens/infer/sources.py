"""Where dens-infer's files come from, and which of them this run takes.

* STUDIES is a folder (walked: :mod:`dens.infer.walk`) or a manifest: a CSV or Parquet file with a ``path``
  column, the way archives are exported. A manifest's relative paths are relative to its own folder. It is
  read in chunks, so a manifest of millions of paths is never held whole.
* ``--shard i/N`` takes the files whose path hashes to ``i`` modulo ``N`` (CRC-32 of the path as written:
  the same on every machine and every run), so N array jobs of a scheduler without Ray (Slurm, Kubernetes)
  split an archive between them with no coordination, and ``dens-merge`` joins their outputs.

Standard library and pandas only: dens-infer's process imports this.
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dens.infer.walk import Entry, walk

MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")
PATH_COLUMN = "path"
_CHUNK = 65_536  # manifest rows read at a time


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
