"""File -> header identity + decoded stored pixel values.

The decoder is chosen by transfer syntax. JPEG 2000 is decoded with Pillow, which can stop the wavelet
synthesis early (``Image.reduce``) and return the image at 1/2**level resolution for a fraction of the
cost; other syntaxes are decoded in full by pydicom's plugins and then downsampled with the same
low-pass filter, so the model sees nearly the same image whichever syntax a file came in. GDCM's own
reader is the last resort when pydicom's plugins all fail (it decodes 12-bit JPEG Extended, which they
cannot). The decoders live in :mod:`dens.decode`, the error type in :mod:`dens.errors`; this module reads the
header, checks the file is a usable mammogram and picks the decoder.

Files that cannot be used raise :class:`UnusableFile` with a :class:`Reason`; inference turns it into a
row (``skipped`` or ``error``), training counts it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dens.decode import decode_gdcm, decode_j2k_reduced, decode_pydicom, hold_to_range, reduce_like_j2k
from dens.errors import Reason, UnusableFile

__all__ = ["JPEG2000_SYNTAXES", "MAMMO_FOR_PRESENTATION", "DicomFile", "read"]

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
_EXCLUDED_VIEW_WORDS = ("spot", "magnif", "cleavage")
_EXCLUDED_VIEW_POSITIONS = {"CV", "SPOT", "MAG", "M"}

JPEG2000_SYNTAXES = {
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.201",  # HTJ2K lossless (Pillow handles when its openjpeg does)
    "1.2.840.10008.1.2.4.202",
    "1.2.840.10008.1.2.4.203",
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


# --- the header -------------------------------------------------------------------------------------


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        value = value[0] if len(value) else ""
    return str(value).strip()


@dataclass
class DicomFile:
    """A parsed DICOM file that passed the usability checks, with its pixel data still encoded."""

    path: str
    ds: Dataset
    transfer_syntax: str
    sop_class: str
    _full: tuple[np.ndarray, str] | None = field(default=None, repr=False)

    # identity -----------------------------------------------------------------------------------
    @property
    def identity(self) -> dict[str, str]:
        sop_uid = _text(self.ds, "SOPInstanceUID") or _text(self.ds.file_meta, "MediaStorageSOPInstanceUID")
        return {
            "patient_id": _text(self.ds, "PatientID"),
            "accession": _text(self.ds, "AccessionNumber"),
            "study_uid": _text(self.ds, "StudyInstanceUID"),
            "series_uid": _text(self.ds, "SeriesInstanceUID"),
            "sop_uid": sop_uid,
        }

    @property
    def laterality(self) -> str:
        """'L' or 'R' from ImageLaterality, then Laterality; '' when neither says."""
        for keyword in ("ImageLaterality", "Laterality"):
            value = _text(self.ds, keyword).upper()
            if value in ("L", "R"):
                return value
        return ""

    @property
    def view(self) -> str:
        """ViewPosition, then ViewCodeSequence's meaning; '' when neither says."""
        view = _text(self.ds, "ViewPosition").upper()
        if view:
            return view
        seq = self.ds.get("ViewCodeSequence")
        if seq:
            meaning = str(seq[0].get("CodeMeaning", "")).strip().lower()
            return _VIEW_MEANINGS.get(meaning, meaning.upper())
        return ""

    @property
    def chest_wall_side(self) -> str:
        """'left'/'right' from PatientOrientation's row direction ('A': moving right goes anterior)."""
        orientation = self.ds.get("PatientOrientation")
        if orientation and len(orientation) >= 1:
            row_dir = str(orientation[0]).strip().upper()[:1]
            if row_dir == "A":
                return "left"
            if row_dir == "P":
                return "right"
        return ""

    @property
    def photometric(self) -> str:
        return _text(self.ds, "PhotometricInterpretation").upper()

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.ds.Rows), int(self.ds.Columns)

    @property
    def stored_range(self) -> tuple[int, int]:
        bits = int(self.ds.get("BitsStored") or self.ds.get("BitsAllocated") or 16)
        if int(self.ds.get("PixelRepresentation") or 0) == 1:
            return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        return 0, (1 << bits) - 1

    # pixels ---------------------------------------------------------------------------------------
    def decode(self, level: int) -> tuple[np.ndarray, int, str]:
        """Stored values at 1/2**level resolution (float32), the level reached, and the route taken.

        JPEG 2000 tries the requested level and falls back level by level (a codestream encoded with
        fewer decomposition levels fails beyond them). Other syntaxes decode in full once and are
        downsampled with the JPEG 2000 low-pass filter.
        """
        if self.transfer_syntax in JPEG2000_SYNTAXES:
            for lvl in range(level, -1, -1):
                try:
                    pixels = decode_j2k_reduced(self.ds, lvl, self.stored_range, self.path)
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
            except Exception as exc:
                errors.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                continue
            if pixels.shape != self.shape:
                errors.append(f"{name}: decoded shape {pixels.shape} != header {self.shape}")
                continue
            self._full = (hold_to_range(pixels, self.stored_range, self.path, clip=False), name)
            return self._full
        detail = "no decoder could read the pixel data (" + "; ".join(errors) + ")"
        raise UnusableFile(Reason.CORRUPT_PIXELS, detail, self.path)


