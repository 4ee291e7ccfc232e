"""The one route from a file to the canonical image: ``load(path, cfg) -> (uint8 [H, W], ImageInfo)``.

Training, validation, inference and Grad-CAM all call :func:`load`; augmentation happens after it, in
training only. numpy/OpenCV only, never torch, so decode workers stay light.

Steps: decode (reduced resolution where it is cheap) -> Modality LUT -> VOI (window or LUT, min-max when
there is none) -> MONOCHROME1 inverted -> breast crop -> chest wall to the left -> aspect-preserving resize
onto the H x W canvas, padded -> uint8 -> (version 3) background outside the breast black, and the greys
mapped by the image's acquisition family's fixed line (:mod:`dens.families`). ``PreprocessConfig.version``
names the route, and older routes stay as they were, so a model trained on one sees what it saw: version 1
(square canvas, greys as VOI gives them, the crop of the largest bright component), version 2 (each image's
own in-breast range stretched onto one target before the resize).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pydicom.dataset import Dataset

from dens import decode, dicom, families, sources
from dens.config import VERSION, PreprocessConfig
from dens.errors import Reason, UnusableFile

__all__ = ["IDENTITY_KEYS", "ImageInfo", "PreprocessConfig", "load"]

# A first guess of how much of the image's long side the breast spans, so that most files decode once;
# the measured breast box corrects it when the guess was too deep.
_ASSUMED_BREAST_FILL = 0.8
_MASK_SIDE = 256  # the breast is found on a thumbnail of this long side
# Film labels, rulers and film edges are cut from the breast by an opening this wide (of the thumbnail's long
# side): wider than a label's stroke or an edge strip, far narrower than any breast.
_CUT_FRACTION = 0.035


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
    # The acquisition family (dens.families), the in-breast 2nd/98th percentile greys after VOI that its
    # grey map is fitted on, and how the greys were harmonised (families.FAMILY, FALLBACK, NONE or IMAGE).
    family: str = ""
    breast_levels: tuple[float, float] = (0.0, 0.0)
    harmonisation: str = ""

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
    # Version 3 opens with black beyond the image, so a strip along the border (a film's edge, a scanner's
    # frame) is as thin as it looks and goes; versions 1-2 took the border as bright, keeping such strips.
    border = {"borderType": cv2.BORDER_CONSTANT, "borderValue": 0} if version >= 3 else {}
    mask = cv2.morphologyEx(bright, cv2.MORPH_OPEN, kernel, **border)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count <= 1:
        return np.zeros_like(mask, dtype=bool)
    largest = (labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
    if version == 1:
        return largest.astype(bool)
    regrown = cv2.dilate(largest, kernel) & bright
    if version >= 3:
        # A film's bright unexposed edge runs along the image's border and touches the breast there: within a
        # kernel of the border only what survived the opening stays (the breast, not a strip along it).
        band = np.zeros_like(regrown)
        k = kernel.shape[0]
        band[:k], band[-k:], band[:, :k], band[:, -k:] = 1, 1, 1, 1
        regrown = np.where(band > 0, largest, regrown)
        regrown = _without_bright_edges(small, regrown, k)
    return regrown.astype(bool)


# A film's unexposed edge is near white and clearly brighter than the breast beside it.
_EDGE_GREY, _EDGE_STEP = 0.85, 0.08


def _without_bright_edges(small: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
    """``mask`` without the rows (columns) along each image border whose mean in-breast grey is near white and
    brighter than the breast just inside it: a film edge lying along the breast (above an MLO's pectoral
    muscle), which the opening cannot tell from the breast because the breast continues under it. At most
    ``2k`` deep."""
    mask = mask.copy()
    if min(mask.shape) < 6 * k:
        return mask
    for axis in (0, 1):
        lines, inside = np.moveaxis(small, axis, 0), np.moveaxis(mask, axis, 0)
        for edge in (slice(0, 3 * k), slice(-1, -3 * k - 1, -1)):
            weight = inside[edge].astype(np.float32)
            # Each row's mean grey inside the breast (0 for a row without breast: darker than any edge).
            greys = (lines[edge] * weight).sum(1) / np.maximum(weight.sum(1), 1.0)
            beyond = float(np.median(greys[2 * k :]))
            edge_like = greys[: 2 * k] >= max(_EDGE_GREY, beyond + _EDGE_STEP)
            depth = int(np.argmin(edge_like)) if not edge_like.all() else 2 * k
            if depth:  # and the next two rows, half edge: the canvas's soft mask reaches beyond the mask
                rows = np.arange(inside.shape[0])[edge][: depth + 2]
                inside[rows] = False
    return mask


def in_breast_levels(small: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """The in-breast 2nd and 98th percentile grey of a :func:`thumbnail` (``small``, [0, 1]) under ``mask``."""
    return families.levels(small[mask])


def harmonise(unit: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Version 2: map this image's own in-breast grey range ``lo``..``hi`` (2nd-98th percentile after VOI) onto
    one target by :func:`dens.families.line`. Per image, it takes the vendor out and much of the density with
    it (a dense and a fatty breast end up spanning the same greys); version 3 uses one line per family."""
    return families.line(unit, lo, hi)


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
    """The deepest level that should leave the breast at least ``cfg.decode_side`` on its long side."""
    return _needed_level(max(rows, cols) * _ASSUMED_BREAST_FILL, cfg) if cfg.reduce else 0


