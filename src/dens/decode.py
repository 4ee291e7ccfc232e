"""Decoders: DICOM pixel data -> stored values, and the low-pass that makes every syntax look alike.

JPEG 2000 goes through Pillow, which can stop the wavelet synthesis early (``Image.reduce``); the rest
through pydicom's plugins, then GDCM's own reader. :mod:`dens.dicom` reads the header and chooses among
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
import sys
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

import cv2
import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames

from dens.errors import Reason, UnusableFile

log = logging.getLogger("dens.dicom")

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
