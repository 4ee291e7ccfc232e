"""Which studies a pull takes: :class:`Query`, parsed from its command-line spellings and checked, and the
UID check every UID from a server goes through before it names a file.

A query is a search (a study date or range, ``--since``, the modality, extra matching keys) or a list of
Study Instance UIDs. It becomes QIDO-RS query parameters (:meth:`Query.filters`) and C-FIND matching keys
(:meth:`Query.keys`), so DICOMweb and DIMSE pulls select the same studies.

Standard library only (pydicom's dictionary is read when a ``--query`` key is checked): dens-infer's
command-line module imports this, and a spawned decode worker imports that module before it starts.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from dataclasses import dataclass

DEFAULT_MODALITY = "MG"
MAX_UID = 64  # PS3.5 9.1: a UID is at most 64 characters
_UID = re.compile(r"[0-9]+(\.[0-9]+)*", re.ASCII)
_DATE = re.compile(r"[0-9]{8}", re.ASCII)
_SINCE = re.compile(r"([1-9][0-9]{0,4})([hd])", re.ASCII)
_KEYWORD = re.compile(r"[A-Za-z][A-Za-z0-9]{0,63}", re.ASCII)
_MODALITY = re.compile(r"[A-Z0-9_]{1,16}", re.ASCII)  # CS: upper case, digits, underscore
# Keys a --query may not set: each has an option of its own, or is the query's own machinery.
_OWN_KEYS = {
    "StudyDate": "--study-date or --since",
    "ModalitiesInStudy": "--modality",
    "StudyInstanceUID": "--study-uid",
    "QueryRetrieveLevel": "nothing (dens sets the query level)",
    "SeriesInstanceUID": "nothing (a pull takes whole studies)",
    "SOPInstanceUID": "nothing (a pull takes whole studies)",
}


def is_uid(text: str) -> bool:
    """Whether ``text`` is a UID dens takes from a server: digits and dots, no empty component (so no
    ``..``, no leading or trailing dot), at most 64 characters. Only such a UID ever names a file."""
    return isinstance(text, str) and len(text) <= MAX_UID and _UID.fullmatch(text) is not None


def check_uid(text: str, option: str = "--study-uid") -> str:
    """``text`` when it is a UID (:func:`is_uid`), else a ValueError worded for ``option``."""
    if not is_uid(text):
        raise ValueError(
            f"{option} {text!r}: not a DICOM UID (digits and dots, no empty component, at most {MAX_UID} "
            "characters, such as 1.2.840.113619.2.55.3.604688119)"
        )
    return text


def _date(text: str, option: str) -> dt.date:
    if not _DATE.fullmatch(text):
        raise ValueError(f"{option}: {text!r} is not a date YYYYMMDD (such as 20261206)")
    try:
        return dt.datetime.strptime(text, "%Y%m%d").date()
    except ValueError:
        raise ValueError(f"{option}: {text!r} is no calendar date (YYYYMMDD)") from None


def parse_study_date(text: str) -> str:
    """``--study-date``: a date ``YYYYMMDD`` or a range ``YYYYMMDD-YYYYMMDD`` (either end may be left open),
    as DICOM's range matching writes it; a ValueError says what is wrong."""
    text = text.strip()
    start, dash, end = text.partition("-")
    if not dash:
        _date(start, "--study-date")
        return start
    if not start and not end:
        raise ValueError("--study-date '-': give a date, or a range with at least one end (20261201-20261206)")
    first = _date(start, "--study-date") if start else None
    last = _date(end, "--study-date") if end else None
    if first and last and first > last:
        raise ValueError(f"--study-date {text}: the range ends before it starts")
    return f"{start}-{end}"


def parse_since(text: str, now: dt.datetime | None = None) -> str:
    """``--since 24h`` or ``7d``: the study dates from that long before ``now`` (default: this moment) up to
    its day, as a range ``YYYYMMDD-YYYYMMDD`` (study dates are days: 24h from 09:00 takes yesterday's studies
    whole)."""
    match = _SINCE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"--since {text!r}: a number of hours or days, such as 24h or 7d")
    amount, unit = int(match.group(1)), match.group(2)
    now = now or dt.datetime.now()
    start = now - (dt.timedelta(hours=amount) if unit == "h" else dt.timedelta(days=amount))
    return f"{start:%Y%m%d}-{now:%Y%m%d}"


