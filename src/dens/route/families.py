"""Acquisition families and their fixed grey maps: what version 3 of the canonical image harmonises with.

A vendor's unit and its processing (and a film digitiser) decide how bright a breast of a given density
comes out; the breast decides the rest. Version 2 took the vendor out by stretching each image's own in-breast
range onto one target, and took much of the density with it: a dense breast and a fatty one ended up spanning
the same greys. Version 3 maps greys by family instead: every image of one family (maker, model, photometric
interpretation, VOI function; plain image files by bit depth) goes through the same straight line, fitted once
on the training images of that family, so that inside a family a denser breast stays brighter, while families
are brought onto one common range.

The line anchors the family's fat grey (the median of its images' in-breast 2nd percentile: fat is fat in any
breast) at :data:`TARGET`'s low end, and the grey its densest breasts reach (the 90th percentile of its images'
in-breast 98th percentiles) at the high end, so that a dense breast is not clipped white; gain capped at
:data:`MAX_GAIN`. Greys darker than fat (background, film base) go linearly onto 0..low, so black stays black.
The fit travels in the model's :class:`dens.route.config.PreprocessConfig` (``families``) and is applied unchanged at
inference, as a 256-entry table on the canonical uint8 canvas: training, which keeps unmapped canvases in its
decoded cache, and inference apply the same table to the same canvas.

A family the model never saw gets the pooled line of every family it did see (:data:`POOLED`), and its rows
say so (``harmonisation`` = ``fallback``); a config that was never fitted maps nothing (``none``).
"""

from __future__ import annotations

import functools
import statistics
from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # dens-infer's main process reads a row's family, and never imports pydicom
    from pydicom.dataset import Dataset

# Where a family's in-breast 2nd and 98th percentile greys land: darker than 0.1 is background.
TARGET = (0.1, 0.9)
MAX_GAIN = 4.0
PERCENTILES = (2.0, 98.0)
# The key of the line every fitted family pools into: what a family the model never saw is mapped with.
POOLED = "*"
# A family needs this many training images for a line of its own; rarer ones are mapped by the pooled line.
MIN_IMAGES = 8
# The quantile of a family's in-breast 98th percentiles its line's dense end sits at: its densest breasts.
DENSE_QUANTILE = 90.0
# How an image's greys were harmonised (preds.csv's ``harmonisation``): its family's fitted line, the pooled
# line (a family the model never saw), none (an unfitted version 3, or version 1), or its own range (version 2).
FAMILY, FALLBACK, NONE, IMAGE = "family", "fallback", "none", "image"

Family = tuple[str, float, float]  # key, fat grey, dense grey (in-breast 2nd and 98th percentile, [0, 1])


def of_dicom(ds: Dataset) -> str:
    """A DICOM image's family: ``maker/model/photometric/VOI/bits``, VOI being the function its window names
    (LINEAR, LINEAR_EXACT, SIGMOID), ``LUT`` for a VOI LUT Sequence or ``MINMAX`` when there is neither, and bits
    its BitsStored. An archive that strips Manufacturer (anonymised exports do) puts its units in one family
    per photometric, VOI and depth: ``?/?/...``."""
    if ds.get("VOILUTSequence"):
        voi = "LUT"
    elif ds.get("WindowCenter") not in (None, "") and ds.get("WindowWidth") not in (None, ""):
        voi = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    else:
        voi = "MINMAX"
    bits = f"{ds.get('BitsStored') or '?'}-bit"
    parts = (ds.get("Manufacturer"), ds.get("ManufacturerModelName"), ds.get("PhotometricInterpretation"), voi, bits)
    return "/".join(str(p or "?").strip().replace("/", "-") or "?" for p in parts)


def of_plain(dtype: np.dtype) -> str:
    """A plain image file's family (it carries no acquisition header): ``plain/8-bit`` or ``plain/16-bit``."""
    return f"plain/{np.dtype(dtype).itemsize * 8}-bit"


def levels(values: np.ndarray) -> tuple[float, float]:
    """An image's in-breast 2nd and 98th percentile greys (``values``: the breast's greys in [0, 1])."""
    if values.size < 16:
        return 0.0, 1.0
    lo, hi = np.percentile(values, PERCENTILES)
    return float(lo), float(hi)


def line(unit: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map greys ``lo``..``hi`` onto :data:`TARGET` by one straight line (gain capped at :data:`MAX_GAIN`),
    greys below ``lo`` onto 0..low, clipped to [0, 1]. Monotone: the order and relative spacing of greys
    above ``lo`` stay as they were."""
    t_lo, t_hi = TARGET
    gain = min(MAX_GAIN, (t_hi - t_lo) / max(hi - lo, 1e-6))
    out = (unit - np.float32(lo)) * np.float32(gain) + np.float32(t_lo)
    if lo > 0:
        out = np.where(unit < lo, unit * np.float32(t_lo / lo), out)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def table(lo: float, hi: float) -> np.ndarray:
    """:func:`line` as a 256-entry uint8 table over the canonical canvas's greys."""
    greys = np.arange(256, dtype=np.float32) / np.float32(255.0)
    return np.rint(line(greys, lo, hi) * 255.0).astype(np.uint8)


IDENTITY = np.arange(256, dtype=np.uint8)


def fit(measured: Iterable[tuple[str, tuple[float, float]]], min_images: int = MIN_IMAGES) -> tuple[Family, ...]:
    """Fit the families' lines from ``(family, (lo, hi))`` per training image: each family with at least
    ``min_images`` images gets the median of its images' fat greys (``lo``) and the :data:`DENSE_QUANTILE`
    percentile of their dense greys (``hi``), and :data:`POOLED` the same over every image. Fewer than
    ``min_images`` images in all: no fit (``()``), and the greys are left as VOI gives them."""
    by_family: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for family, (lo, hi) in measured:
        if hi > lo:
            by_family[family].append((lo, hi))
    everything = [pair for pairs in by_family.values() for pair in pairs]
    if len(everything) < min_images:
        return ()

    def ends(pairs: list[tuple[float, float]]) -> tuple[float, float]:
        lo = statistics.median(p[0] for p in pairs)
        hi = float(np.percentile([p[1] for p in pairs], DENSE_QUANTILE))
        return round(lo, 6), round(hi, 6)

    fitted = [(key, *ends(pairs)) for key, pairs in sorted(by_family.items()) if len(pairs) >= min_images]
    return tuple(line for line in (*fitted, (POOLED, *ends(everything))) if line[1] < line[2])


@functools.lru_cache(maxsize=256)
def lookup(families: tuple[Family, ...], family: str) -> tuple[np.ndarray, str]:
    """The table for ``family`` and how it was chosen (:data:`FAMILY`, :data:`FALLBACK` or :data:`NONE`). Cached:
    a decode worker asks once per image, for a handful of families (treat the table as read-only)."""
    if not families:
        return IDENTITY, NONE
    lines = {key: (lo, hi) for key, lo, hi in families}
    if family in lines and family != POOLED:
        return table(*lines[family]), FAMILY
    return table(*lines[POOLED]), FALLBACK


def unseen_warning(count: int, images: int, consequence: str) -> str:
    """What to say of ``count`` of ``images`` images mapped by the pooled line, and what follows for the reader."""
    return (
        f"{count} of {images} images are of acquisition families the model was not trained on: their greys were "
        f"mapped by the pooled line of the families it saw, so {consequence}"
    )