def _needed_level(breast_long_full: float, cfg: PreprocessConfig) -> int:
    """The deepest level that leaves ``breast_long_full`` (pixels at full resolution) at least
    ``cfg.decode_side``."""
    level = 0
    while level < cfg.max_reduce_levels and breast_long_full / 2 ** (level + 1) >= cfg.decode_side:
        level += 1
    return level


def placement(h: int, w: int, height: int, width: int) -> tuple[int, int, int]:
    """Where :func:`fit_to_canvas` puts an ``h x w`` image: its resized height and width, and its top row."""
    scale = min(height / h, width / w)
    nh, nw = max(1, min(height, round(h * scale))), max(1, min(width, round(w * scale)))
    return nh, nw, (height - nh) // 2


def fit_to_canvas(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Aspect-preserving resize to fit ``height x width``, left-aligned (chest wall), vertically centred,
    zero-padded."""
    h, w = image.shape
    nh, nw, top = placement(h, w, height, width)
    interp = cv2.INTER_AREA if min(height / h, width / w) < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (nw, nh), interpolation=interp)
    canvas = np.zeros((height, width), dtype=image.dtype)
    canvas[top : top + nh, :nw] = resized
    return canvas


def breast_on_canvas(
    mask: np.ndarray,
    unit_shape: tuple[int, int],
    box: tuple[int, int, int, int],
    flipped: bool,
    canvas: tuple[int, int],
) -> np.ndarray:
    """The thumbnail's breast ``mask`` where :func:`fit_to_canvas` puts the cropped (and ``flipped``) image: a
    float32 ``canvas``-sized weight, 1 inside the breast, 0 outside, soft over a few thumbnail pixels at the skin
    line. Holes in the mask are filled first (a dark fat lobule is breast)."""
    filled = np.zeros(mask.shape, np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    # Grown by a thumbnail pixel and softened over two more: the skin line stays whole, and the mask's thumbnail
    # steps do not show as a staircase on the canvas.
    filled = cv2.GaussianBlur(cv2.dilate(filled, np.ones((3, 3), np.uint8)).astype(np.float32), (5, 5), 1.0)
    (uh, uw), (y0, y1, x0, x1) = unit_shape, box
    nh, nw, top = placement(y1 - y0, x1 - x0, *canvas)
    sy, sx = mask.shape[0] / uh, mask.shape[1] / uw
    # Canvas pixel -> crop pixel (cv2.resize's pixel-centre mapping) -> unit pixel -> thumbnail pixel.
    ky, kx = (y1 - y0) / nh, (x1 - x0) / nw
    ay, by = sy * ky, sy * (y0 + 0.5 * ky - top * ky) - 0.5
    if flipped:
        ax, bx = -sx * kx, sx * (x1 - 0.5 * kx) - 0.5
    else:
        ax, bx = sx * kx, sx * (x0 + 0.5 * kx) - 0.5
    to_thumb = np.array([[ax, 0.0, bx], [0.0, ay, by]], np.float64)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    weight = cv2.warpAffine(filled, to_thumb, (canvas[1], canvas[0]), flags=flags, borderValue=0)
    weight[:top] = weight[top + nh :] = 0
    weight[:, nw:] = 0
    return weight


# --- plain images (PNG, PGM, TIFF) ----------------------------------------------------------------


@dataclass
class _PlainImage:
    path: str
    pixels: np.ndarray
    decoder: str = "opencv"

    @property
    def shape(self) -> tuple[int, int]:
        return self.pixels.shape

    def decode(self, level: int) -> tuple[np.ndarray, int, str]:
        # Clip the low-pass overshoot to the file's range, as the DICOM routes clip to BitsStored's.
        pixels = np.clip(decode.reduce_like_j2k(self.pixels, level), 0, np.iinfo(self.pixels.dtype).max)
        return pixels, level, f"{self.decoder}:lowpass{level}" if level else self.decoder

    @property
    def family(self) -> str:
        return families.of_plain(self.pixels.dtype)

    def to_unit(self, pixels: np.ndarray, version: int) -> np.ndarray:
        # 8-bit files are display-ready. 16-bit ones (12-bit JPEG, 16-bit PNG) often hold 10-14 bits: versions
        # 1-2 stretch each image's range; version 3 divides by the depth the values use (an even number of
        # bits, 10 at least), so a dense breast is not stretched like a fatty one.
        if self.pixels.dtype == np.uint8:
            return (pixels / 255.0).astype(np.float32)
        if version < 3:
            return min_max(pixels)
        bits = max(10, int(self.pixels.max()).bit_length() + 1) & ~1
        return (pixels / float((1 << bits) - 1)).astype(np.float32)


def _read_plain(path: str) -> _PlainImage:
    pixels, decoder = cv2.imread(path, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_GRAYSCALE), "opencv"
    if pixels is None and path.lower().endswith((".jpg", ".jpeg")):
        pixels, decoder = _read_jpeg12(path), "libjpeg"
    if pixels is None or pixels.size == 0:
        reason = Reason.EMPTY_FILE if Path(path).stat().st_size == 0 else Reason.CORRUPT_PIXELS
        raise UnusableFile(reason, "OpenCV could not read this image file", path)
    if pixels.dtype not in (np.uint8, np.uint16):
        raise UnusableFile(Reason.NOT_GRAYSCALE, f"unsupported pixel type {pixels.dtype}", path)
    return _PlainImage(path, pixels, decoder)


def _read_jpeg12(path: str) -> np.ndarray | None:
    """A 12-bit JPEG (as public mammogram sets ship), which OpenCV does not read: libjpeg's decoder, which
    reads the DICOM JPEG syntaxes too. None when it cannot read it either."""
    from libjpeg import decode as jpeg_decode  # imported here: DICOM decoding reaches it through pydicom

    try:
        pixels = jpeg_decode(Path(path).read_bytes())
    except (RuntimeError, ValueError, OSError):
        return None
    if pixels.ndim == 3:
        raise UnusableFile(Reason.NOT_GRAYSCALE, f"a {pixels.shape[2]}-channel 12-bit JPEG, not a grey image", path)
    return pixels


# --- the route -----------------------------------------------------------------------------------


def load(
    path: str | Path, cfg: PreprocessConfig | None = None, *, memory_budget: int | None = None
) -> tuple[np.ndarray, ImageInfo]:
    """Turn a DICOM (or PNG/PGM/TIFF/JPEG) file into the canonical ``uint8 [height, width]`` image and its info.

    Raises :class:`dens.errors.UnusableFile` (with a reason code) for files that yield no image; once the
    DICOM header was read, the error carries the file's identity (:data:`IDENTITY_KEYS`), whatever failed
    after it. ``memory_budget``: bytes a decode may take (the decode engine's budget); a file whose decode
    would take more is refused from its header (``over_memory_budget``), before any pixel is read.
    """
    cfg = cfg or PreprocessConfig()
    path = str(path)
    if sources.is_plain_image(path):
        source = _read_plain(path)
        unit_of: Callable[[np.ndarray], np.ndarray] = lambda px: source.to_unit(px, cfg.version)  # noqa: E731
        tags: dict = {"path": path}
        family = source.family
    else:
        source = dicom.read(path, memory_budget=memory_budget)
        unit_of = lambda px: to_unit(px, source.ds)  # noqa: E731
        tags = source.identity
        family = families.of_dicom(source.ds)
    try:
        return _canonical(source, unit_of, tags, family, cfg)
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


def _canonical(source, unit_of: Callable[[np.ndarray], np.ndarray], tags: dict, family: str, cfg: PreprocessConfig):
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
    levels = in_breast_levels(small, mask)
    harmonisation = families.NONE
    if cfg.version == 2:
        image, harmonisation = harmonise(image, *levels), families.IMAGE
    flipped = cfg.orient and side == "right"
    if flipped:
        image = image[:, ::-1]
    canvas = fit_to_canvas(np.ascontiguousarray(image), cfg.height, cfg.width)
    if cfg.version >= 3:
        canvas *= breast_on_canvas(mask, unit.shape, box, flipped, cfg.shape)
    canonical = np.rint(np.clip(canvas, 0, 1) * 255).astype(np.uint8)
    if cfg.version >= 3:
        table, harmonisation = families.lookup(cfg.families, family)
        canonical = table[canonical]

    factor = 2**reached
    info = ImageInfo(
        **{**tags, "rows": rows, "cols": cols, "laterality": laterality, "laterality_source": laterality_source},
        decode_route=route,
        reduce_level=reached,
        flipped=bool(flipped),
        crop_box=(y0 * factor, min(rows, y1 * factor), x0 * factor, min(cols, x1 * factor)),
        family=family,
        breast_levels=(round(levels[0], 6), round(levels[1], 6)),
        harmonisation=harmonisation,
    )
    return canonical, info
