"""The density classes and the column names used in every CSV: one place for both."""

from __future__ import annotations

# BI-RADS 5th edition breast composition categories, in model output order.
CLASSES: tuple[str, ...] = ("A", "B", "C", "D")
# C and D are "dense" for the patient notification required in the US since 2024.
DENSE_CLASSES: tuple[str, ...] = ("C", "D")
NUM_CLASSES = len(CLASSES)

PROB_COLUMNS: tuple[str, ...] = tuple(f"p_{c}" for c in CLASSES)

# Column names shared by train.csv, preds.csv and the aggregated CSVs.
PATH = "path"
DENSITY = "density"
PATIENT_ID = "patient_id"
IMAGE_ID = "image_id"
ACCESSION = "accession"
STUDY_UID = "study_uid"
SERIES_UID = "series_uid"
SOP_UID = "sop_uid"
LATERALITY = "laterality"
VIEW = "view"
P_DENSE = "p_dense"
DENSE = "dense"
STATUS = "status"
# An image's acquisition family and how its greys were mapped (dens.route.families): preds.csv, split.csv, dens-eval.
FAMILY, HARMONISATION = "family", "harmonisation"
REASON = "reason"
FLAGGED = "flagged"
MODEL_SHA256 = "model_sha256"
GRADCAM = "gradcam"  # preds.csv: the Grad-CAM overlay PNG, relative to preds.csv's folder

IDENTITY_COLUMNS: tuple[str, ...] = (PATIENT_ID, ACCESSION, STUDY_UID, SERIES_UID, SOP_UID, LATERALITY, VIEW)


def class_index(label: str) -> int:
    """Index of a density letter ('A'..'D', case-insensitive); ValueError for anything else."""
    key = str(label).strip().upper()
    if key not in CLASSES:
        raise ValueError(f"unknown density {label!r}: expected one of {', '.join(CLASSES)}")
    return CLASSES.index(key)


def is_dense(label: str) -> bool:
    """True for the categories that count as dense breasts (C, D)."""
    return str(label).strip().upper() in DENSE_CLASSES
