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
    NOT_SCREENING = "not_screening"
    MULTI_FRAME = "multi_frame"
    NOT_GRAYSCALE = "not_grayscale"
    # A PNG/PGM/TIFF/JPEG met where only DICOM was asked for (dens-infer, dens-qc without --plain-images): never read.
    PLAIN_IMAGE_NOT_REQUESTED = "plain_image_not_requested"
    EMPTY_FILE = "empty_file"
    UNREADABLE = "unreadable"
    UNSUPPORTED_SYNTAX = "unsupported_transfer_syntax"
    CORRUPT_PIXELS = "corrupt_pixel_data"
    # Decoding the file needs more memory than a decode may take (the engine's budget per file): not the
    # file's verdict either, as a larger budget can decode it.
    OVER_MEMORY_BUDGET = "over_memory_budget"
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
    Reason.NOT_SCREENING,
    Reason.MULTI_FRAME,
    Reason.NOT_GRAYSCALE,
    Reason.PLAIN_IMAGE_NOT_REQUESTED,
}

# The reason of a plain image not read (a skipped row; the option that reads it named).
PLAIN_IMAGE_REASON = (
    f"{Reason.PLAIN_IMAGE_NOT_REQUESTED.value}: a PNG/PGM/TIFF/JPEG image; pass --plain-images to read it"
)


def status_of(reason: str) -> str:
    """The row status of a reason given as ``code: detail``: ``skipped`` for a skip reason, else ``error``
    (a walk's problem such as a missing file, a code that is no :class:`Reason`)."""
    code = reason.partition(": ")[0]
    try:
        return "skipped" if Reason(code).is_skip else "error"
    except ValueError:
        return "error"


_ENGINE_FAILURES = {Reason.WORKER_CRASHED, Reason.WORKER_TIMEOUT, Reason.UNEXPECTED, Reason.OVER_MEMORY_BUDGET}


class UnusableFile(Exception):
    """A file that yields no canonical image, with a machine-readable reason and a human detail.

    ``identity``: what the file's header says about whose image it is (the identity keys of
    :class:`dens.route.preprocess.ImageInfo`: path, patient_id, accession, study/series/SOP UIDs, laterality and its
    source, view, manufacturer and model, transfer syntax, photometric, rows, cols) when the header could be
    read; None when it could not. Rows of skipped and failed files carry it, so every row says whose image
    it is.
    """

    def __init__(self, reason: Reason, detail: str, path: str | Path | None = None, *, identity: dict | None = None):
        self.reason = Reason(reason)
        self.detail = detail
        self.path = str(path) if path is not None else None
        self.identity = identity
        where = f"{self.path}: " if self.path else ""
        super().__init__(f"{where}{self.reason.value}: {detail}")

    def with_identity(self, identity: dict | None) -> UnusableFile:
        """This error with ``identity`` attached, unless it carries one already (``raise exc.with_identity(i)``)."""
        if self.identity is None:
            self.identity = identity
        return self

    @property
    def status(self) -> str:
        """The preds.csv status this error becomes: ``skipped`` or ``error``."""
        return "skipped" if self.reason.is_skip else "error"
