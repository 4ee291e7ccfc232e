"""The one route from a file to the canonical image: ``load(path, cfg) -> (uint8 [H, W], ImageInfo)``.

Training, validation, inference and Grad-CAM all call :func:`load`; augmentation happens after it, in
training only. numpy/OpenCV only, never torch, so decode workers stay light.

Steps: decode (reduced resolution where it is cheap) -> Modality LUT -> VOI (window or LUT, min-max when
there is none) -> MONOCHROME1 inverted -> breast crop -> in-breast grey range harmonised -> chest wall to
the left -> aspect-preserving resize onto the H x W canvas, padded -> uint8. ``PreprocessConfig.version``
names the route: version 1 (square canvas, no harmonisation, the crop of the largest bright component)
stays as it was, so a model trained on it sees what it saw.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pydicom.dataset import Dataset

from dens import decode, dicom
from dens.config import VERSION, PreprocessConfig
from dens.errors import Reason, UnusableFile

__all__ = ["IDENTITY_KEYS", "PLAIN_IMAGE_SUFFIXES", "ImageInfo", "PreprocessConfig", "load"]

PLAIN_IMAGE_SUFFIXES = (".png", ".pgm", ".tif", ".tiff")
# A first guess of how much of the image's long side the breast spans, so that most files decode once;
# the measured breast box corrects it when the guess was too deep.
_ASSUMED_BREAST_FILL = 0.8
_MASK_SIDE = 256  # the breast is found on a thumbnail of this long side
# Film labels, rulers and film edges are cut from the breast by an opening this wide (of the thumbnail's long
# side): wider than a label's stroke or an edge strip, far narrower than any breast.
_CUT_FRACTION = 0.035
HARMONISE_PERCENTILES = (2.0, 98.0)
# Where the in-breast 2nd and 98th percentiles land after harmonisation: darker than 0.1 is background.
HARMONISE_TARGET = (0.1, 0.9)
HARMONISE_MAX_GAIN = 4.0


@dataclass(frozen=True)
class ImageInfo:
    """What :func:`load` learnt about a file: identity, geometry and the route its pixels took.

    ``laterality_source``: where ``laterality`` comes from: ``tag`` (ImageLaterality, else Laterality),
    ``orientation`` (no laterality tag; PatientOrientation's column direction, read in the standard hanging:
    columns running towards the patient's right are a left breast's) or ``pixels`` (neither: the side the
    breast leans on, chest wall left for a left breast, as displayed; every plain image). '' when the file
    failed before its pixels were seen.
    """

    path: str
    patient_id: str = ""
    accession: str = ""
    study_uid: str = ""
    series_uid: str = ""
    sop_uid: str = ""
    laterality: str = ""
    laterality_source: str = ""  # 'tag', 'orientation' or 'pixels'
    view: str = ""
    manufacturer: str = ""
    manufacturer_model: str = ""
    transfer_syntax: str = ""
    photometric: str = ""
    rows: int = 0
    cols: int = 0
    decode_route: str = ""
    reduce_level: int = 0
    flipped: bool = False
    crop_box: tuple[int, int, int, int] = (0, 0, 0, 0)  # y0, y1, x0, x1 in full-resolution pixels

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


IDENTITY_KEYS = (
    "path",
    "patient_id",
    "accession",
    "study_uid",
    "series_uid",
    "sop_uid",
    "laterality",
    "laterality_source",
    "view",
    "manufacturer",
    "manufacturer_model",
    "transfer_syntax",
    "photometric",
    "rows",
    "cols",
)
"""The :class:`ImageInfo` fields a file's header gives: what ``UnusableFile.identity`` holds for a file that
failed after its header was read (the rest of ImageInfo describes decoded pixels)."""


# --- pixel maths: pure (array, dataset) -> array functions ------------------------------------------


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


# --- geometry -------------------------------------------------------------------------------------


def breast_mask(unit: np.ndarray, version: int = VERSION) -> tuple[np.ndarray, float]:
    """The breast as the largest bright component on a thumbnail; returns (mask, thumbnail scale).

    Burnt-in markers and labels are separate components and drop out; so does speckle. On digitised film the
    label, the ruler and the film's bright unexposed edges often touch the breast or each other through thin
    strips, so (version 2) an opening as wide as a label's stroke cuts those strips before the largest
    component is taken, and a dilation of the same width, inside the threshold, gives the skin line back.
    """
    small, scale = thumbnail(unit)
    return mask_of(small, version), scale


def thumbnail(unit: np.ndarray) -> tuple[np.ndarray, float]:
    """``unit`` ([0, 1]) area-averaged to a long side of at most :data:`_MASK_SIDE` (float32), and its scale:
    what the breast mask and the in-breast grey levels are measured on, made once per image."""
    h, w = unit.shape
    scale = min(1.0, _MASK_SIDE / max(h, w))
    small = cv2.resize(unit, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return small, scale


def mask_of(small: np.ndarray, version: int = VERSION) -> np.ndarray:
    """:func:`breast_mask` on a :func:`thumbnail` already made: the mask, bool at the thumbnail's size."""
    thumb = np.clip(small * 255.0, 0, 255).astype(np.uint8)
    otsu, _ = cv2.threshold(thumb, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    below = thumb[thumb <= otsu]
    background = float(np.median(below)) if below.size else 0.0
    # Otsu alone can cut a fatty breast's periphery off; a threshold nearer the background keeps it.
    threshold = background + 0.25 * (otsu - background)
    bright = (thumb > threshold).astype(np.uint8)
    if version == 1:
        kernel = np.ones((3, 3), np.uint8)
    else:
        side = max(3, int(_CUT_FRACTION * max(thumb.shape)) | 1)
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (side, side))
    mask = cv2.morphologyEx(bright, cv2.MORPH_OPEN, kernel)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count <= 1:
        return np.zeros_like(mask, dtype=bool)
    largest = (labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
    if version != 1:
        largest = cv2.dilate(largest, kernel) & bright
    return largest.astype(bool)


def in_breast_levels(small: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """The in-breast 2nd and 98th percentile grey of a :func:`thumbnail` (``small``, [0, 1]) under ``mask``."""
    values = small[mask]
    if values.size < 16:
        return 0.0, 1.0
    lo, hi = np.percentile(values, HARMONISE_PERCENTILES)
    return float(lo), float(hi)


def harmonise(unit: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map the in-breast grey range ``lo``..``hi`` (2nd-98th percentile after VOI) onto
    :data:`HARMONISE_TARGET`, linearly, clipped to [0, 1], so every vendor and film uses the range alike.

    The guard that keeps density: the map is one straight line for the whole breast, so the order and the
    relative spacing of greys inside a breast stay as VOI left them; a dense breast, whose bulk lies near its
    98th percentile, keeps a higher mean grey than a fatty one, whose bulk lies near its 2nd. Its anchor is
    the dark end, the subcutaneous fat every breast has at its periphery, and its gain is capped at
    :data:`HARMONISE_MAX_GAIN`: a breast with little above fat (a narrow span) is not stretched until its few
    strands look like dense tissue; it stays dark. Greys below ``lo`` (background, film base) go linearly
    onto 0..``t_lo``, so the canvas's black padding and a digital background stay alike.
    """
    t_lo, t_hi = HARMONISE_TARGET
    gain = min(HARMONISE_MAX_GAIN, (t_hi - t_lo) / max(hi - lo, 1e-6))
    out = (unit - np.float32(lo)) * np.float32(gain) + np.float32(t_lo)
    if lo > 0:  # below the breast's darkest grey (background): onto 0..t_lo, so black stays black
        out = np.where(unit < lo, unit * np.float32(t_lo / lo), out)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _box(mask: np.ndarray, shape: tuple[int, int], margin: float) -> tuple[int, int, int, int]:
    h, w = shape
    if not mask.any():
        return 0, h, 0, w
    ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    pad = margin * max(h, w)
    # The thumbnail's own scale on each axis (its sides were rounded), so that a mirrored image
    # gets the mirrored box.
    sy, sx = mask.shape[0] / h, mask.shape[1] / w
    y0 = max(0, int(np.floor(ys[0] / sy - pad)))
    y1 = min(h, int(np.ceil((ys[-1] + 1) / sy + pad)))
    x0 = max(0, int(np.floor(xs[0] / sx - pad)))
    x1 = min(w, int(np.ceil((xs[-1] + 1) / sx + pad)))
    return y0, y1, x0, x1


def chest_wall_from_pixels(mask: np.ndarray) -> str:
    """'left' or 'right': the chest wall is the edge the breast leans on, where most tissue lies."""
    if not mask.any():
        return "left"
    cols = mask.sum(axis=0).astype(np.float64)
    third = max(1, len(cols) // 3)
    return "left" if cols[:third].sum() >= cols[-third:].sum() else "right"


def initial_level(rows: int, cols: int, cfg: PreprocessConfig) -> int:
    """The deepest level that should leave the breast at least S on its long side."""
    return _needed_level(max(rows, cols) * _ASSUMED_BREAST_FILL, cfg) if cfg.reduce else 0


def _needed_level(breast_long_full: float, cfg: PreprocessConfig) -> int:
    """The deepest level that leaves ``breast_long_full`` (pixels at full resolution) at least S."""
    level = 0
    while level < cfg.max_reduce_levels and breast_long_full / 2 ** (level + 1) >= cfg.size:
        level += 1
    return level


def fit_to_canvas(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Aspect-preserving resize to fit ``height x width``, left-aligned (chest wall), vertically centred,
    zero-padded."""
    h, w = image.shape
    scale = min(height / h, width / w)
    nh, nw = max(1, min(height, round(h * scale))), max(1, min(width, round(w * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (nw, nh), interpolation=interp)
    canvas = np.zeros((height, width), dtype=image.dtype)
    top = (height - nh) // 2
    canvas[top : top + nh, :nw] = resized
    return canvas


# --- plain images (PNG, PGM, TIFF) ----------------------------------------------------------------


@dataclass
class _PlainImage:
    path: str
    pixels: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.pixels.shape

    def decode(self, level: int) -> tuple[np.ndarray, int, str]:
        # Clip the low-pass overshoot to the file's range, as the DICOM routes clip to BitsStored's.
        pixels = np.clip(decode.reduce_like_j2k(self.pixels, level), 0, np.iinfo(self.pixels.dtype).max)
        return pixels, level, f"opencv:lowpass{level}" if level else "opencv"

    def to_unit(self, pixels: np.ndarray) -> np.ndarray:
        # 8-bit files are display-ready; 16-bit ones often hold 10-14 bits, so stretch them.
        if self.pixels.dtype == np.uint8:
            return (pixels / 255.0).astype(np.float32)
        return min_max(pixels)


def _read_plain(path: str) -> _PlainImage:
    pixels = cv2.imread(path, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_GRAYSCALE)
    if pixels is None or pixels.size == 0:
        reason = Reason.EMPTY_FILE if Path(path).stat().st_size == 0 else Reason.CORRUPT_PIXELS
        raise UnusableFile(reason, "OpenCV could not read this image file", path)
    if pixels.dtype not in (np.uint8, np.uint16):
        raise UnusableFile(Reason.NOT_GRAYSCALE, f"unsupported pixel type {pixels.dtype}", path)
    return _PlainImage(path, pixels)


# --- the route -----------------------------------------------------------------------------------


def load(
    path: str | Path, cfg: PreprocessConfig | None = None, *, memory_budget: int | None = None
) -> tuple[np.ndarray, ImageInfo]:
    """Turn a DICOM (or PNG/PGM/TIFF) file into the canonical ``uint8 [height, width]`` image and its info.

    Raises :class:`dens.errors.UnusableFile` (with a reason code) for files that yield no image; once the
    DICOM header was read, the error carries the file's identity (:data:`IDENTITY_KEYS`), whatever failed
    after it. ``memory_budget``: bytes a decode may take (the decode engine's budget); a file whose decode
    would take more is refused from its header (``over_memory_budget``), before any pixel is read.
    """
    cfg = cfg or PreprocessConfig()
    path = str(path)
    if path.lower().endswith(PLAIN_IMAGE_SUFFIXES):
        source = _read_plain(path)
        unit_of: Callable[[np.ndarray], np.ndarray] = source.to_unit
        tags: dict = {"path": path}
    else:
        source = dicom.read(path, memory_budget=memory_budget)
        unit_of = lambda px: to_unit(px, source.ds)  # noqa: E731
        tags = source.identity
    try:
        return _canonical(source, unit_of, tags, cfg)
    except UnusableFile as exc:
        raise exc.with_identity(tags if len(tags) > 1 else None) from exc.__cause__
    except MemoryError as exc:
        detail = f"out of memory decoding {source.shape[0]}x{source.shape[1]} (rows x columns)"
        if memory_budget is not None:
            detail += f" within the {memory_budget / 2**20:,.0f} MiB a decode may take (the decode engine's budget)"
        raise UnusableFile(Reason.OVER_MEMORY_BUDGET, detail, path, identity=tags if len(tags) > 1 else None) from exc
    except Exception as exc:  # a decoder bug, after the header was read: the row keeps whose image it is
        if len(tags) <= 1:
            raise
        raise UnusableFile(Reason.UNEXPECTED, decode.first_cause(exc), path, identity=tags) from exc


def _canonical(source, unit_of: Callable[[np.ndarray], np.ndarray], tags: dict, cfg: PreprocessConfig):
    rows, cols = source.shape
    level = initial_level(rows, cols, cfg)
    while True:
        pixels, reached, route = source.decode(level)
        unit = unit_of(pixels)
        small, _ = thumbnail(unit)
        mask = mask_of(small, cfg.version)
        box = _box(mask, unit.shape, cfg.crop_margin) if cfg.crop else (0, unit.shape[0], 0, unit.shape[1])
        breast_long_full = max(box[1] - box[0], box[3] - box[2]) * 2**reached
        wanted = min(reached, _needed_level(breast_long_full, cfg)) if cfg.reduce else 0
        if wanted >= reached:
            break
        level = wanted  # the first guess was too deep for this breast: decode once more, shallower

    laterality = tags.get("laterality", "")
    laterality_source = tags.get("laterality_source", "")
    side = getattr(source, "chest_wall_side", "")
    pixel_side = chest_wall_from_pixels(mask)
    if not side:
        # Without PatientOrientation, the laterality and the display convention (chest wall of a right
        # breast on the right edge) tell the side; failing both, the pixels do.
        side = {"L": "left", "R": "right"}.get(laterality, pixel_side)
    if not laterality:
        laterality, laterality_source = ("L" if pixel_side == "left" else "R"), "pixels"

    y0, y1, x0, x1 = box
    image = unit[y0:y1, x0:x1]
    if cfg.version >= 2:
        image = harmonise(image, *in_breast_levels(small, mask))
    flipped = cfg.orient and side == "right"
    if flipped:
        image = image[:, ::-1]
    canvas = fit_to_canvas(np.ascontiguousarray(image), cfg.height, cfg.width)
    canonical = np.rint(np.clip(canvas, 0, 1) * 255).astype(np.uint8)

    factor = 2**reached
    info = ImageInfo(
        **{**tags, "rows": rows, "cols": cols, "laterality": laterality, "laterality_source": laterality_source},
        decode_route=route,
        reduce_level=reached,
        flipped=bool(flipped),
        crop_box=(y0 * factor, min(rows, y1 * factor), x0 * factor, min(cols, x1 * factor)),
    )
    return canonical, info
