"""Pixel maths on a decoded image: pure ``(array, dataset) -> array`` functions, as pydicom's own
(Modality LUT or rescale, VOI window or LUT, min-max when there is none, MONOCHROME1 inverted), giving the
image in [0, 1] that the rest of the route works on.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset


def apply_rescale(pixels: np.ndarray, ds: Dataset) -> np.ndarray:
    """Modality LUT: a Modality LUT Sequence when present, else RescaleSlope/Intercept."""
    seq = ds.get("ModalityLUTSequence")
    if seq:
        return _apply_lut(pixels, seq[0], normalise=False)
    slope = float(ds.get("RescaleSlope") or 1.0)
    intercept = float(ds.get("RescaleIntercept") or 0.0)
    if slope == 1.0 and intercept == 0.0:
        return pixels.astype(np.float32, copy=False)
    return pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def apply_voi(pixels: np.ndarray, ds: Dataset) -> np.ndarray:
    """VOI to [0, 1]: the first VOI LUT Sequence item, else the first window with its VOILUTFunction
    (LINEAR, LINEAR_EXACT, SIGMOID), else min-max over the image."""
    seq = ds.get("VOILUTSequence")
    if seq:
        return _apply_lut(pixels, seq[0], normalise=True)
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is not None and width is not None and width > 0:
        function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
        return window(pixels, center, width, function)
    return min_max(pixels)


def window(pixels: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing, output in [0, 1]."""
    x = pixels.astype(np.float32, copy=False)
    if function == "SIGMOID":
        return (1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))).astype(np.float32)
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0.0, 1.0).astype(np.float32)
    if function != "LINEAR":
        raise ValueError(f"unknown VOILUTFunction {function!r}")
    width = max(width, 1.0)
    if width == 1.0:
        return (x > center - 0.5).astype(np.float32)
    return np.clip((x - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0).astype(np.float32)


def min_max(pixels: np.ndarray) -> np.ndarray:
    lo, hi = float(pixels.min()), float(pixels.max())
    if hi <= lo:
        return np.zeros(pixels.shape, np.float32)
    return ((pixels.astype(np.float32) - lo) / (hi - lo)).astype(np.float32)


def _first(value) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value[0]) if hasattr(value, "__len__") and not isinstance(value, str) else float(value)
    except (TypeError, ValueError, IndexError):
        return None


def _apply_lut(pixels: np.ndarray, item: Dataset, *, normalise: bool) -> np.ndarray:
    count, first, bits = (int(v) for v in item.LUTDescriptor)
    count = count or 65536
    raw = item.LUTData
    if isinstance(raw, bytes):
        lut = np.frombuffer(raw, dtype="<u2" if bits > 8 else np.uint8)
    else:
        lut = np.asarray(raw if hasattr(raw, "__len__") else [raw])
    lut = lut[:count].astype(np.float32)
    index = np.clip(np.rint(pixels).astype(np.int64) - first, 0, len(lut) - 1)
    out = lut[index]
    if normalise:
        # Some vendors declare 16 bits per entry but fill only 12: normalise by the depth the entries
        # really use (never more than declared, unless the data overflows the declaration).
        used_bits = min(bits, max(1, int(lut.max()).bit_length())) if lut.max() <= (1 << bits) - 1 else bits
        top = max(float((1 << used_bits) - 1), float(lut.max()))
        out = out / top
    return out.astype(np.float32)


def to_unit(pixels: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored values -> [0, 1] with tissue bright: Modality LUT, VOI, MONOCHROME1 inverted."""
    unit = apply_voi(apply_rescale(pixels, ds), ds)
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        unit = 1.0 - unit
    return unit