def parse_key(text: str) -> tuple[str, str]:
    """``--query KEY=VALUE``: a DICOM keyword (AccessionNumber, PatientID, InstitutionName...) and the value
    it must match (DICOM matching: ``*`` and ``?`` wildcards where the server allows them)."""
    key, eq, value = text.partition("=")
    key, value = key.strip(), value.strip()
    if not eq or not key:
        raise ValueError(f"--query {text!r}: expected KEY=VALUE, such as AccessionNumber=A123 or PatientID=P1")
    if key in _OWN_KEYS:
        raise ValueError(f"--query {key}: set it with {_OWN_KEYS[key]}, not --query")
    if not _KEYWORD.fullmatch(key) or not _is_keyword(key):
        raise ValueError(f"--query {key!r}: not a DICOM keyword (such as AccessionNumber, PatientID, InstitutionName)")
    if not value or any(ord(c) < 0x20 or c in "\\\x7f" for c in value) or len(value) > 64:
        raise ValueError(f"--query {key}: the value must be 1-64 characters, without a backslash or control characters")
    return key, value


def _is_keyword(key: str) -> bool:
    from pydicom.datadict import tag_for_keyword

    return tag_for_keyword(key) is not None


@dataclass(frozen=True)
class Query:
    """Which studies to pull: those whose StudyDate matches ``study_date`` (``YYYYMMDD`` or a range), with
    ``modality`` in ModalitiesInStudy and the extra matching ``keys``, or the studies ``study_uids`` names
    (then ``modality`` applies only when given). Build one with :meth:`parse` from the command line's
    spellings; the constructor checks what it is given."""

    study_date: str | None = None
    modality: str | None = DEFAULT_MODALITY
    study_uids: tuple[str, ...] = ()
    keys: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.study_date is not None:
            parse_study_date(self.study_date)
        for uid in self.study_uids:
            check_uid(uid)
        for key, value in self.keys:
            parse_key(f"{key}={value}")
        if self.modality is not None and not _MODALITY.fullmatch(self.modality):
            raise ValueError(f"--modality {self.modality!r}: a DICOM modality code, such as MG")
        if self.study_uids and self.study_date:
            raise ValueError("--study-uid names the studies itself: leave out --study-date and --since")
        if not (self.study_date or self.study_uids or self.keys):
            raise ValueError(
                "a PACS source needs a query: --study-date, --since, --study-uid or --query KEY=VALUE (a pull of "
                "the whole archive is not what anyone means)"
            )

    @classmethod
    def parse(
        cls,
        study_date: str | None = None,
        since: str | None = None,
        modality: str | None = None,
        study_uids: Iterable[str] = (),
        keys: Iterable[str] = (),
        now: dt.datetime | None = None,
    ) -> Query:
        """The query the options spell: ``study_date`` or ``since`` (not both; ``since`` counts back from
        ``now``, default this moment), ``modality`` (None: MG for a search, none for a list of UIDs),
        ``study_uids``, ``keys`` as ``KEY=VALUE``. ValueError, worded for the command line, when one cannot be
        read."""
        if study_date and since:
            raise ValueError("--study-date and --since both give the study dates: choose one")
        dates = parse_study_date(study_date) if study_date else parse_since(since, now) if since else None
        uids = tuple(dict.fromkeys(u.strip() for u in study_uids))
        if modality is not None:
            modality = modality.strip().upper()
        elif not uids:
            modality = DEFAULT_MODALITY
        return cls(dates, modality, uids, tuple(parse_key(k) for k in keys))

    def filters(self) -> dict[str, str]:
        """The study-level matching keys by keyword (QIDO-RS query parameters; C-FIND adds its return keys).
        A list of study UIDs is not among them: it is sent in groups (:meth:`uid_groups`)."""
        found = dict(self.keys)
        if self.study_date:
            found["StudyDate"] = self.study_date
        if self.modality:
            found["ModalitiesInStudy"] = self.modality
        return found

    def uid_groups(self, size: int = 20) -> list[tuple[str, ...]]:
        """``study_uids`` in groups of ``size`` (one request each, so a long list never makes a URL too long);
        ``[()]`` for a search."""
        if not self.study_uids:
            return [()]
        return [self.study_uids[i : i + size] for i in range(0, len(self.study_uids), size)]

    def describe(self) -> str:
        """The query in a few words, for the log and the summary."""
        said = []
        if self.study_uids:
            said.append(f"{len(self.study_uids)} study UID(s)")
        if self.study_date:
            said.append(f"StudyDate {self.study_date}")
        if self.modality:
            said.append(f"modality {self.modality}")
        said += [f"{k}={v}" for k, v in self.keys]
        return ", ".join(said)