# --- opening and checking a file -------------------------------------------------------------------


def read(path: str | Path, *, any_modality: bool = False) -> DicomFile:
    """Parse a DICOM file and check it holds a usable 2D For-Presentation mammogram.

    Raises :class:`UnusableFile` with the reason when it does not. Pixel data is not decoded here.
    ``any_modality`` lifts the mammography and view checks (decoder tests run on CT/MR samples).
    """
    path = str(path)
    ds = _parse(path)
    meta = getattr(ds, "file_meta", Dataset())
    sop_class = _text(ds, "SOPClassUID") or _text(meta, "MediaStorageSOPClassUID")
    syntax = _text(meta, "TransferSyntaxUID") or pydicom.uid.ImplicitVRLittleEndian
    f = DicomFile(path=path, ds=ds, transfer_syntax=syntax, sop_class=sop_class)

    if sop_class.startswith(_NON_IMAGE_SOP_PREFIXES):
        raise UnusableFile(Reason.NON_IMAGE_OBJECT, f"SOP class {sop_class} is not an image", path)
    if "PixelData" not in ds:
        raise UnusableFile(Reason.NO_PIXEL_DATA, f"no pixel data (SOP class {sop_class or 'absent'})", path)
    intent = _text(ds, "PresentationIntentType").upper()
    if sop_class in _FOR_PROCESSING_SOP or intent == "FOR PROCESSING":
        raise UnusableFile(Reason.FOR_PROCESSING, "a 'For Processing' (raw detector) image", path)
    if not any_modality:
        _check_mammography(f)
        _check_view(f)
    for keyword in ("NumberOfFrames", "RescaleSlope", "RescaleIntercept"):
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
    if not pydicom.uid.UID(syntax).is_transfer_syntax:
        raise UnusableFile(Reason.UNSUPPORTED_SYNTAX, f"unknown transfer syntax {syntax}", path)
    return f


