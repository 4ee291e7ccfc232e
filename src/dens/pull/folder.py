"""The pull folder: where fetched instances are kept, ``<folder>/<StudyInstanceUID>/<SeriesInstanceUID>/
<SOPInstanceUID>.dcm``, and the check each one passes before it is kept.

A path is made of UIDs dens checked (:func:`dens.pull.query.is_uid`: digits and dots), never of anything a
server sent: a UID that fails the check is named by its digest (``invalid-<sha256>``), so an error row still
has a path and nothing lands outside the folder. A fetched instance is kept only when its header says the
study, series, SOP instance and a mammography SOP class the listing said (:func:`verify`); it is written to a
temporary beside its path, fsync'd and renamed (:func:`dens.files.atomic_write`), so a kill leaves no half
file and a file whose row was written survives a power cut. The files stay: Grad-CAM and the review page read
them later, and they are the record of what was scored.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import IO

from dens.files import atomic_write
from dens.pull.query import is_uid
from dens.pull.sopclasses import MAMMOGRAPHY_SOP_CLASSES
from dens.pull.study import Instance


class Refused(ValueError):
    """A fetched instance that is not the one listed (another UID, another SOP class): never kept."""


def uid_part(uid: str) -> str:
    """``uid`` as a path component: itself when it is a UID, else ``invalid-`` and its digest."""
    if is_uid(uid):
        return uid
    return "invalid-" + hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def invalid_uids(instance: Instance) -> list[str]:
    """The instance's UIDs that are no UID, as ``Keyword 'value'``: such an instance is never fetched."""
    named = (
        ("StudyInstanceUID", instance.study_uid),
        ("SeriesInstanceUID", instance.series_uid),
        ("SOPInstanceUID", instance.sop_uid),
    )
    return [f"{keyword} {value[:80]!r}" for keyword, value in named if not is_uid(value)]


def verify(instance: Instance, dataset) -> None:
    """Raise :class:`Refused` unless ``dataset`` (a pydicom Dataset, pixel data or not) is ``instance``: the
    same study, series and SOP instance UIDs, a mammography SOP class, and the class the listing named."""
    said = {
        "StudyInstanceUID": instance.study_uid,
        "SeriesInstanceUID": instance.series_uid,
        "SOPInstanceUID": instance.sop_uid,
    }
    for keyword, listed in said.items():
        sent = str(dataset.get(keyword, "") or "")
        if sent != listed:
            raise Refused(f"the server sent {keyword} {sent[:80]!r} where its listing said {listed}")
    sop_class = str(dataset.get("SOPClassUID", "") or "")
    if sop_class not in MAMMOGRAPHY_SOP_CLASSES:
        raise Refused(f"the server sent SOP class {sop_class[:80]!r}, not a mammogram's")
    if instance.sop_class and sop_class != instance.sop_class:
        raise Refused(f"the server sent SOP class {sop_class} where its listing said {instance.sop_class}")


class PullFolder:
    """The folder ``root`` a pull keeps its files in."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, instance: Instance) -> Path:
        """Where ``instance`` is kept (or would be: an error row names it too)."""
        study, series = uid_part(instance.study_uid), uid_part(instance.series_uid)
        return self.root / study / series / f"{uid_part(instance.sop_uid)}.dcm"

    def keep(self, instance: Instance, dataset, write: Callable[[IO[bytes]], None]) -> tuple[Path, int]:
        """Keep ``instance``: :func:`verify` ``dataset`` (its header), then ``write`` the file's bytes to its
        path, atomically and durably. Returns the path and the bytes written; raises :class:`Refused` (nothing
        kept) or OSError."""
        verify(instance, dataset)
        path = self.path(instance)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "wb", fsync=True) as f:
            write(f)
            size = f.tell()
        return path, size
