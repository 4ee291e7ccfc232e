"""Pulling studies from a PACS: what dens-infer does with a DICOMweb URL or ``dicom://AET@HOST:PORT`` as
STUDIES, and what a scheduled pull builds on. A library, no command of its own.

    from dens.pull import Access, Pull, Query, parse_source

    source = parse_source("https://pacs.example.org/dicom-web")
    with Pull(source, Query.parse(since="24h"), Access(token_env="PACS_TOKEN"), "pulled/") as pull:
        for pulled in pull.instances():
            ...  # pulled.path (the file kept) or pulled.problem (why there is none)
    print(pull.summary.line())

* :mod:`dens.pull.query`: :class:`Query`, which studies (dates, modality, UIDs, matching keys), and the UID check.
* :mod:`dens.pull.source`: the source as STUDIES spells it (:func:`parse_source`), :class:`Access` (authentication,
  CA, AE title, C-MOVE or C-GET, the move port).
* :mod:`dens.pull.study`: what a pull finds and what becomes of it (:class:`Pulled`, :class:`PullSummary`).
* :mod:`dens.pull.folder`: where the files are kept, and the check each passes first.
* :mod:`dens.pull.driver`: :class:`Pull`, a study at a time, one result per instance found.
* :mod:`dens.pull.dicomweb` (QIDO-RS, WADO-RS with dicomweb-client) and :mod:`dens.pull.dimse` (C-FIND, C-MOVE,
  C-GET with pynetdicom): the two protocols.
* :mod:`dens.pull.sopclasses`: the mammography storage classes and transfer syntaxes dens takes.

The query, the source and the records load the standard library only; the protocols load when a pull opens.
"""

from __future__ import annotations

from dens import lazy_exports
from dens.pull.query import Query, check_uid, is_uid
from dens.pull.source import Access, DicomWeb, Dimse, Source, is_remote, parse_source, redact
from dens.pull.study import PULL_FAILED, Instance, Pulled, PullError, PullSummary, Study

__all__ = [
    "PULL_FAILED",
    "Access",
    "DicomWeb",
    "Dimse",
    "Instance",
    "Pull",
    "PullError",
    "PullSummary",
    "Pulled",
    "Query",
    "Source",
    "Study",
    "check_uid",
    "is_remote",
    "is_uid",
    "parse_source",
    "redact",
]

__getattr__ = lazy_exports(__name__, {"Pull": "dens.pull.driver"})
