"""dens-infer's breast- and exam-level CSVs: ``preds.breast.csv`` and ``preds.exam.csv`` beside preds.csv.

Which images form a breast and an exam, the calls and the files' names are :mod:`dens.exams`'; this
module writes the files. Both are rewritten from the whole preds.csv at the end of every run, so a resumed
run sees all its rows.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from dens import exams, labels
from dens.exams import aggregate_paths
from dens.files import atomic_write
from dens.flags import FlagRule, flag_dense

_CHUNK_ROWS = 20_000  # rows of preds.csv read at a time: a few tens of MB


def write_aggregates(preds_csv: str | os.PathLike, rule: FlagRule = flag_dense) -> tuple[Path, Path]:
    """Rewrite ``preds.breast.csv`` and ``preds.exam.csv`` from ``preds_csv`` (atomically); their paths."""
    preds = ok_rows(preds_csv)
    breast_csv, exam_csv = aggregate_paths(preds_csv)
    breast_calls = exams.breasts(preds, rule)
    _write(breast_calls, breast_csv)
    _write(exams.exams(breast_calls, rule), exam_csv)
    return breast_csv, exam_csv


def ok_rows(preds_csv: str | os.PathLike) -> pd.DataFrame:
    """preds.csv's ``ok`` rows, the only ones a breast or an exam is made of, read a chunk at a time: a run
    over a manifest of a million paths, most of them missing, never holds its error rows."""
    kept = [
        chunk[chunk[labels.STATUS] == "ok"]
        for chunk in pd.read_csv(preds_csv, dtype=str, keep_default_na=False, chunksize=_CHUNK_ROWS)
    ]
    if not kept:  # a header and no rows
        return pd.read_csv(preds_csv, dtype=str, keep_default_na=False)
    return pd.concat(kept, ignore_index=True)


def _write(table: pd.DataFrame, path: Path) -> None:
    with atomic_write(path, "w", encoding="utf-8", newline="") as f:
        table.to_csv(f, index=False, lineterminator="\n")
