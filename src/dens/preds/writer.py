"""preds.csv's crash-safe appending writer, and the reader ``--resume`` and dens-merge use.

Rows are appended one batch at a time in a single write, flushed and fsync'd, so a crash (kill -9, power)
loses at most the batch being written, and that batch can only be torn at its end. ``--resume`` reads the
file back, drops a torn last record, and skips every file that already has a row: after a crash at any
moment, the resumed run ends with exactly one row per file. A write that fails (a full disk) is cut back to
the last whole record before the error goes up, so the file never ends torn by it.

The columns and the rows are :mod:`dens.preds.columns`'.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dens.files import atomic_write
from dens.labels import SOP_UID
from dens.preds.columns import COLUMNS, HEADER, MODEL_SHA256, OLDER_LAYOUTS, STATUSES

log = logging.getLogger(__name__)


class OutputExists(FileExistsError):
    """preds.csv is there already and neither --resume nor --overwrite was given."""


class CorruptOutput(ValueError):
    """preds.csv cannot be resumed (not a dens-infer file, or damaged before its last record)."""


@dataclass
class Existing:
    """What a previous run left in preds.csv (rows padded to COLUMNS)."""

    rows: list[list[str]] = field(default_factory=list)
    torn: bool = False  # a torn last record (or header) was found and dropped
    older: bool = False  # written with one of OLDER_LAYOUTS, by an older dens-infer

    @property
    def paths(self) -> set[str]:
        """The path cells."""
        return {r[0] for r in self.rows}

    @property
    def sop_uids(self) -> set[str]:
        """The SOP Instance UID cells (a pull knows an instance by it)."""
        column = COLUMNS.index(SOP_UID)
        return {r[column] for r in self.rows if r[column]}

    @property
    def errors(self) -> int:
        return sum(r[1] == "error" for r in self.rows)

    @property
    def models(self) -> set[str]:
        column = COLUMNS.index(MODEL_SHA256)
        return {r[column] for r in self.rows if r[1] == "ok" and r[column]}


def read_existing(path: Path) -> Existing:
    """Parse preds.csv, tolerating a torn end: bytes after the last newline are a record cut short, and a
    final record that does not parse into all columns is one too (a quoted path holding a newline)."""
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    torn = len(complete) != len(data)
    if not complete:
        return Existing(torn=bool(data))
    try:
        text = complete.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptOutput(f"{path} is not a UTF-8 CSV ({exc}); is it a dens-infer preds.csv?") from exc
    records: list[list[str]] = []
    try:
        records.extend(csv.reader(io.StringIO(text, newline="")))
    except csv.Error:
        torn = True  # an unterminated quote at the very end: the last record was cut inside a quoted path
    layouts = {len(layout): layout for layout in (COLUMNS, *OLDER_LAYOUTS)}
    if not records or tuple(records[0]) not in layouts.values():
        if not records and torn:
            return Existing(torn=True)
        raise CorruptOutput(
            f"{path} does not start with the preds.csv header ({HEADER.strip()}); it was not "
            "written by this dens-infer: choose another --out, or --overwrite it"
        )
    width = len(records[0])
    rows = records[1:]
    good = [len(r) == width and r[1] in STATUSES for r in rows]
    if rows and not good[-1]:
        rows, good, torn = rows[:-1], good[:-1], True
    if not all(good):
        bad = good.index(False) + 2
        raise CorruptOutput(f"{path}: record {bad} is not a preds.csv row (damaged or edited); fix it, or --overwrite")
    if width == len(COLUMNS):
        return Existing(rows, torn)
    return Existing(
        [[dict(zip(layouts[width], r, strict=True)).get(c, "") for c in COLUMNS] for r in rows], torn, older=True
    )


class NotAFolder(NotADirectoryError):
    """A folder the output needs is a file."""


def check_folder(path: str | os.PathLike) -> None:
    """Raise NotAFolder when the folder ``path`` goes in (or one above it) is a file: creating it would fail
    with a bare "File exists"."""
    path = Path(path)
    for folder in path.parents:
        if folder.exists():
            if not folder.is_dir():
                raise NotAFolder(
                    f"{folder} is a file, not a folder, so {path} cannot be written there: choose an --out in a folder"
                )
            return


def check_output(path: str | os.PathLike, *, resume: bool = False, overwrite: bool = False) -> None:
    """Raise OutputExists when ``path`` holds rows and neither ``resume`` nor ``overwrite`` is given, and
    NotAFolder when its folder is a file."""
    path = Path(path)
    check_folder(path)
    if path.exists() and path.stat().st_size > 0 and not (resume or overwrite):
        raise OutputExists(
            f"{path} already exists: pass --resume to continue the run that wrote it, or --overwrite to replace it"
        )


class PredsWriter:
    """Append rows to preds.csv, one flushed and fsync'd write per batch.

    A new file gets the header. An existing one is refused unless ``resume`` (its rows are kept, a torn
    end is cut off, ``done`` lists the path cells to skip) or ``overwrite`` (it starts again).
    ``retry_errors`` (with ``resume``): the earlier ``error`` rows are dropped, so their files are done
    again; without it they stay, and ``kept_errors`` counts them (``kept_ok``, the ``ok`` ones).
    """

    def __init__(
        self, path: str | os.PathLike, *, resume: bool = False, overwrite: bool = False, retry_errors: bool = False
    ):
        self.path = Path(path)
        self.done: set[str] = set()  # the kept rows' path cells
        self.done_sops: set[str] = set()  # and their SOP Instance UIDs
        self.models: set[str] = set()
        self.kept = self.kept_errors = self.kept_ok = self.retried = 0
        check_output(self.path, resume=resume, overwrite=overwrite)
        exists = self.path.exists() and self.path.stat().st_size > 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if exists and resume:
            existing = read_existing(self.path)
            rows = existing.rows
            if retry_errors:
                rows = [r for r in rows if r[1] != "error"]
                self.retried = len(existing.rows) - len(rows)
            kept = Existing(rows)
            self.done, self.models, self.kept, self.kept_errors = kept.paths, kept.models, len(rows), kept.errors
            self.done_sops = kept.sop_uids
            self.kept_ok = sum(r[1] == "ok" for r in rows)
            if existing.torn:
                log.warning(
                    "%s: its last record was cut short by the crash; dropped, that file is done again", self.path
                )
            if existing.torn or existing.older or self.retried:
                self._rewrite(rows)
            elif not existing.rows and self.path.read_bytes() != HEADER.encode():
                self._rewrite([])
        elif not exists or overwrite:
            self._rewrite([])
        # Unbuffered bytes: a write that fails leaves nothing behind in a buffer to fail again at close.
        self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 (closed in close())

    def _rewrite(self, rows: list[list[str]]) -> None:
        """Replace the file with the header and ``rows``, atomically."""
        with atomic_write(self.path, "w", fsync=True, encoding="utf-8", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(COLUMNS)
            writer.writerows(rows)

    def write(self, rows: Iterable[Mapping[str, str]]) -> None:
        """Append ``rows`` (dicts keyed by COLUMNS) in one write, then flush and fsync. On an error (a full
        disk, an interrupt) the file is cut back to where it ended before, then the error goes up."""
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows([r[c] for c in COLUMNS] for r in rows)
        data = memoryview(buffer.getvalue().encode("utf-8"))
        fd = self._file.fileno()
        end = os.fstat(fd).st_size
        try:
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        except BaseException as exc:  # a full disk, or a signal between two writes (whole rows are kept)
            if data or isinstance(exc, OSError):
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, end)
            raise

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> PredsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
