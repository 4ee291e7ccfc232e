"""Reading a DICOM file's bytes: the header without the pixel data, then the pixel data when it is wanted.

The header is read up to the pixel data and no further (``stop_before_pixels``). The Pixel Data element's own
header says where its value lies and how long it is; for encapsulated data, the items' 8-byte headers say
where each fragment ends, and the first fragment's first bytes are kept for the codestream's own header
(:func:`dens.route.decode.read_codestream_header`). So a file that is not DICOM (told from its first bytes), whose
header is unreadable or whose pixel data is cut short is refused before any pixel byte is loaded, whatever it
claims. A deflated file is one zlib stream with no byte positions to look at; it is read whole.

Everything here is about bytes and the header's structure: which files are a usable mammogram, and which
decoder reads them, is :mod:`dens.route.dicom`'s. A file that cannot be read raises :class:`UnusableFile` with a
:class:`Reason`.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import BinaryIO

import pydicom
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dens.route.errors import Reason, UnusableFile

__all__ = ["PixelElement", "header_number", "header_text", "load_pixel_data", "read_header"]

_PIXEL_TAGS = {0x7FE00010: "", 0x7FE00008: "float", 0x7FE00009: "double float"}
_ITEM, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE0DD
_FRAME_HEAD = 1 << 16  # bytes of a compressed frame read to find its header


@dataclass(frozen=True)
class PixelElement:
    """Where the Pixel Data element's value lies in the file, from the element's own header: ``offset`` and
    ``length`` of its value (for encapsulated data: the items up to the sequence delimiter) and, for
    encapsulated data, the first bytes of the first frame's first fragment."""

    offset: int
    length: int
    vr: str
    encapsulated: bool
    head: bytes = b""


def header_text(ds: Dataset, keyword: str) -> str:
    """The value of ``keyword`` as stripped text (a multi-valued element's first value); '' when the element
    is absent or its value is malformed."""
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed value: identity is best effort, the checks say what is wrong
        return ""
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        value = value[0] if len(value) else ""
    return str(value).strip()


def header_number(ds: Dataset, keyword: str) -> int:
    """The value of ``keyword`` as an integer; 0 when the element is absent or not a number."""
    try:
        return int(ds.get(keyword) or 0)
    except (TypeError, ValueError):
        return 0


def read_header(path: str) -> tuple[Dataset, PixelElement | None]:
    """The file's data set without its pixel data, and where the Pixel Data element lies (None when the data
    set has none, or when it is deflated: then the data set holds the pixel data already).

    Raises :class:`UnusableFile` for a file that is empty, unreadable, not DICOM, truncated or corrupt in its
    header or its pixel data element's structure."""
    try:
        fh = open(path, "rb")  # noqa: SIM115 (closed below, after the pixel element is located)
    except OSError as exc:
        raise UnusableFile(Reason.UNREADABLE, f"cannot open: {exc.strerror or exc}", path) from exc
    with fh:
        head = fh.read(132)
        if not head:
            raise UnusableFile(Reason.EMPTY_FILE, "the file is empty", path)
        has_preamble = len(head) == 132 and head[128:132] == b"DICM"
        if not has_preamble and not _starts_like_dicom(head):
            raise UnusableFile(Reason.NOT_DICOM, "not a DICOM file (no DICM preamble, no DICOM data set start)", path)
        fh.seek(0)
        try:
            ds = pydicom.dcmread(fh, force=not has_preamble, stop_before_pixels=True)
        except InvalidDicomError as exc:
            raise UnusableFile(Reason.NOT_DICOM, f"not a DICOM file ({exc})", path) from exc
        except Exception as exc:
            if not has_preamble:
                raise UnusableFile(Reason.NOT_DICOM, "not a DICOM file", path) from exc
            detail = f"DICOM header unreadable ({type(exc).__name__}: {exc})"
            raise UnusableFile(Reason.UNREADABLE, detail, path) from exc
        if not has_preamble and not _looks_like_dicom(ds):
            raise UnusableFile(Reason.NOT_DICOM, "not a DICOM file (no preamble, no DICOM identity)", path)
        syntax = header_text(getattr(ds, "file_meta", Dataset()), "TransferSyntaxUID")
        if syntax == pydicom.uid.DeflatedExplicitVRLittleEndian:
            # The data set is one zlib stream: no byte positions to look at. Deflated files are small; read it.
            pixel_element = None
            ds = _read_whole(path)
        else:
            implicit, little = ds.original_encoding
            pixel_element = _locate_pixel_data(fh, path, bool(implicit), little is not False)
            if pixel_element is None:
                _check_complete(ds, path)
    try:
        # pydicom parses lazily: touch every top-level element now so a corrupt header is an error here.
        for _ in ds:
            pass
    except Exception as exc:
        raise UnusableFile(Reason.UNREADABLE, f"DICOM header truncated or corrupt ({exc})", path) from exc
    return ds, pixel_element


def load_pixel_data(ds: Dataset, where: PixelElement | None, path: str) -> None:
    """Read the Pixel Data element's value, which ``where`` locates in the file at ``path``, into ``ds``
    (once; nothing to do when ``where`` is None or ``ds`` holds the pixel data already)."""
    if where is None or "PixelData" in ds:
        return
    with open(path, "rb") as fh:
        fh.seek(where.offset)
        value = fh.read(where.length)
    if len(value) < where.length:
        raise UnusableFile(Reason.CORRUPT_PIXELS, "the pixel data ends early (file truncated)", path)
    element = DataElement(0x7FE00010, where.vr, value, is_undefined_length=where.encapsulated)
    ds[0x7FE00010] = element


