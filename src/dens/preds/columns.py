"""preds.csv's columns, and how a file's outcome becomes a row: the one definition every stage writes by.

Cells hold text as :mod:`dens.preds.cells` writes it: control characters escaped, formulas guarded, the path
reversibly escaped; ``--resume`` recognises a file by its path cell.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from dens import labels
from dens.flags import FlagRule, flag_dense, prediction_cells
from dens.preds.cells import path_cell, text_cell
from dens.route.config import PreprocessConfig

FLAGGED, MODEL_SHA256, GRADCAM = labels.FLAGGED, labels.MODEL_SHA256, labels.GRADCAM
# Where the laterality came from: 'tag' (ImageLaterality/Laterality), 'orientation' (PatientOrientation),
# 'pixels' (guessed from the image), 'manifest' (the input manifest's laterality column); the maker and model
# of the unit; the preprocessing the model's metadata asked for (an edited metadata shows here, and in
# model_sha256).
LATERALITY_SOURCE, MANUFACTURER, MANUFACTURER_MODEL, PREPROCESS = (
    "laterality_source",
    "manufacturer",
    "manufacturer_model",
    "preprocess",
)
# The image's acquisition family and how its greys were mapped (dens.route.families): ``family`` (the model's line
# for that family), ``fallback`` (a family the model never saw, mapped by the pooled line of those it saw:
# review such calls with care), ``none`` or ``image`` (the routes of older models).
FAMILY, HARMONISATION = labels.FAMILY, labels.HARMONISATION
STATUSES = ("ok", "skipped", "error")
# Columns added later go at the end, but before gradcam, the column the Grad-CAM step fills afterwards:
# a reader of an older preds.csv by column name keeps working.
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
    LATERALITY_SOURCE,
    MANUFACTURER,
    MANUFACTURER_MODEL,
    PREPROCESS,
    FAMILY,
    HARMONISATION,
    GRADCAM,
)
# The columns of preds.csv files older dens-infers wrote, newest first: --resume carries such a file over.
OLDER_LAYOUTS: tuple[tuple[str, ...], ...] = (
    tuple(c for c in COLUMNS if c not in (FAMILY, HARMONISATION)),
    tuple(
        c
        for c in COLUMNS
        if c not in (LATERALITY_SOURCE, MANUFACTURER, MANUFACTURER_MODEL, PREPROCESS, FAMILY, HARMONISATION)
    ),
)
OLDER_COLUMNS = OLDER_LAYOUTS[-1]
HEADER = ",".join(COLUMNS) + "\n"
_FROM_INFO = (*labels.IDENTITY_COLUMNS, LATERALITY_SOURCE, MANUFACTURER, MANUFACTURER_MODEL, FAMILY, HARMONISATION)


def make_row(
    path: str,
    *,
    status: str,
    reason: str = "",
    info: Mapping | None = None,
    probs: Sequence[float] | None = None,
    model_sha256: str = "",
    rule: FlagRule = flag_dense,
    preprocess: str = "",
) -> dict[str, str]:
    """One preds.csv row, whatever its status: the identity from ``info`` (``ImageInfo.to_dict()``, or
    on a failure the header's identity as far as it was read; None when no header was), predictions when
    ``probs`` (scored by ``model_sha256``, flagged by ``rule``; ``preprocess``: :func:`preprocess_cell`).
    Every cell is written as :mod:`dens.preds.cells` says."""
    row = dict.fromkeys(COLUMNS, "")
    row.update(
        {
            labels.PATH: path_cell(path),
            labels.STATUS: status,
            labels.REASON: text_cell(reason),
            MODEL_SHA256: model_sha256,
            PREPROCESS: preprocess,
        }
    )
    for column in _FROM_INFO:
        row[column] = text_cell((info or {}).get(column, "") or "")
    if probs is not None:
        row.update(prediction_cells(probs, rule))
    return row


def preprocess_cell(cfg: PreprocessConfig) -> str:
    """The ``preprocess`` cell: the model's preprocessing settings, ``key=value`` joined by ``;`` (version 3's
    family grey maps as the families' count; their lines are in the model's metadata)."""
    settings = {**cfg.to_dict(), **({"families": len(cfg.families)} if cfg.version >= 3 else {})}
    return ";".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in settings.items())