def _parse(path: str) -> Dataset:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        raise UnusableFile(Reason.UNREADABLE, f"cannot open: {exc.strerror or exc}", path) from exc
    if not head:
        raise UnusableFile(Reason.EMPTY_FILE, "the file is empty", path)
    has_preamble = len(head) == 132 and head[128:132] == b"DICM"
    try:
        ds = pydicom.dcmread(path, force=not has_preamble)
    except InvalidDicomError as exc:
        raise UnusableFile(Reason.NOT_DICOM, f"not a DICOM file ({exc})", path) from exc
    except Exception as exc:
        if not has_preamble:
            raise UnusableFile(Reason.NOT_DICOM, "not a DICOM file", path) from exc
        raise UnusableFile(Reason.UNREADABLE, f"DICOM header unreadable ({type(exc).__name__}: {exc})", path) from exc
    if not has_preamble and not _looks_like_dicom(ds):
        raise UnusableFile(Reason.NOT_DICOM, "not a DICOM file (no preamble, no DICOM identity)", path)
    _check_complete(ds, path)
    try:
        # pydicom parses lazily: touch every top-level element now so a truncated header is an error here.
        for _ in ds:
            pass
    except Exception as exc:
        raise UnusableFile(Reason.UNREADABLE, f"DICOM header truncated or corrupt ({exc})", path) from exc
    return ds


def _check_complete(ds: Dataset, path: str) -> None:
    """pydicom reads a truncated file without a word: a short last value, a few bytes of a next element
    ignored, or (encapsulated pixel data cut short) an empty data set. Those are errors, not skips."""
    if not len(ds):
        raise UnusableFile(Reason.UNREADABLE, "no data set after the file meta (file truncated?)", path)
    last = ds.get_item(next(reversed(ds.keys())))
    syntax = _text(getattr(ds, "file_meta", Dataset()), "TransferSyntaxUID")
    if (
        not isinstance(last, RawDataElement)
        or last.value is None
        or last.length == 0xFFFFFFFF
        or syntax == pydicom.uid.DeflatedExplicitVRLittleEndian
    ):
        return  # no byte positions to check (a sequence, an undefined length, an inflated stream)
    end = last.value_tell + last.length
    stray = 0 < os.path.getsize(path) - end < 8  # too short for an element: the start of one, cut
    if stray:
        with open(path, "rb") as fh:
            fh.seek(end)
            stray = any(fh.read())  # zero padding, which some writers leave, is no truncation
    if len(last.value) < last.length or stray:
        reason = Reason.CORRUPT_PIXELS if last.tag == 0x7FE00010 else Reason.UNREADABLE
        raise UnusableFile(
            reason, f"file truncated (it ends in or just after element {last.tag}); copy it again from its source", path
        )


def _looks_like_dicom(ds: Dataset) -> bool:
    """A forced parse of any bytes yields *something*; a headerless DICOM file still has UIDs."""
    try:
        return bool(_text(ds, "SOPClassUID") or _text(ds, "SOPInstanceUID") or _text(ds, "StudyInstanceUID"))
    except Exception:
        return False


def _check_mammography(f: DicomFile) -> None:
    modality = _text(f.ds, "Modality").upper()
    body_part = _text(f.ds, "BodyPartExamined").upper()
    if modality not in _MAMMO_MODALITIES:
        raise UnusableFile(Reason.NOT_MAMMOGRAPHY, f"modality {modality}", f.path)
    if modality != "MG" and body_part and body_part != "BREAST":
        raise UnusableFile(Reason.NOT_MAMMOGRAPHY, f"modality {modality or 'absent'}, body part {body_part}", f.path)


def _check_view(f: DicomFile) -> None:
    position = _text(f.ds, "ViewPosition").upper()
    if position in _EXCLUDED_VIEW_POSITIONS:
        raise UnusableFile(Reason.EXCLUDED_VIEW, f"view position {position}", f.path)
    meanings = []
    for item in f.ds.get("ViewCodeSequence") or []:
        meanings.append(str(item.get("CodeMeaning", "")))
        meanings.extend(str(m.get("CodeMeaning", "")) for m in item.get("ViewModifierCodeSequence") or [])
    meanings.extend(str(m.get("CodeMeaning", "")) for m in f.ds.get("ViewModifierCodeSequence") or [])
    for meaning in meanings:
        if any(word in meaning.lower() for word in _EXCLUDED_VIEW_WORDS):
            raise UnusableFile(Reason.EXCLUDED_VIEW, f"view modifier '{meaning}'", f.path)
