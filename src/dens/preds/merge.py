"""``dens-merge``: join the preds.csv files of ``dens-infer --shard i/N`` runs into one preds.csv and its breast
and exam CSVs.

A shard holds the files whose path hashes to it, so an exam's views may lie in several shards: a shard's own
breast and exam CSVs cover its files only, and the merged ones, computed from every shard's rows, are the
archive's. The merge refuses shards that overlap (a file with rows in two shards), that were cut short (a
run killed and not resumed) or that were scored by different models.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dens.flags import FlagRule, flag_dense
from dens.preds import aggregate
from dens.preds.columns import COLUMNS
from dens.preds.writer import PredsWriter, read_existing


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


def merge(
    shards: Sequence[str | os.PathLike], out: str | os.PathLike, *, overwrite: bool = False, rule: FlagRule = flag_dense
) -> Merged:
    """Write ``out`` (preds.csv) with every row of ``shards``, in the shards' order, then its breast and exam
    CSVs. One shard is read at a time; the paths seen are kept to refuse an overlap."""
    out = Path(out)
    sources = [Path(s) for s in shards]
    if not sources:
        raise MergeError("no shard given: name the preds.csv files the --shard runs wrote")
    resolved = {s.resolve() for s in sources}
    if out.resolve() in resolved:
        raise MergeError(f"{out} is one of the shards: write the merged file elsewhere")
    seen: dict[str, Path] = {}
    models: set[str] = set()
    rows = errors = 0
    with PredsWriter(out, overwrite=overwrite) as writer:
        for shard in sources:
            if not shard.is_file():
                raise MergeError(f"shard {shard} not found")
            existing = read_existing(shard)
            if existing.torn:
                raise MergeError(f"{shard} ends in a record cut short: its run was killed; finish it with --resume")
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
    breast_csv, exam_csv = aggregate.write_aggregates(out, rule)
    return Merged(out, len(sources), rows, errors, breast_csv, exam_csv)
