"""Decoders: DICOM pixel data -> stored values, and the low-pass that makes every syntax look alike.

JPEG 2000 goes through Pillow, which can stop the wavelet synthesis early (``Image.reduce``); the rest
through pydicom's plugins, then GDCM's own reader. :mod:`dens.route.dicom` reads the header and chooses among
them; each decoder here takes what it needs explicitly (a data set, a path, the stored value range).

The codecs are noisy: pydicom logs a traceback for every plugin that fails before one succeeds, and GDCM's
libjpeg prints to file descriptor 2. :func:`quiet_decoders` turns both into debug log lines for one decode;
the decode engine's workers (:mod:`dens.engine`) wrap every file in it. It changes process-wide state (a
logging filter and fd 2) while it runs, so nothing installs it at import.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import struct
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import cv2
import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames

from dens.route.errors import Reason, UnusableFile

log = logging.getLogger("dens.route.dicom")

_PLUGIN_LOGGER = "pydicom.pixels.decoders.base"


class _PluginFailures(logging.Filter):
    """pydicom logs a full traceback for every decoding plugin that fails on a frame, then raises once all
    have failed; dens reports that failure itself (UnusableFile, with each decoder's message), so the
    per-plugin tracebacks become one debug line each."""

    def __init__(self, noise: list[str]):
        super().__init__()
        self.noise = noise

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            self.noise.append(f"a pydicom decoding plugin failed: {record.getMessage()}")
            log.debug("a pydicom decoding plugin failed: %s", record.getMessage())
            return False
        return True


@contextlib.contextmanager
def quiet_decoders(what: str, capture: BinaryIO | None = None) -> Iterator[list[str]]:
    """Inside this block, pydicom's per-plugin tracebacks and what C code writes to file descriptor 2 go to
    dens's debug log, and into the yielded list (filled when the block ends). GDCM's JPEG codec tries its
    8-bit libjpeg on a 12-bit stream before its 12-bit one and prints "Unsupported JPEG data precision 12"
    for every such file it then decodes correctly: a user's terminal should not see that.

    One block at a time per process (the decode engine's workers decode one file at a time): nested or
    concurrent blocks would restore each other's descriptor. ``capture``: a file to reuse for what fd 2
    receives (a worker keeps one for all its files); by default a temporary file for this block.
    """
    noise: list[str] = []
    plugins = logging.getLogger(_PLUGIN_LOGGER)
    failures = _PluginFailures(noise)
    plugins.addFilter(failures)
    with contextlib.nullcontext(capture) if capture is not None else tempfile.TemporaryFile() as captured:
        captured.seek(0)
        captured.truncate()
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            yield noise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            plugins.removeFilter(failures)
            captured.seek(0)
            text = captured.read().decode(errors="replace").strip()
            if text:
                noise.append(" | ".join(text.splitlines()))
                log.debug("%s wrote to stderr: %s", what, noise[-1])


_ALL_PLUGINS_FAILED = "Unable to decode as exceptions were raised by all available plugins"


# A plugin's message that speaks of its own code, not of the file (GDCM's binding on a frame it cannot read).
_PLUGIN_BUG = re.compile(r"NoneType|object has no attribute|object is not")


def first_cause(exc: BaseException) -> str:
    """The one line of a decoder's exception that says what went wrong. pydicom's "Unable to decode as
    exceptions were raised by all available plugins:" says nothing by itself: the first plugin's own message
    that speaks of the file, on the lines after it, does."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith(_ALL_PLUGINS_FAILED):
        return next((line for line in lines[1:] if not _PLUGIN_BUG.search(line)), lines[1])
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


# --- what a compressed frame says about itself, before any decoder runs ------------------------------

# Codestream families, by transfer syntax (the JPEG 2000 multi-component and HTJ2K syntaxes included).
SYNTAX_FAMILIES = {
    "1.2.840.10008.1.2.4.50": "JPEG",
    "1.2.840.10008.1.2.4.51": "JPEG",
    "1.2.840.10008.1.2.4.57": "JPEG",
    "1.2.840.10008.1.2.4.70": "JPEG",
    "1.2.840.10008.1.2.4.80": "JPEG-LS",
    "1.2.840.10008.1.2.4.81": "JPEG-LS",
    "1.2.840.10008.1.2.4.90": "JPEG 2000",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.4.92": "JPEG 2000",
    "1.2.840.10008.1.2.4.93": "JPEG 2000",
    "1.2.840.10008.1.2.4.201": "JPEG 2000",
    "1.2.840.10008.1.2.4.202": "JPEG 2000",
    "1.2.840.10008.1.2.4.203": "JPEG 2000",
}
_JPEG_SOF = {0xC0: "baseline", 0xC1: "extended", 0xC2: "progressive", 0xC3: "lossless", 0xC5: "hierarchical"}
_JPEG_SOF.update(dict.fromkeys((0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF), "non-baseline"))
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


@dataclass(frozen=True)
class Codestream:
    """What a compressed frame's own header declares: its family (``JPEG``, ``JPEG-LS``, ``JPEG 2000``), a
    description (``JPEG 2000 (JP2 box)``, ``JPEG lossless``...), its size, components and precision."""

    family: str
    kind: str
    rows: int
    cols: int
    components: int
    precision: int


def read_codestream_header(head: bytes) -> Codestream | None:
    """The header of a JPEG (SOF), JPEG-LS (SOF55) or JPEG 2000 (SIZ, or a JP2 file's ihdr box) frame from its
    first bytes; None when they are none of these or too short to tell. Reads only ``head``: no decoder runs."""
    try:
        if head[:2] == b"\xff\xd8":
            return _jpeg_header(head)
        if head[:4] == b"\xff\x4f\xff\x51":
            return _siz_header(head, "JPEG 2000")
        if head[:12] == _JP2_SIGNATURE:
            return _jp2_header(head)
    except (struct.error, IndexError):
        return None
    return None


def _jpeg_header(head: bytes) -> Codestream | None:
    at = 2
    while at + 4 <= len(head):
        if head[at] != 0xFF:
            return None
        marker = head[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            at += 2
            continue
        (length,) = struct.unpack(">H", head[at + 2 : at + 4])
        if marker in _JPEG_SOF or marker == 0xF7:
            precision, rows, cols, components = struct.unpack(">BHHB", head[at + 4 : at + 10])
            family = "JPEG-LS" if marker == 0xF7 else "JPEG"
            kind = "JPEG-LS" if marker == 0xF7 else f"JPEG {_JPEG_SOF[marker]}"
            return Codestream(family, kind, rows, cols, components, precision)
        if marker == 0xDA:  # scan data before any frame header
            return None
        at += 2 + length
    return None


def _siz_header(head: bytes, kind: str) -> Codestream:
    xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", head[8:24])
    (components,) = struct.unpack(">H", head[40:42])
    precision = (head[42] & 0x7F) + 1
    return Codestream("JPEG 2000", kind, ysiz - yosiz, xsiz - xosiz, components, precision)


def _jp2_header(head: bytes) -> Codestream | None:
    at = 0
    while at + 8 <= len(head):
        length, box = struct.unpack(">I4s", head[at : at + 8])
        body = at + 8
        if length == 1:  # an 8-byte length follows
            (length,) = struct.unpack(">Q", head[body : body + 8])
            body += 8
        if box == b"jp2h":  # a superbox: its first box is the image header
            _, sub_box = struct.unpack(">I4s", head[body : body + 8])
            if sub_box == b"ihdr":
                rows, cols, components, bpc = struct.unpack(">IIHB", head[body + 8 : body + 19])
                return Codestream("JPEG 2000", "JPEG 2000 (JP2 box)", rows, cols, components, (bpc & 0x7F) + 1)
        if box == b"jp2c":
            return _siz_header(head[body:], "JPEG 2000 (JP2 box)")
        if length < 8:  # 0: to the end of the file; anything else below 8 is broken
            return None
        at += length
    return None


# --- the memory a decode may take -------------------------------------------------------------------


def data_memory() -> int | None:
    """Bytes of this process's data segment (VmData: heap and private mappings, what RLIMIT_DATA limits);
    None where /proc does not say (not Linux)."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmData:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def memory_room() -> int | None:
    """Bytes this process may still allocate under its RLIMIT_DATA soft limit (the decode engine's workers
    set it to their memory budget around each file); None when there is no limit or no way to tell."""
    try:
        import resource
    except ImportError:  # not a Unix
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_DATA)
    used = data_memory()
    if soft == resource.RLIM_INFINITY or used is None:
        return None
    return max(0, soft - used)


def decode_pydicom(ds: Dataset) -> np.ndarray:
    """The stored values of a single-frame data set through pydicom's pixel-data plugins."""
    return np.asarray(ds.pixel_array)


_GDCM_DTYPES = {
    "UINT8": np.uint8,
    "INT8": np.int8,
    "UINT16": np.uint16,
    "INT16": np.int16,
    "UINT32": np.uint32,
    "INT32": np.int32,
}


def decode_gdcm(path: str) -> np.ndarray:
    """The stored values of a file through GDCM's own reader: the fallback that decodes 12-bit JPEG
    Extended, which pydicom's plugins cannot."""
    import gdcm  # imported lazily: large, and only needed when pydicom's plugins fail

    reader = gdcm.ImageReader()
    reader.SetFileName(path)
    if not reader.Read():
        raise RuntimeError("gdcm.ImageReader could not read the file")
    image = reader.GetImage()
    cols, rows = image.GetDimensions()[:2]
    dtype = _GDCM_DTYPES.get(image.GetPixelFormat().GetScalarTypeAsString())
    if dtype is None:
        raise RuntimeError(f"unsupported GDCM pixel type {image.GetPixelFormat().GetScalarTypeAsString()}")
    # GDCM's Python binding returns the buffer as a str of surrogate-escaped bytes (None when it fails).
    buffer = image.GetBuffer()
    if buffer is None:
        raise RuntimeError("gdcm could not decode the pixel data")
    raw = buffer.encode("utf-8", "surrogateescape")
    return np.frombuffer(raw, dtype=dtype)[: rows * cols].reshape(rows, cols)


def decode_j2k_reduced(ds: Dataset, level: int, stored_range: tuple[int, int], path: str) -> np.ndarray:
    """A JPEG 2000 frame at 1/2**level resolution (float32, clipped to ``stored_range``), through Pillow,
    which stops the wavelet synthesis early. Raises ValueError/OSError where it cannot (a signed or
    multi-component codestream, a level deeper than the file was encoded with)."""
    import openjpeg
    from PIL import Image

    codestream = next(generate_frames(ds.PixelData, number_of_frames=1))
    params = openjpeg.get_parameters(codestream)
    # A signed header over an unsigned codestream (pydicom's J2K_pixelrep_mismatch.dcm) needs
    # pydicom's sign correction: leave it to the full decode.
    signed = params["is_signed"] or int(ds.get("PixelRepresentation") or 0) == 1
    if signed or params["samples_per_pixel"] != 1 or params["precision"] > 16:
        raise ValueError("Pillow route handles unsigned single-component codestreams up to 16 bits")
    with Image.open(io.BytesIO(codestream)) as im:
        if level:
            # Pillow rounds the reduced size where JPEG 2000 takes the ceiling, and then fails on every
            # side not divisible by 2**level (5355x4915 at level 3): give it a size that rounds right.
            power = 1 << level
            im._size = tuple(-(-n // power) * power - power // 2 for n in im.size)
        im.reduce = level
        im.load()
        mode = im.mode
        pixels = np.asarray(im)
    if mode.startswith("I;16") and params["precision"] < 16:
        # Pillow scales sub-16-bit precision up to 16 bits; undo it from the codestream's own
        # precision (SIZ), never from the values, which overshoot at reduced levels.
        pixels = pixels >> (16 - params["precision"])
    return hold_to_range(pixels, stored_range, path, clip=True).astype(np.float32)


def hold_to_range(pixels: np.ndarray, stored_range: tuple[int, int], path: str, *, clip: bool) -> np.ndarray:
    """Hold decoded values to BitsStored's range ``(lo, hi)``.

    Full-resolution values outside it mean the unused high bits carry something else (overlays,
    vendor garbage): mask them off. Reduced JPEG 2000 values overshoot a little (wavelet ringing):
    clip them.
    """
    lo, hi = stored_range
    if pixels.size == 0:
        raise UnusableFile(Reason.CORRUPT_PIXELS, "decoded image is empty", path)
    if pixels.min() >= lo and pixels.max() <= hi:
        return pixels
    if clip or lo < 0:
        return np.clip(pixels, lo, hi)
    log.info("%s: values above BitsStored=%d masked off", path, hi.bit_length())
    return pixels & np.asarray(hi, dtype=pixels.dtype)


_LOWPASS_53 = np.array([-1, 2, 6, 2, -1], dtype=np.float32) / 8.0


def reduce_like_j2k(pixels: np.ndarray, level: int) -> np.ndarray:
    """Downsample by 2**level with the JPEG 2000 5/3 analysis low-pass filter and even-sample
    decimation: what a reduced-resolution JPEG 2000 decode returns, up to integer rounding."""
    out = pixels.astype(np.float32, copy=False)
    for _ in range(level):
        out = cv2.sepFilter2D(out, cv2.CV_32F, _LOWPASS_53, _LOWPASS_53, borderType=cv2.BORDER_REFLECT_101)
        out = out[::2, ::2]
    return np.ascontiguousarray(out)
