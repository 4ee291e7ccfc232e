"""Why a file yields no image: one typed error with a reason code, which inference turns into a row."""

from __future__ import annotations

from enum import Enum
from pathlib import Path


class Reason(str, Enum):
    """Why a file yields no image. ``skip`` reasons are expected in an archive; the rest are errors."""

    NOT_DICOM = "not_dicom"
    NON_IMAGE_OBJECT = "non_image_object"
    NO_PIXEL_DATA = "no_pixel_data"
    NOT_MAMMOGRAPHY = "not_mammography"
    FOR_PROCESSING = "for_processing"
    EXCLUDED_VIEW = "excluded_view"
    MULTI_FRAME = "multi_frame"
    NOT_GRAYSCALE = "not_grayscale"
    EMPTY_FILE = "empty_file"
    UNREADABLE = "unreadable"
    UNSUPPORTED_SYNTAX = "unsupported_transfer_syntax"
    CORRUPT_PIXELS = "corrupt_pixel_data"
    # What the decode engine reports when the route never answered for a file: not the file's own verdict,
    # so the training cache never keeps them.
    WORKER_CRASHED = "worker_crashed"
    WORKER_TIMEOUT = "worker_timeout"
    UNEXPECTED = "unexpected_error"

    @property
    def is_skip(self) -> bool:
        return self in _SKIP_REASONS

    @property
    def is_verdict(self) -> bool:
        """The file's own verdict (it stays unusable until it changes), not a failure of the machinery."""
        return self not in _ENGINE_FAILURES


_SKIP_REASONS = {
    Reason.NOT_DICOM,
    Reason.NON_IMAGE_OBJECT,
    Reason.NO_PIXEL_DATA,
    Reason.NOT_MAMMOGRAPHY,
    Reason.FOR_PROCESSING,
    Reason.EXCLUDED_VIEW,
    Reason.MULTI_FRAME,
    Reason.NOT_GRAYSCALE,
}


_ENGINE_FAILURES = {Reason.WORKER_CRASHED, Reason.WORKER_TIMEOUT, Reason.UNEXPECTED}


class UnusableFile(Exception):
    """A file that yields no canonical image, with a machine-readable reason and a human detail."""

    def __init__(self, reason: Reason, detail: str, path: str | Path | None = None):
        self.reason = Reason(reason)
        self.detail = detail
        self.path = str(path) if path is not None else None
        where = f"{self.path}: " if self.path else ""
        super().__init__(f"{where}{self.reason.value}: {detail}")

    @property
    def status(self) -> str:
        """The preds.csv status this error becomes: ``skipped`` or ``error``."""
        return "skipped" if self.reason.is_skip else "error"
