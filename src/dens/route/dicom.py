"""File -> header identity + decoded stored pixel values: what a usable mammogram is, and its decoder.

:mod:`dens.route.dicomio` reads the header up to the pixel data and no further, and locates the pixel data from
its element's own header; a compressed frame's own header (JPEG SOF, JPEG 2000 SIZ or JP2 ihdr) says its
size. So every decision that can be made before decoding is made before any pixel byte is loaded: not DICOM,
not a usable mammogram, multi-frame, pixel data shorter than the declared geometry, a codestream of another
size or kind than the header and the transfer syntax say, a decode over the memory budget. A file refused
there costs milliseconds and no large allocation, whatever it claims.

The decoder is chosen by transfer syntax. JPEG 2000 is decoded with Pillow, which can stop the wavelet
synthesis early (``Image.reduce``) and return the image at 1/2**level resolution for a fraction of the
cost; other syntaxes are decoded in full by pydicom's plugins and then downsampled with the same
low-pass filter, so the model sees nearly the same image whichever syntax a file came in. GDCM's own
reader is the last resort when pydicom's plugins all fail (it decodes 12-bit JPEG Extended, which they
cannot). The decoders live in :mod:`dens.route.decode`, the reading of the file's bytes in :mod:`dens.route.dicomio`,
the error type in :mod:`dens.route.errors`; this module checks the file is a usable presentation mammogram
(SOP class, modality, views, geometry) and picks the decoder.

Files that cannot be used raise :class:`UnusableFile` with a :class:`Reason` and, once the header was read,
the file's identity; inference turns it into a row (``skipped`` or ``error``), training counts it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from dens.route.decode import (
    SYNTAX_FAMILIES,
    Codestream,
    decode_gdcm,
    decode_j2k_reduced,
    decode_pydicom,
    first_cause,
    hold_to_range,
    memory_room,
    read_codestream_header,
    reduce_like_j2k,
)
from dens.route.dicomio import PixelElement, header_number, header_text, load_pixel_data, read_header
from dens.route.errors import Reason, UnusableFile

__all__ = ["EXCLUSION_RULES", "JPEG2000_SYNTAXES", "MAMMO_FOR_PRESENTATION", "DicomFile", "ExclusionRule", "read"]

log = logging.getLogger(__name__)


# --- SOP classes and transfer syntaxes -------------------------------------------------------------

MAMMO_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
_FOR_PROCESSING_SOP = {
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray, For Processing
    "1.2.840.10008.5.1.4.1.1.1.2.1",  # Digital Mammography X-Ray, For Processing
    "1.2.840.10008.5.1.4.1.1.1.3.1",  # Digital Intra-Oral X-Ray, For Processing
}
_NON_IMAGE_SOP_PREFIXES = (
    "1.2.840.10008.1.3.10",  # Media Storage Directory (DICOMDIR)
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports, key object selection
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated PDF / CDA / STL
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, registration, segmentation, fiducials
    "1.2.840.10008.5.1.4.1.1.9.",  # waveforms
    "1.2.840.10008.5.1.4.1.1.481.",  # radiotherapy objects
)
# Modalities that can carry a 2D mammogram ("" = absent, common in anonymised RSNA files).
_MAMMO_MODALITIES = {"", "MG", "DX", "CR", "RG", "OT", "SC", "XC"}

JPEG2000_SYNTAXES = {
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.201",  # HTJ2K lossless (Pillow handles when its openjpeg does)
    "1.2.840.10008.1.2.4.202",
    "1.2.840.10008.1.2.4.203",
}
_SYNTAX_NAMES = {
    "1.2.840.10008.1.2.4.50": "JPEG Baseline",
    "1.2.840.10008.1.2.4.51": "JPEG Extended",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1",
}

_VIEW_MEANINGS = {
    "cranio-caudal": "CC",
    "medio-lateral oblique": "MLO",
    "medio-lateral": "ML",
    "latero-medial": "LM",
    "exaggerated cranio-caudal": "XCCL",
    "latero-medial oblique": "LMO",
    "caudo-cranial": "FB",
    "axillary tail": "AT",
}


# --- which images are not routine screening views ---------------------------------------------------


@dataclass(frozen=True)
class ExclusionRule:
    """Images whose ``tags`` match ``pattern`` (a case-insensitive regular expression, searched in the value;
    for a code sequence, in each item's CodeMeaning, nested ViewModifierCodeSequence items included) are
    skipped with ``reason``; ``means`` says what such a value is."""

    tags: tuple[str, ...]
    pattern: str
    reason: Reason
    means: str


EXCLUSION_RULES: tuple[ExclusionRule, ...] = (
    ExclusionRule(
        ("ViewPosition",),
        r"^(CV|SPOT|MAG|M|SPOT ?MAG|MAG ?SPOT|[A-Z]+ ?ID)$",
        Reason.EXCLUDED_VIEW,
        "a cleavage (CV), spot, magnification (M, MAG) or implant-displaced (CCID, MLOID...) view",
    ),
    ExclusionRule(
        ("ViewCodeSequence", "ViewModifierCodeSequence"),
        r"magnif|spot|cleavage|implant displaced|rolled|tangential|axillary tissue",
        Reason.EXCLUDED_VIEW,
        "a magnification, spot compression, cleavage, implant-displaced, rolled, tangential or axillary tissue view",
    ),
    ExclusionRule(
        ("ViewCodeSequence", "ViewModifierCodeSequence"),
        r"specimen",
        Reason.NOT_SCREENING,
        "a specimen radiograph",
    ),
    ExclusionRule(
        ("SeriesDescription", "StudyDescription", "PerformedProcedureStepDescription", "RequestedProcedureDescription"),
        r"biops|specimen|stereo|locali[sz]|needle|\bclips?\b|\b(hook ?)?wire\b|galactogra|ductogra|\bfna\b",
        Reason.NOT_SCREENING,
        "a biopsy, specimen, stereotactic, localisation (needle, hook wire), clip placement or "
        "galactography/ductography procedure",
    ),
)
"""Which images are not routine screening (or diagnostic) mammograms, and the tag each rule reads.

A density call is made only on the standard views of a breast (CC, MLO and their kin). dens skips:

- ``excluded_view``: views that show part of a breast, magnified or displaced: ViewPosition ``CV``
  (cleavage), ``SPOT``, ``MAG``/``M`` (magnification), ``...ID`` (implant displaced: ``CCID``, ``MLOID``);
  a ViewCodeSequence or ViewModifierCodeSequence item (the MG IOD nests the modifiers in the view's item;
  some vendors write them at the top level) whose CodeMeaning names a magnification, spot compression,
  cleavage, implant-displaced, rolled, tangential or axillary tissue view.
- ``not_screening``: images of a procedure: a SeriesDescription, StudyDescription,
  PerformedProcedureStepDescription or RequestedProcedureDescription that names a biopsy, a specimen,
  stereotactic guidance, a localisation (needle, hook wire), a clip or a galactography/ductography; a view
  code that names a specimen.

Only the file's own tags decide; a file without them is scored. The study description rule skips every
image of such a study, the routine-looking views of a biopsy study included.
"""


# --- the file ---------------------------------------------------------------------------------------


@dataclass
class DicomFile:
    """A parsed DICOM file that passed the usability checks, with its pixel data still in the file."""

    path: str
    ds: Dataset
    transfer_syntax: str
    sop_class: str
    pixel_element: PixelElement | None = None  # None: the pixel data is already in ``ds`` (deflated files)
    codestream: Codestream | None = None  # what a compressed frame's own header says
    _full: tuple[np.ndarray, str] | None = field(default=None, repr=False)

    # identity -----------------------------------------------------------------------------------
    @property
    def identity(self) -> dict:
        """Whose image this is and what the header says of it: the identity keys of
        :class:`dens.route.preprocess.ImageInfo`, as far as the header gives them."""
        meta = getattr(self.ds, "file_meta", Dataset())
        sop_uid = header_text(self.ds, "SOPInstanceUID") or header_text(meta, "MediaStorageSOPInstanceUID")
        laterality, source = self.laterality_and_source
        return {
            "path": self.path,
            "patient_id": header_text(self.ds, "PatientID"),
            "accession": header_text(self.ds, "AccessionNumber"),
            "study_uid": header_text(self.ds, "StudyInstanceUID"),
            "series_uid": header_text(self.ds, "SeriesInstanceUID"),
            "sop_uid": sop_uid,
            "laterality": laterality,
            "laterality_source": source,
            "view": self.view,
            "manufacturer": header_text(self.ds, "Manufacturer"),
            "manufacturer_model": header_text(self.ds, "ManufacturerModelName"),
            "transfer_syntax": self.transfer_syntax,
            "photometric": self.photometric,
            "rows": header_number(self.ds, "Rows"),
            "cols": header_number(self.ds, "Columns"),
        }

    @property
    def laterality_and_source(self) -> tuple[str, str]:
        """('L' or 'R', 'tag') from ImageLaterality, then Laterality; else ('L' or 'R', 'orientation') from
        PatientOrientation's column direction (a left breast's columns run towards the patient's right:
        ``A\\R`` for a left CC, ``P\\FL`` for a right MLO, in the standard hanging); else ('', '')."""
        for keyword in ("ImageLaterality", "Laterality"):
            value = header_text(self.ds, keyword).upper()
            if value in ("L", "R"):
                return value, "tag"
        column = self._orientation(1)
        if ("R" in column) != ("L" in column):
            return ("L" if "R" in column else "R"), "orientation"
        return "", ""

    @property
    def laterality(self) -> str:
        """'L' or 'R' from the tags (see :attr:`laterality_and_source`); '' when they do not say."""
        return self.laterality_and_source[0]

    @property
    def view(self) -> str:
        """ViewPosition, then ViewCodeSequence's meaning; '' when neither says."""
        view = header_text(self.ds, "ViewPosition").upper()
        if view:
            return view
        try:
            seq = self.ds.get("ViewCodeSequence")
            meaning = str(seq[0].get("CodeMeaning", "")).strip().lower() if seq else ""
        except Exception:
            return ""
        return _VIEW_MEANINGS.get(meaning, meaning.upper())

    @property
    def chest_wall_side(self) -> str:
        """'left'/'right' from PatientOrientation's row direction ('A': moving right goes anterior)."""
        row_dir = self._orientation(0)[:1]
        return {"A": "left", "P": "right"}.get(row_dir, "")

    def _orientation(self, axis: int) -> str:
        try:
            orientation = self.ds.get("PatientOrientation")
            return str(orientation[axis]).strip().upper() if orientation and len(orientation) > axis else ""
        except Exception:
            return ""

    @property
    def photometric(self) -> str:
        return header_text(self.ds, "PhotometricInterpretation").upper()

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.ds.Rows), int(self.ds.Columns)

    @property
    def stored_range(self) -> tuple[int, int]:
        bits = int(self.ds.get("BitsStored") or self.ds.get("BitsAllocated") or 16)
        if int(self.ds.get("PixelRepresentation") or 0) == 1:
            return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        return 0, (1 << bits) - 1

    @property
    def decode_bytes(self) -> int:
        """About the most memory a decode of this file takes: the decoded frame, a decoder's copy of it
        and three float32 working images (the full-resolution route's peak)."""
        rows, cols = self.shape
        allocated = max(1, int(self.ds.get("BitsAllocated") or 16) // 8)
        return rows * cols * int(self.ds.get("SamplesPerPixel") or 1) * (2 * allocated + 12)

    # pixels ---------------------------------------------------------------------------------------
    def decode(self, level: int) -> tuple[np.ndarray, int, str]:
        """Stored values at 1/2**level resolution (float32), the level reached, and the route taken.

        JPEG 2000 tries the requested level and falls back level by level (a codestream encoded with
        fewer decomposition levels fails beyond them). Other syntaxes decode in full once and are
        downsampled with the JPEG 2000 low-pass filter.
        """
        load_pixel_data(self.ds, self.pixel_element, self.path)  # only now, after every check passed
        codestream_family = self.codestream.family if self.codestream else SYNTAX_FAMILIES.get(self.transfer_syntax)
        if codestream_family == "JPEG 2000":
            for lvl in range(level, -1, -1):
                try:
                    pixels = decode_j2k_reduced(self.ds, lvl, self.stored_range, self.path)
                except MemoryError:
                    raise
                except Exception as exc:  # Pillow raises OSError, ValueError... for a level too deep
                    log.debug("%s: JPEG 2000 at level %d failed: %s", self.path, lvl, exc)
                    continue
                return pixels, lvl, f"pillow-j2k:reduce{lvl}"
        full, route = self._decode_full()
        # Clip the low-pass overshoot at sharp edges as the JPEG 2000 route does, so the two agree.
        pixels = hold_to_range(reduce_like_j2k(full, level), self.stored_range, self.path, clip=True)
        return pixels, level, f"{route}:lowpass{level}" if level else route

    def _decode_full(self) -> tuple[np.ndarray, str]:
        if self._full is not None:
            return self._full
        errors = []
        decoders = (("pydicom", lambda: decode_pydicom(self.ds)), ("gdcm", lambda: decode_gdcm(self.path)))
        for name, decoder in decoders:
            try:
                pixels = decoder()
            except MemoryError:
                raise
            except Exception as exc:
                errors.append(f"{name}: {first_cause(exc)}")
                continue
            if pixels.shape != self.shape:
                errors.append(f"{name} decoded {_size(pixels.shape)}, the header says {_size(self.shape)}")
                continue
            self._full = (hold_to_range(pixels, self.stored_range, self.path, clip=False), name)
            return self._full
        diagnosis = _diagnose(self)
        detail = "no decoder could read the pixel data (" + "; ".join(errors) + ")"
        raise UnusableFile(Reason.CORRUPT_PIXELS, f"{diagnosis}; {detail}" if diagnosis else detail, self.path)


def _size(shape: tuple[int, ...]) -> str:
    return f"{shape[0]}x{shape[1]} (rows x columns)" if len(shape) >= 2 else str(shape)


def _syntax_name(syntax: str) -> str:
    name = _SYNTAX_NAMES.get(syntax)
    if name is None:
        try:
            name = pydicom.uid.UID(syntax).name
        except Exception:
            name = syntax
    return name or syntax


def _diagnose(f: DicomFile) -> str:
    """What the compressed frame's first bytes say, when no decoder could read it."""
    if f.pixel_element is None or not f.pixel_element.encapsulated or f.codestream is not None:
        return ""
    head = f.pixel_element.head[:4]
    return f"the {_syntax_name(f.transfer_syntax)} frame does not start like one (its first bytes: {head.hex(' ')})"


# --- opening and checking a file -------------------------------------------------------------------


def read(path: str | Path, *, any_modality: bool = False, memory_budget: int | None = None) -> DicomFile:
    """Parse a DICOM file's header and check it holds a usable 2D For-Presentation mammogram.

    Raises :class:`UnusableFile` with the reason when it does not (with the file's identity once the header
    was read). No pixel data is read here: only the Pixel Data element's header and a compressed frame's
    first bytes. ``any_modality`` lifts the mammography and view checks (decoder tests run on CT/MR
    samples). ``memory_budget``: bytes a decode may take (default: what the process may still allocate under
    its RLIMIT_DATA, which the decode engine sets per file; no limit, no check); a file whose decode would
    take more is refused from its header.
    """
    path = str(path)
    ds, pixel_element = read_header(path)
    meta = getattr(ds, "file_meta", Dataset())
    sop_class = header_text(ds, "SOPClassUID") or header_text(meta, "MediaStorageSOPClassUID")
    syntax = header_text(meta, "TransferSyntaxUID") or pydicom.uid.ImplicitVRLittleEndian
    f = DicomFile(path=path, ds=ds, transfer_syntax=syntax, sop_class=sop_class, pixel_element=pixel_element)
    try:
        _check(f, any_modality, memory_budget)
    except UnusableFile as exc:
        raise exc.with_identity(f.identity) from exc.__cause__
    return f


def _check(f: DicomFile, any_modality: bool, memory_budget: int | None) -> None:
    ds, path, sop_class = f.ds, f.path, f.sop_class
    if sop_class.startswith(_NON_IMAGE_SOP_PREFIXES):
        raise UnusableFile(Reason.NON_IMAGE_OBJECT, f"SOP class {sop_class} is not an image", path)
    if f.pixel_element is None and "PixelData" not in ds:
        raise UnusableFile(Reason.NO_PIXEL_DATA, f"no pixel data (SOP class {sop_class or 'absent'})", path)
    intent = header_text(ds, "PresentationIntentType").upper()
    if sop_class in _FOR_PROCESSING_SOP or intent == "FOR PROCESSING":
        raise UnusableFile(Reason.FOR_PROCESSING, "a 'For Processing' (raw detector) image", path)
    if not any_modality:
        _check_mammography(f)
        _check_exclusions(f)
    for keyword in ("NumberOfFrames", "RescaleSlope", "RescaleIntercept", "Rows", "Columns", "BitsAllocated"):
        # Text numbers (IS, DS) come back as the raw string when malformed ('1A'): an error, not a crash.
        try:
            float(ds.get(keyword) or 0)
        except (TypeError, ValueError):
            raise UnusableFile(Reason.UNREADABLE, f"{keyword} {ds.get(keyword)!r} is not a number", path) from None
    if int(ds.get("NumberOfFrames") or 1) > 1:
        raise UnusableFile(Reason.MULTI_FRAME, f"{ds.NumberOfFrames} frames (tomosynthesis?)", path)
    if int(ds.get("SamplesPerPixel") or 1) != 1 or f.photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise UnusableFile(Reason.NOT_GRAYSCALE, f"photometric interpretation {f.photometric or 'absent'}", path)
    for keyword in ("Rows", "Columns", "BitsAllocated"):
        if not ds.get(keyword):
            raise UnusableFile(Reason.UNREADABLE, f"{keyword} missing from the header", path)
    if not pydicom.uid.UID(f.transfer_syntax).is_transfer_syntax:
        raise UnusableFile(Reason.UNSUPPORTED_SYNTAX, f"unknown transfer syntax {f.transfer_syntax}", path)
    _check_geometry(f)
    if memory_budget is None:
        memory_budget = memory_room()
    if memory_budget is not None and f.decode_bytes > memory_budget:
        raise UnusableFile(
            Reason.OVER_MEMORY_BUDGET,
            f"decoding {_size(f.shape)} takes about {f.decode_bytes / 2**20:,.0f} MiB, over the "
            f"{memory_budget / 2**20:,.0f} MiB this decode may take (the decode engine's memory budget per file)",
            path,
        )


def _check_geometry(f: DicomFile) -> None:
    """The declared geometry against the pixel data, before any decoder runs: a native value must hold
    Rows x Columns x BitsAllocated; a compressed frame's own header must declare Rows x Columns (and the
    codestream must be the kind the transfer syntax says, or at least one dens can decode)."""
    where = f.pixel_element
    if where is None:  # deflated: pydicom inflated the data set, pixel data included, and checks it itself
        return
    rows, cols = f.shape
    syntax = pydicom.uid.UID(f.transfer_syntax)
    if not where.encapsulated:
        if syntax.is_compressed and syntax != pydicom.uid.DeflatedExplicitVRLittleEndian:
            raise UnusableFile(
                Reason.CORRUPT_PIXELS,
                f"the transfer syntax is {_syntax_name(syntax)} (compressed) but the pixel data is not encapsulated",
                f.path,
            )
        bits = int(f.ds.BitsAllocated)
        needed = (rows * cols * int(f.ds.get("SamplesPerPixel") or 1) * bits + 7) // 8
        if where.length < needed:
            raise UnusableFile(
                Reason.CORRUPT_PIXELS,
                f"the header declares {_size(f.shape)} at {bits} bits ({needed:,} bytes) but the pixel data "
                f"holds {where.length:,} bytes",
                f.path,
            )
        return
    f.codestream = read_codestream_header(where.head)
    stream = f.codestream
    if stream is None:
        return  # a syntax dens cannot look into (RLE) or an unrecognised start: the decoders say
    family = SYNTAX_FAMILIES.get(f.transfer_syntax)
    mismatch = (
        f"the transfer syntax says {_syntax_name(syntax)}, the codestream is {stream.kind}"
        if family and family != stream.family
        else ""
    )
    if stream.rows and (stream.rows, stream.cols) != (rows, cols):  # JPEG's 0 rows: defined later (DNL)
        declared = _size((stream.rows, stream.cols))
        detail = f"the header says {_size(f.shape)}, the {stream.kind} codestream is {declared}"
        raise UnusableFile(Reason.CORRUPT_PIXELS, f"{mismatch}; {detail}" if mismatch else detail, f.path)
    if mismatch and stream.family != "JPEG 2000":
        raise UnusableFile(Reason.UNSUPPORTED_SYNTAX, mismatch, f.path)
    if mismatch:
        log.info("%s: %s; decoding it as JPEG 2000", f.path, mismatch)


def _check_mammography(f: DicomFile) -> None:
    modality = header_text(f.ds, "Modality").upper()
    body_part = header_text(f.ds, "BodyPartExamined").upper()
    if modality not in _MAMMO_MODALITIES:
        raise UnusableFile(Reason.NOT_MAMMOGRAPHY, f"modality {modality}", f.path)
    if modality != "MG" and body_part and body_part != "BREAST":
        raise UnusableFile(Reason.NOT_MAMMOGRAPHY, f"modality {modality or 'absent'}, body part {body_part}", f.path)


def _tag_values(ds: Dataset, keyword: str) -> list[str]:
    """A text tag's value, or a code sequence's CodeMeanings (nested ViewModifierCodeSequence items too)."""
    try:
        value = ds.get(keyword)
        if isinstance(value, pydicom.sequence.Sequence):
            meanings = []
            for item in value:
                meanings.append(str(item.get("CodeMeaning", "")))
                meanings.extend(str(m.get("CodeMeaning", "")) for m in item.get("ViewModifierCodeSequence") or [])
            return [m for m in meanings if m]
    except Exception:
        return []
    text = header_text(ds, keyword)
    return [text] if text else []


def _check_exclusions(f: DicomFile) -> None:
    for rule in EXCLUSION_RULES:
        for keyword in rule.tags:
            for value in _tag_values(f.ds, keyword):
                if re.search(rule.pattern, value, re.IGNORECASE):
                    raise UnusableFile(rule.reason, f"{keyword} '{value}': {rule.means}", f.path)
