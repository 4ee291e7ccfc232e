"""The one route from a file to the canonical image: ``load(path, cfg) -> (uint8 [H, W], ImageInfo)``.

Training, validation, inference and Grad-CAM all call :func:`load`; augmentation happens after it, in
training only. numpy/OpenCV only, never torch, so decode workers stay light.

Steps: decode (reduced resolution where it is cheap) -> Modality LUT -> VOI (window or LUT, min-max when
there is none) -> MONOCHROME1 inverted -> breast crop -> chest wall to the left -> aspect-preserving resize
onto the H x W canvas, padded -> uint8 -> (version 3) background outside the breast black, and the greys
mapped by the image's acquisition family's fixed line (:mod:`dens.route.families`). ``PreprocessConfig.version``
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

from dens import sources
from dens.route import decode, dicom, families, geometry
from dens.route.config import PreprocessConfig
from dens.route.errors import Reason, UnusableFile
from dens.route.greyscale import min_max, to_unit

__all__ = ["IDENTITY_KEYS", "ImageInfo", "PreprocessConfig", "load"]

# A first guess of how much of the image's long side the breast spans, so that most files decode once;
# the measured breast box corrects it when the guess was too deep.
_ASSUMED_BREAST_FILL = 0.8


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
    # The acquisition family (dens.route.families), the in-breast 2nd/98th percentile greys after VOI that its
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


# --- grey levels ----------------------------------------------------------------------------------


def in_breast_levels(small: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """The in-breast 2nd and 98th percentile grey of a :func:`thumbnail` (``small``, [0, 1]) under ``mask``."""
    return families.levels(small[mask])


def harmonise(unit: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Version 2: map this image's own in-breast grey range ``lo``..``hi`` (2nd-98th percentile after VOI) onto
    one target by :func:`dens.route.families.line`. Per image, it takes the vendor out and much of the density with
    it (a dense and a fatty breast end up spanning the same greys); version 3 uses one line per family."""
    return families.line(unit, lo, hi)


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

    Raises :class:`dens.route.errors.UnusableFile` (with a reason code) for files that yield no image; once the
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
        small, _ = geometry.thumbnail(unit)
        mask = geometry.mask_of(small, cfg.version)
        box = geometry.crop_box(mask, unit.shape, cfg.crop_margin) if cfg.crop else (0, unit.shape[0], 0, unit.shape[1])
        breast_long_full = max(box[1] - box[0], box[3] - box[2]) * 2**reached
        wanted = min(reached, _needed_level(breast_long_full, cfg)) if cfg.reduce else 0
        if wanted >= reached:
            break
        level = wanted  # the first guess was too deep for this breast: decode once more, shallower

    laterality = tags.get("laterality", "")
    laterality_source = tags.get("laterality_source", "")
    side = getattr(source, "chest_wall_side", "")
    pixel_side = geometry.chest_wall_from_pixels(mask)
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
    canvas = geometry.fit_to_canvas(np.ascontiguousarray(image), cfg.height, cfg.width)
    if cfg.version >= 3:
        canvas *= geometry.breast_on_canvas(mask, unit.shape, box, flipped, cfg.shape)
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
