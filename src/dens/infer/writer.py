"""preds.csv: its columns, how a decoded file becomes a row, and a crash-safe appending writer.

Rows are appended one batch at a time in a single write, flushed and fsync'd, so a crash (kill -9, power)
loses at most the batch being written, and that batch can only be torn at its end. ``--resume`` reads the
file back, drops a torn last record, and skips every file that already has a row: after a crash at any
moment, the resumed run ends with exactly one row per file.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dens import labels
from dens.files import atomic_write
from dens.flags import FlagRule, flag_dense, prediction_cells

log = logging.getLogger(__name__)

FLAGGED, MODEL_SHA256, GRADCAM = labels.FLAGGED, labels.MODEL_SHA256, labels.GRADCAM
STATUSES = ("ok", "skipped", "error")
COLUMNS: tuple[str, ...] = (
    labels.PATH,
    labels.STATUS,
    labels.REASON,
    *labels.IDENTITY_COLUMNS,
    *labels.PROB_COLUMNS,
    labels.DENSITY,
    labels.P_DENSE,
    labels.DENSE,
    FLAGGED,
    MODEL_SHA256,
    GRADCAM,
)
HEADER = ",".join(COLUMNS) + "\n"


def make_row(
    path: str,
    status: str,
    reason: str,
    info: Mapping | None,
    probs: Sequence[float] | None,
    model_sha256: str,
    rule: FlagRule = flag_dense,
) -> dict[str, str]:
    """One preds.csv row; identity from ``info`` (``ImageInfo.to_dict()``), predictions when ``probs``."""
    row = dict.fromkeys(COLUMNS, "")
    row.update({labels.PATH: path, labels.STATUS: status, labels.REASON: reason, MODEL_SHA256: model_sha256})
    for column in labels.IDENTITY_COLUMNS:
        row[column] = str((info or {}).get(column, "") or "")
    if probs is not None:
        row.update(prediction_cells(probs, rule))
    return row


class OutputExists(FileExistsError):
    """preds.csv is there already and neither --resume nor --overwrite was given."""


class CorruptOutput(ValueError):
    """preds.csv cannot be resumed (not a dens-infer file, or damaged before its last record)."""


@dataclass
class Existing:
    """What a previous run left in preds.csv."""

    rows: list[list[str]] = field(default_factory=list)
    torn: bool = False  # a torn last record (or header) was found and dropped

    @property
    def paths(self) -> set[str]:
        return {r[0] for r in self.rows}

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
    if not records or records[0] != list(COLUMNS):
        if not records and torn:
            return Existing(torn=True)
        raise CorruptOutput(
            f"{path} does not start with the preds.csv header ({HEADER.strip()}); it was not "
            "written by this dens-infer: choose another --out, or --overwrite it"
        )
    rows = records[1:]
    good = [len(r) == len(COLUMNS) and r[1] in STATUSES for r in rows]
    if rows and not good[-1]:
        rows, good, torn = rows[:-1], good[:-1], True
    if not all(good):
        bad = good.index(False) + 2
        raise CorruptOutput(f"{path}: record {bad} is not a preds.csv row (damaged or edited); fix it, or --overwrite")
    return Existing(rows, torn)


def check_output(path: str | os.PathLike, *, resume: bool = False, overwrite: bool = False) -> None:
    """Raise OutputExists when ``path`` holds rows and neither ``resume`` nor ``overwrite`` is given."""
    path = Path(path)
    if path.exists() and path.stat().st_size > 0 and not (resume or overwrite):
        raise OutputExists(
            f"{path} already exists: pass --resume to continue the run that wrote it, or --overwrite to replace it"
        )


class PredsWriter:
    """Append rows to preds.csv, one flushed and fsync'd write per batch.

    A new file gets the header. An existing one is refused unless ``resume`` (its rows are kept, a torn
    end is cut off, ``done`` lists the paths to skip) or ``overwrite`` (it starts again).
    """

    def __init__(self, path: str | os.PathLike, *, resume: bool = False, overwrite: bool = False):
        self.path = Path(path)
        self.done: set[str] = set()
        self.models: set[str] = set()
        self.kept = 0
        check_output(self.path, resume=resume, overwrite=overwrite)
        exists = self.path.exists() and self.path.stat().st_size > 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if exists and resume:
            existing = read_existing(self.path)
            self.done, self.models, self.kept = existing.paths, existing.models, len(existing.rows)
            if existing.torn:
                log.warning(
                    "%s: its last record was cut short by the crash; dropped, that file is done again", self.path
                )
                self._rewrite(existing.rows)
            elif not existing.rows and self.path.read_bytes() != HEADER.encode():
                self._rewrite([])
        elif not exists or overwrite:
            self._rewrite([])
        self._file = open(self.path, "a", encoding="utf-8", newline="")  # noqa: SIM115 (closed in close())
        self._csv = csv.writer(self._file, lineterminator="\n")

    def _rewrite(self, rows: list[list[str]]) -> None:
        """Replace the file with the header and ``rows``, atomically."""
        with atomic_write(self.path, "w", fsync=True, encoding="utf-8", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(COLUMNS)
            writer.writerows(rows)

    def write(self, rows: Iterable[Mapping[str, str]]) -> None:
        """Append ``rows`` (dicts keyed by COLUMNS) in one write, then flush and fsync."""
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows([r[c] for c in COLUMNS] for r in rows)
        self._file.write(buffer.getvalue())
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> PredsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
