"""Which images form a breast and an exam, a breast's and an exam's call: one definition for every stage.

dens-infer's preds.breast.csv and preds.exam.csv, dens-train's breast-level figures and the review page
all group and call through this module, so a figure from training describes the CSVs a deployment writes.

* An exam is the images of one study: its study UID, else its accession number, else its patient ID, else
  the file alone (:func:`exam_key`). A breast is an exam's images of one laterality (:func:`breast_key`).
* A breast's probabilities are the mean over its views (CC, MLO, ...).
* An exam takes the call of its denser breast, as BI-RADS assigns density per exam (ties: the higher
  p_dense), and is marked when the left and right calls are more than one category apart
  (:func:`lr_disagreement`), which is rare between two breasts of one woman and worth a look (a wrong
  laterality tag, a foreign image in the study, an implant).
* An exam is incomplete when any of the four standard screening views (L-CC, L-MLO, R-CC, R-MLO) has no
  ``ok`` image (:func:`missing_views`). It is called all the same, by the same rule over the breasts it has: a
  breast with any ``ok`` view is called on the views it has (a breast missing a standard view is marked so),
  and the exam takes the denser of those breasts. A woman with one breast (a mastectomy) gets that breast's
  call. :func:`describe_missing` says what an incomplete exam lacks, in the words the SR and the review page
  both use.

Rows are preds.csv's, as strings; torch-free, so dens-infer never imports torch for it.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from dens import labels
from dens.flags import FALSE, TRUE, FlagRule, flag_dense, prediction_cells

EXAM = "exam"  # the key column: which identity the grouping used, and its value
N_IMAGES = "n_images"
VIEWS = "views"
LR_DISAGREEMENT = "lr_disagreement"
INCOMPLETE, MISSING_VIEWS = "incomplete", "missing_views"
STANDARD_VIEWS = (("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO"))
IDENTITY = (labels.PATIENT_ID, labels.ACCESSION, labels.STUDY_UID)
_KEY_ORDER = (labels.STUDY_UID, labels.ACCESSION, labels.PATIENT_ID)
_PREDICTION = (*labels.PROB_COLUMNS, labels.DENSITY, labels.P_DENSE, labels.DENSE, labels.FLAGGED)
BREAST_COLUMNS = (
    EXAM,
    *IDENTITY,
    labels.LATERALITY,
    VIEWS,
    N_IMAGES,
    *_PREDICTION,
    labels.MODEL_SHA256,
    INCOMPLETE,  # columns added later go at the end, so a reader of an older file keeps working
    MISSING_VIEWS,
)
EXAM_COLUMNS = (
    EXAM,
    *IDENTITY,
    N_IMAGES,
    *_PREDICTION,
    "density_L",
    "density_R",
    "p_dense_L",
    "p_dense_R",
    LR_DISAGREEMENT,
    labels.MODEL_SHA256,
    INCOMPLETE,  # columns added later go at the end, so a reader of an older file keeps working
    MISSING_VIEWS,
)


def aggregate_paths(preds_csv: str | os.PathLike) -> tuple[Path, Path]:
    """Where the breast and exam CSVs of ``preds_csv`` are: ``<stem>.breast.csv``, ``<stem>.exam.csv`` beside
    it (dens-infer writes them, the review page reads the exam calls)."""
    preds_csv = Path(preds_csv)
    return preds_csv.with_name(f"{preds_csv.stem}.breast.csv"), preds_csv.with_name(f"{preds_csv.stem}.exam.csv")


# --- which images belong together -------------------------------------------------------------------------


def exam_key(row: Mapping[str, str]) -> str:
    """The exam an image belongs to, as ``<column>:<value>``: the study UID, else the accession number, else
    the patient ID, else the file (``path:<path>``, an exam of its own)."""
    for column in _KEY_ORDER:
        if row.get(column):
            return f"{column}:{row[column]}"
    return f"{labels.PATH}:{row.get(labels.PATH, '')}"


def breast_key(row: Mapping[str, str]) -> tuple[str, str]:
    """The breast an image belongs to: its exam and its laterality (``""`` when unknown: a breast too)."""
    return exam_key(row), str(row.get(labels.LATERALITY, "") or "")


def breast_groups(images: pd.DataFrame) -> dict[tuple[str, str], np.ndarray]:
    """The breasts among ``images`` (one row per image, identity columns as strings): breast key -> the
    rows' positions, in key order."""
    keys = [breast_key(r) for r in images.to_dict("records")]
    groups: dict[tuple[str, str], list[int]] = {}
    for position, key in enumerate(keys):
        groups.setdefault(key, []).append(position)
    return {key: np.asarray(groups[key], np.int64) for key in sorted(groups)}


def breast_probabilities(view_probs: np.ndarray) -> np.ndarray:
    """A breast's probabilities from its views' (one row each): their mean."""
    return np.asarray(view_probs, np.float64).mean(axis=0)


def denser_breast(breast_probs: np.ndarray) -> int:
    """Which of an exam's breasts (one row of probabilities each) gives the exam its call: the one called
    the highest category, ties to the higher p_dense."""
    probs = np.asarray(breast_probs, np.float64)
    p_dense = probs[:, [labels.CLASSES.index(c) for c in labels.DENSE_CLASSES]].sum(1)
    return int(np.argmax(probs.argmax(1) * 2 + p_dense))


