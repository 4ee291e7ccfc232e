"""A labelled set of images: the manifest dens-train trains on and dens-eval scores.

Inputs understood by :func:`read_manifest`:

* the RSNA layout: ``train.csv`` (patient_id, image_id, laterality, view, density) with images at
  ``train_images/<patient_id>/<image_id>.dcm`` beside it;
* ``dens-synth`` output, or any CSV with a ``path`` column (relative to the CSV's folder, or absolute) and
  ``density`` (A-D, or 1-4), optionally ``patient_id``, ``laterality``, ``view``, ``study_uid``.

The identity that forms breasts and exams comes from the CSV where it gives it, else from the file's header
as the shared route read it (:func:`with_identity`), so both commands form the same breasts and exams.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from dens import exams, labels
from dens.artifact import modelcard

# Columns that name where an image was taken (CSV columns such as RSNA's, or the file's header): images and
# figures are counted per value of each.
GROUP_COLUMNS = ("site_id", "machine_id", "manufacturer", "manufacturer_model")
# Where the image was taken, as its header says: the figures are reported per manufacturer and model too.
FROM_HEADER = ("manufacturer", "manufacturer_model")
LABEL = "label"  # the class index of `density`
MISSING_FILE = "missing_file"  # the reason of a listed file that does not exist
_NUMERIC_DENSITY = {"1": "A", "2": "B", "3": "C", "4": "D"}  # BI-RADS a-d written as 1-4 (CBIS-DDSM and others)

log = logging.getLogger(__name__)


def read_manifest(data: str | Path) -> tuple[pd.DataFrame, dict]:
    """The labelled images under ``data`` (a folder holding ``train.csv``, or a CSV file).

    Returns one row per labelled image with absolute ``path``, ``density`` (A-D), ``label`` (0-3),
    ``patient_id`` and whichever identity columns the CSV has, plus counts of what was left out.
    Raises ValueError with a message naming the file and what to fix.
    """
    data = Path(data)
    csv = data / "train.csv" if data.is_dir() else data
    if not csv.is_file():
        raise ValueError(
            f"{data}: no labels found. Give a folder holding train.csv (RSNA layout or dens-synth "
            "output) or a CSV with columns path,density[,patient_id]."
        )
    frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    root = csv.parent
    if labels.DENSITY not in frame.columns:
        raise ValueError(f"{csv}: no '{labels.DENSITY}' column (columns: {', '.join(frame.columns)})")
    if labels.PATH in frame.columns:
        source = "csv"
        frame[labels.PATH] = [str(p if Path(p).is_absolute() else root / p) for p in frame[labels.PATH]]
    elif {labels.PATIENT_ID, labels.IMAGE_ID} <= set(frame.columns):
        source = "rsna"
        pairs = zip(frame[labels.PATIENT_ID], frame[labels.IMAGE_ID], strict=True)
        frame[labels.PATH] = [str(root / "train_images" / p / f"{i}.dcm") for p, i in pairs]
    else:
        raise ValueError(
            f"{csv}: needs a '{labels.PATH}' column, or '{labels.PATIENT_ID}' and '{labels.IMAGE_ID}' "
            "(RSNA layout, images under train_images/<patient_id>/<image_id>.dcm)"
        )

    density = frame[labels.DENSITY].str.strip().str.upper().str.replace(r"\.0$", "", regex=True)
    density = density.map(lambda d: _NUMERIC_DENSITY.get(d, d))
    missing = density == ""
    bad = ~missing & ~density.isin(labels.CLASSES)
    if bad.any():
        rows = ", ".join(f"line {i + 2}: {v!r}" for i, v in frame.loc[bad, labels.DENSITY].head(5).items())
        raise ValueError(f"{csv}: {int(bad.sum())} rows have a density that is not A-D or 1-4 ({rows})")
    frame[labels.DENSITY] = density
    frame = frame.loc[~missing].reset_index(drop=True)
    frame[LABEL] = frame[labels.DENSITY].map(labels.CLASSES.index).astype(np.int64)
    if labels.PATIENT_ID not in frame.columns or (frame[labels.PATIENT_ID] == "").all():
        log.warning(
            "%s has no patient_id: every image counts as its own patient, so the split cannot keep a "
            "patient's views together",
            csv,
        )
        frame[labels.PATIENT_ID] = frame[labels.PATH]
    if frame.empty:
        raise ValueError(f"{csv}: no row has a density; nothing to train on or score")
    duplicated = frame[labels.PATH].duplicated()
    if duplicated.any():
        first = frame.loc[duplicated, labels.PATH].iloc[0]
        raise ValueError(f"{csv}: {int(duplicated.sum())} rows repeat a file (first: {first}); list each file once")
    info = {
        "csv": str(csv),
        "source": source,
        "rows": len(frame) + int(missing.sum()),
        "without_density": int(missing.sum()),
        "labelled": len(frame),
        "synthetic": modelcard.synthetic_folder(root),
    }
    return frame, info


def with_identity(frame: pd.DataFrame, infos: Sequence[dict]) -> pd.DataFrame:
    """``frame`` with the identity that forms breasts and exams (:mod:`dens.exams`, as dens-infer forms
    them) and the manufacturer: accession, study, laterality, view and :data:`FROM_HEADER` come from the CSV
    where it gives them, else from each file's header (or, for laterality, its pixels) as the shared route
    read it (``infos``: one ``ImageInfo`` dict per row, empty for a file that gave none)."""
    frame = frame.copy()
    for column in (labels.ACCESSION, labels.STUDY_UID, labels.LATERALITY, labels.VIEW, *FROM_HEADER):
        from_file = pd.Series([info.get(column, "") for info in infos], index=frame.index)
        frame[column] = frame[column].where(frame[column] != "", from_file) if column in frame else from_file
    return frame


def counts(images: pd.DataFrame) -> dict:
    """Images, patients, exams (:func:`dens.exams.exam_key`) and images per density class of a set."""
    classes = images[labels.DENSITY].value_counts()
    return {
        "images": len(images),
        "patients": int(images[labels.PATIENT_ID].nunique()),
        "exams": len({exams.exam_key(row) for row in images.to_dict("records")}),
        "classes": {c: int(classes.get(c, 0)) for c in labels.CLASSES},
    }


def group_counts(images: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Images per value of each :data:`GROUP_COLUMNS` column the set gives (site, machine, manufacturer)."""
    return {
        column: {str(k): int(v) for k, v in images[column].astype(str).value_counts().sort_index().items()}
        for column in GROUP_COLUMNS
        if column in images and (images[column].astype(str) != "").any()
    }


def nothing_found(csv: Path, paths: Sequence[str]) -> str:
    """Where the files of a CSV none of whose files exists were looked for: relative to the CSV's folder (as
    they are read), and whether they would exist relative to the working directory (the usual mistake: paths
    written relative to where the CSV's author stood)."""
    listed = [os.path.relpath(p, csv.parent) for p in paths[:1000]]
    from_cwd = sum(os.path.exists(p) for p in listed)
    hint = (
        f"{from_cwd} of the first {len(listed)} exist relative to the working directory {Path.cwd()}: write "
        "them relative to the CSV's folder, or absolute"
        if from_cwd
        else f"nor relative to the working directory {Path.cwd()}"
    )
    return (
        f"{csv}: none of its {len(paths)} files exists. Relative paths are read relative to the CSV's folder "
        f"{csv.parent} (the first: {paths[0]}); {hint}"
    )