def _read_whole(path: str) -> Dataset:
    """The whole data set, pixel data included: for a deflated file, which has no byte positions to look at."""
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as exc:
        raise UnusableFile(Reason.UNREADABLE, f"DICOM data set unreadable ({type(exc).__name__}: {exc})", path) from exc
    _check_complete(ds, path)
    return ds


def _starts_like_dicom(head: bytes) -> bool:
    """A DICOM file without the 128-byte preamble starts with its first element: group 0002 (file meta) or
    0008 (identity), little or big endian, then an explicit VR (two capitals) or an implicit 4-byte length.
    Anything else (zeros, text, another format) is not DICOM, told from the first bytes without reading on."""
    if len(head) < 8:
        return False
    for order in "<>":
        group, _ = struct.unpack(order + "HH", head[:4])
        if group not in (0x0002, 0x0008):
            continue
        if head[4:6].isalpha() and head[4:6].isupper():
            return True
        (length,) = struct.unpack(order + "I", head[4:8])
        if length < 1 << 16:
            return True
    return False


def _looks_like_dicom(ds: Dataset) -> bool:
    """A forced parse of any bytes yields *something*; a headerless DICOM file still has UIDs."""
    try:
        return bool(
            header_text(ds, "SOPClassUID") or header_text(ds, "SOPInstanceUID") or header_text(ds, "StudyInstanceUID")
        )
    except Exception:
        return False


def _locate_pixel_data(fh: BinaryIO, path: str, implicit: bool, little: bool) -> PixelElement | None:
    """The Pixel Data element at the file's current position (where pydicom stopped), from its header and,
    for encapsulated data, its items' headers; None when the data set has no pixel data."""
    start = fh.tell()
    size = os.fstat(fh.fileno()).st_size
    order = "<" if little else ">"
    tag_bytes = fh.read(8)
    if len(tag_bytes) < 8:
        return None
    group, element = struct.unpack(order + "HH", tag_bytes[:4])
    tag = group << 16 | element
    if tag not in _PIXEL_TAGS:
        return None
    if _PIXEL_TAGS[tag]:
        raise UnusableFile(Reason.NOT_GRAYSCALE, f"{_PIXEL_TAGS[tag]} pixel data, not stored integer values", path)
    if implicit:
        vr = "OW"
        (length,) = struct.unpack(order + "I", tag_bytes[4:8])
    else:
        vr = tag_bytes[4:6].decode("latin-1")
        (length,) = struct.unpack(order + "I", fh.read(4))
    offset = fh.tell()
    if vr not in ("OB", "OW"):
        vr = "OB" if length == 0xFFFFFFFF else "OW"
    if length != 0xFFFFFFFF:
        if offset + length > size:
            raise UnusableFile(
                Reason.CORRUPT_PIXELS,
                f"file truncated: the pixel data element declares {length:,} bytes, the file holds "
                f"{size - offset:,} after its start; copy it again from its source",
                path,
            )
        return PixelElement(offset, length, vr, encapsulated=False)
    return _walk_fragments(fh, path, offset, size, start)


def _walk_fragments(fh: BinaryIO, path: str, offset: int, size: int, start: int) -> PixelElement:
    """Encapsulated pixel data: the basic offset table item, then fragments, then the sequence delimiter.
    Only the items' 8-byte headers are read (and the first fragment's first bytes), never the fragments."""
    at, items, head = offset, 0, b""
    while True:
        fh.seek(at)
        header = fh.read(8)
        if len(header) < 8:
            if items >= 2 and not header:  # no delimiter, but whole fragments up to the end: pydicom reads it
                return PixelElement(offset, at - offset, "OB", encapsulated=True, head=head)
            raise UnusableFile(
                Reason.CORRUPT_PIXELS,
                "file truncated inside the encapsulated pixel data; copy it again from its source",
                path,
            )
        group, element, length = struct.unpack("<HHI", header)
        tag = group << 16 | element
        if tag == _SEQUENCE_END:
            return PixelElement(offset, at - offset, "OB", encapsulated=True, head=head)
        if tag != _ITEM or length == 0xFFFFFFFF:
            raise UnusableFile(
                Reason.CORRUPT_PIXELS,
                f"encapsulated pixel data broken at byte {at:,} (an item expected, found {header[:4].hex(' ')})",
                path,
            )
        if at + 8 + length > size:
            raise UnusableFile(
                Reason.CORRUPT_PIXELS,
                f"file truncated: a pixel data fragment declares {length:,} bytes, the file holds "
                f"{size - at - 8:,}; copy it again from its source",
                path,
            )
        if items == 1:
            head = fh.read(min(length, _FRAME_HEAD))
        items += 1
        at += 8 + length


def _check_complete(ds: Dataset, path: str) -> None:
    """pydicom reads a truncated file without a word: a short last value, a few bytes of a next element
    ignored, or an empty data set. Those are errors, not skips."""
    if not len(ds):
        raise UnusableFile(Reason.UNREADABLE, "no data set after the file meta (file truncated?)", path)
    last = ds.get_item(next(reversed(ds.keys())))
    syntax = header_text(getattr(ds, "file_meta", Dataset()), "TransferSyntaxUID")
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