def missing_views(breast_calls: pd.DataFrame) -> list[str]:
    """The standard views (``L-CC``, ``L-MLO``, ``R-CC``, ``R-MLO``) that none of an exam's breasts
    (:func:`breasts`' rows: laterality, ``;``-joined views) has an image of."""
    present = {
        (side, view)
        for side, views in zip(breast_calls[labels.LATERALITY], breast_calls[VIEWS], strict=True)
        for view in views.split(";")
    }
    return [f"{side}-{view}" for side, view in STANDARD_VIEWS if (side, view) not in present]


SIDE_NAMES = {"L": "left", "R": "right"}


def describe_missing(missing: Sequence[str], imaged: Collection[str] = ()) -> str:
    """What an exam (or a breast) lacks of the standard views, as the SR's comments and the review page say it:
    a side with neither view and no other image (``imaged``: the sides that have one, of any view) as the side
    (``no right breast image``), other views by name (``missing L-MLO``); '' when nothing is missing."""
    gone = set(missing)
    sides = [
        s for s in SIDE_NAMES if s not in imaged and all(f"{s}-{v}" in gone for side, v in STANDARD_VIEWS if side == s)
    ]
    views = [v for v in missing if v.split("-")[0] not in sides]
    parts = [f"no {SIDE_NAMES[s]} breast image" for s in sides]
    return "; ".join(parts + ([f"missing {', '.join(views)}"] if views else []))


def lr_disagreement(left: str, right: str) -> bool:
    """True when a left and a right call are more than one category apart."""
    return abs(labels.class_index(left) - labels.class_index(right)) > 1


# --- the calls ----------------------------------------------------------------------------------------------


def breasts(preds: pd.DataFrame, rule: FlagRule = flag_dense) -> pd.DataFrame:
    """One row per breast (BREAST_COLUMNS) over the ``ok`` rows of preds.csv: the mean of the views it has, and
    which of its side's standard views it lacks (none for a breast of unknown side)."""
    ok = preds[preds[labels.STATUS] == "ok"]
    rows = []
    for (exam, side), positions in breast_groups(ok).items():
        group = ok.iloc[positions]
        probs = breast_probabilities(group[list(labels.PROB_COLUMNS)].astype(float).to_numpy())
        first = group.iloc[0]
        views = ";".join(sorted(v for v in group[labels.VIEW] if v))
        missing = [f"{side}-{v}" for s, v in STANDARD_VIEWS if s == side and v not in views.split(";")]
        rows.append(
            {
                EXAM: exam,
                **{c: first[c] for c in IDENTITY},
                labels.LATERALITY: side,
                VIEWS: views,
                N_IMAGES: str(len(group)),
                **prediction_cells(probs, rule),
                labels.MODEL_SHA256: _one(group[labels.MODEL_SHA256]),
                INCOMPLETE: TRUE if missing else FALSE,
                MISSING_VIEWS: ";".join(missing),
            }
        )
    return pd.DataFrame(rows, columns=list(BREAST_COLUMNS))


def exams(breast_calls: pd.DataFrame, rule: FlagRule = flag_dense) -> pd.DataFrame:
    """One row per exam (EXAM_COLUMNS) from :func:`breasts`' rows: the denser breast's call (ties: the
    higher p_dense) among the breasts it has, the left/right check, and which standard views are missing (a
    missing side: both its views)."""
    rows = []
    for exam, group in breast_calls.groupby(EXAM, sort=True):
        denser = group.iloc[denser_breast(group[list(labels.PROB_COLUMNS)].astype(float).to_numpy())]
        sides = {r[labels.LATERALITY]: r for _, r in group.iterrows()}
        left, right = sides.get("L"), sides.get("R")
        apart = left is not None and right is not None and lr_disagreement(left[labels.DENSITY], right[labels.DENSITY])
        probs = denser[list(labels.PROB_COLUMNS)].astype(float).to_numpy()
        missing = missing_views(group)
        rows.append(
            {
                EXAM: exam,
                **{c: denser[c] for c in IDENTITY},
                N_IMAGES: str(group[N_IMAGES].astype(int).sum()),
                **prediction_cells(probs, rule),
                "density_L": "" if left is None else left[labels.DENSITY],
                "density_R": "" if right is None else right[labels.DENSITY],
                "p_dense_L": "" if left is None else left[labels.P_DENSE],
                "p_dense_R": "" if right is None else right[labels.P_DENSE],
                LR_DISAGREEMENT: TRUE if apart else FALSE,
                labels.MODEL_SHA256: _one(group[labels.MODEL_SHA256]),
                INCOMPLETE: TRUE if missing else FALSE,
                MISSING_VIEWS: ";".join(missing),
            }
        )
    return pd.DataFrame(rows, columns=list(EXAM_COLUMNS))


def exam_calls(preds: pd.DataFrame, rule: FlagRule = flag_dense) -> pd.DataFrame:
    """The exam rows of preds.csv's ``ok`` rows: :func:`exams` over :func:`breasts`."""
    return exams(breasts(preds, rule), rule)


def _one(values: pd.Series) -> str:
    """The distinct non-empty values of a column, ``;``-joined (one model: its sha256)."""
    return ";".join(sorted(set(values) - {""}))
