"""``dens-merge``: join the preds.csv files of ``dens-infer --shard i/N`` runs into one preds.csv and its breast
and exam CSVs.

A shard holds the files whose path hashes to it, so an exam's views may lie in several shards: a shard's own
breast and exam CSVs cover its files only, and the merged ones, computed from every shard's rows, are the
archive's. So the merge takes only a whole set (:mod:`dens.preds.shard`: every shard of one split, one model,
one STUDIES, each run to its end), unless told to take an incomplete one, and then says what it lacks. It
refuses a file given twice, a shard whose run still writes it (its lock is held), an empty or header-only
shard, shards that overlap (a file with rows in two) or that were cut short (a run killed and not resumed),
and rows of different models. The merged file is written beside ``out`` and renamed onto it once whole, so
a refused merge leaves nothing at ``out``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dens.flags import FlagRule, flag_dense
from dens.preds import aggregate
from dens.preds.columns import COLUMNS
from dens.preds.lock import OutputLocked, lock_path, output_lock
from dens.preds.shard import RecordError, ShardRecord, check_set, read_record
from dens.preds.writer import PredsWriter, check_output, read_existing


class MergeError(ValueError):
    """Shards that cannot be joined; the message names the shard and what to do."""


@dataclass
class Merged:
    out: Path
    shards: int
    rows: int
    errors: int
    breast_csv: Path
    exam_csv: Path
    ok: int = 0
    notes: list[str] = field(default_factory=list)  # --allow-incomplete: what the merged set lacks


def merge(
    shards: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    rule: FlagRule = flag_dense,
    allow_incomplete: bool = False,
) -> Merged:
    """Write ``out`` (preds.csv) with every row of ``shards``, in the shards' order, then its breast and exam
    CSVs. The set is checked first (:func:`dens.preds.shard.check_set`; ``allow_incomplete`` takes one that
    lacks shards, and :attr:`Merged.notes` say what); then one shard is read at a time, the paths seen kept to
    refuse an overlap."""
    out = Path(out)
    sources = [Path(s) for s in shards]
    if not sources:
        raise MergeError("no shard given: name the preds.csv files the --shard runs wrote")
    _refuse_repeats(sources, out)
    records = [(shard, _checked(shard)) for shard in sources]
    try:
        notes = check_set(records, allow_incomplete)
    except RecordError as exc:
        raise MergeError(str(exc)) from exc
    check_output(out, overwrite=overwrite)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.merging")
    try:
        rows, errors, ok = _join(records, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    breast_csv, exam_csv = aggregate.write_aggregates(out, rule)
    return Merged(out, len(sources), rows, errors, breast_csv, exam_csv, ok=ok, notes=notes)


def _refuse_repeats(sources: Sequence[Path], out: Path) -> None:
    """Refuse a shard named twice (through any spelling of it) and an ``out`` that is one of the shards."""
    named: dict[Path, Path] = {}
    for shard in sources:
        if not shard.is_file():
            raise MergeError(f"shard {shard} not found")
        key = shard.resolve()
        if key in named:
            same = f"as {named[key]} and {shard}" if named[key] != shard else "twice"
            raise MergeError(f"{shard} is given twice ({same}): name each shard once")
        named[key] = shard
    if out.resolve() in named:
        raise MergeError(f"{out} is one of the shards: write the merged file elsewhere")


def _checked(shard: Path) -> ShardRecord | None:
    """``shard``'s record, once it is known not to be written now, nor empty."""
    try:
        with output_lock(shard):
            pass
    except OutputLocked:
        holder = ""
        with contextlib.suppress(OSError):
            holder = lock_path(shard).read_text(encoding="ascii", errors="replace").strip()
        by = f" (process {holder})" if holder else ""
        raise MergeError(
            f"{shard} is still being written by its dens-infer run{by}: wait for it to finish, then merge"
        ) from None
    except PermissionError:
        pass  # a folder this user cannot write to: its lock cannot be taken to look, and the rows still can be read
    if shard.stat().st_size == 0:
        raise MergeError(f"{shard} is empty (0 bytes): its run wrote nothing; run that shard again")
    try:
        return read_record(shard)
    except RecordError as exc:
        raise MergeError(str(exc)) from exc


def _join(records: Sequence[tuple[Path, ShardRecord | None]], tmp: Path) -> tuple[int, int, int]:
    """Write every shard's rows to ``tmp``; (rows, errors, ok)."""
    seen: dict[str, Path] = {}
    models: set[str] = set()
    rows = errors = ok = 0
    with PredsWriter(tmp, overwrite=True) as writer:
        for shard, record in records:
            existing = read_existing(shard)
            if existing.torn:
                raise MergeError(f"{shard} ends in a record cut short: its run was killed; finish it with --resume")
            empty_shard = record is not None and record.complete and record.rows == 0  # more shards than files
            if not existing.rows and not empty_shard:
                raise MergeError(
                    f"{shard} holds no rows (only the header): its run stopped before its first rows were "
                    "written; run that shard again (--resume)"
                )
            if record is not None and record.complete and record.rows != len(existing.rows):
                raise MergeError(
                    f"{shard} holds {len(existing.rows)} rows, but its run wrote {record.rows}: it was changed "
                    f"since; run shard {record.shard} again"
                )
            for row in existing.rows:
                other = seen.get(row[0])
                if other is not None:
                    raise MergeError(
                        f"{row[0]} has rows in {other} and {shard}: the shards overlap (were they run with the "
                        "same --shard i/N over the same STUDIES?)"
                    )
                seen[row[0]] = shard
            models |= existing.models
            if len(models) > 1:
                raise MergeError(
                    f"{shard} was scored by another model than the shards before it (sha256 "
                    f"{', '.join(sorted(m[:12] for m in models))}): merge the outputs of one model"
                )
            writer.write(dict(zip(COLUMNS, row, strict=True)) for row in existing.rows)
            rows += len(existing.rows)
            errors += existing.errors
            ok += sum(r[1] == "ok" for r in existing.rows)
    return rows, errors, ok
