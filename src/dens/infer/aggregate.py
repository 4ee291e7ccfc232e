"""Breast- and exam-level calls from preds.csv: ``preds.breast.csv`` and ``preds.exam.csv`` beside it.

A breast's probabilities are the mean over its views (CC, MLO, ...). An exam takes the category of its
denser breast, as BI-RADS assigns density per exam, and is marked when the left and right calls are more
than one category apart (``lr_disagreement``), which is rare between two breasts of one woman and worth a
look (a wrong laterality tag, a foreign image in the study, an implant). Both files are rewritten from
the whole preds.csv at the end of every run, so a resumed run sees all its rows.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from dens import labels
from dens.files import atomic_write
from dens.infer.writer import FALSE, FLAGGED, MODEL_SHA256, TRUE, FlagRule, flag_dense, prediction_cells

EXAM = "exam"  # the key column: which identity the grouping used, and its value
N_IMAGES = "n_images"
VIEWS = "views"
LR_DISAGREEMENT = "lr_disagreement"
_IDENTITY = (labels.PATIENT_ID, labels.ACCESSION, labels.STUDY_UID)
_PREDICTION = (*labels.PROB_COLUMNS, labels.DENSITY, labels.P_DENSE, labels.DENSE, FLAGGED)
BREAST_COLUMNS = (EXAM, *_IDENTITY, labels.LATERALITY, VIEWS, N_IMAGES, *_PREDICTION, MODEL_SHA256)
EXAM_COLUMNS = (EXAM, *_IDENTITY, N_IMAGES, *_PREDICTION, "density_L", "density_R", "p_dense_L", "p_dense_R",
                LR_DISAGREEMENT, MODEL_SHA256)  # fmt: skip


def exam_key(row: Mapping[str, str]) -> str:
    """Rows of one exam: the study UID, else the accession number, else the patient ID, else the file."""
    for column in (labels.STUDY_UID, labels.ACCESSION, labels.PATIENT_ID):
        if row.get(column):
            return f"{column}:{row[column]}"
    return f"{labels.PATH}:{row.get(labels.PATH, '')}"


def aggregate_paths(preds_csv: str | os.PathLike) -> tuple[Path, Path]:
    """Where the breast and exam CSVs of ``preds_csv`` go: ``<stem>.breast.csv``, ``<stem>.exam.csv``."""
    preds_csv = Path(preds_csv)
    return preds_csv.with_name(f"{preds_csv.stem}.breast.csv"), preds_csv.with_name(f"{preds_csv.stem}.exam.csv")


def breasts(preds: pd.DataFrame, rule: FlagRule = flag_dense) -> pd.DataFrame:
    """One row per (exam, laterality) over the ``ok`` rows: the mean of the views' probabilities."""
    ok = preds[preds[labels.STATUS] == "ok"]
    ok = ok.assign(**{EXAM: [exam_key(r) for r in ok.to_dict("records")]})
    rows = []
    for (exam, side), group in ok.groupby([EXAM, labels.LATERALITY], sort=True):
        probs = group[list(labels.PROB_COLUMNS)].astype(float).mean(axis=0).to_numpy()
        first = group.iloc[0]
        rows.append({EXAM: exam, **{c: first[c] for c in _IDENTITY}, labels.LATERALITY: side,
                     VIEWS: ";".join(sorted(v for v in group[labels.VIEW] if v)), N_IMAGES: str(len(group)),
                     **prediction_cells(probs, rule), MODEL_SHA256: _one(group[MODEL_SHA256])})  # fmt: skip
    return pd.DataFrame(rows, columns=list(BREAST_COLUMNS))


def exams(breast_calls: pd.DataFrame, rule: FlagRule = flag_dense) -> pd.DataFrame:
    """One row per exam: the denser breast's call (ties: the higher p_dense) and the left/right check."""
    rows = []
    for exam, group in breast_calls.groupby(EXAM, sort=True):
        order = group[labels.DENSITY].map(labels.class_index) * 2 + group[labels.P_DENSE].astype(float)
        denser = group.loc[order.idxmax()]
        sides = {r[labels.LATERALITY]: r for _, r in group.iterrows()}
        left, right = sides.get("L"), sides.get("R")
        apart = (left is not None and right is not None
                 and abs(labels.class_index(left[labels.DENSITY]) - labels.class_index(right[labels.DENSITY])) > 1)
        probs = denser[list(labels.PROB_COLUMNS)].astype(float).to_numpy()
        rows.append({EXAM: exam, **{c: denser[c] for c in _IDENTITY},
                     N_IMAGES: str(group[N_IMAGES].astype(int).sum()), **prediction_cells(probs, rule),
                     "density_L": "" if left is None else left[labels.DENSITY],
                     "density_R": "" if right is None else right[labels.DENSITY],
                     "p_dense_L": "" if left is None else left[labels.P_DENSE],
                     "p_dense_R": "" if right is None else right[labels.P_DENSE],
                     LR_DISAGREEMENT: TRUE if apart else FALSE, MODEL_SHA256: _one(group[MODEL_SHA256])})  # fmt: skip
    return pd.DataFrame(rows, columns=list(EXAM_COLUMNS))


def _one(values: pd.Series) -> str:
    distinct = sorted(set(values) - {""})
    return ";".join(distinct)


def write_aggregates(preds_csv: str | os.PathLike, rule: FlagRule = flag_dense) -> tuple[Path, Path]:
    """Rewrite ``preds.breast.csv`` and ``preds.exam.csv`` from ``preds_csv`` (atomically); their paths."""
    preds = pd.read_csv(preds_csv, dtype=str, keep_default_na=False)
    breast_csv, exam_csv = aggregate_paths(preds_csv)
    breast_calls = breasts(preds, rule)
    _write(breast_calls, breast_csv)
    _write(exams(breast_calls, rule), exam_csv)
    return breast_csv, exam_csv


def _write(table: pd.DataFrame, path: Path) -> None:
    with atomic_write(path, "w", encoding="utf-8", newline="") as f:
        table.to_csv(f, index=False, lineterminator="\n")

