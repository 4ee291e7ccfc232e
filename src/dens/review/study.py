"""The study facts a reviewer sees beside an exam's call: the study date and the woman's age on it.

They come from the DICOM header of a file the page shows (StudyDate; PatientAge, else her age on the study date
from PatientBirthDate), read when the page is written: preds.csv's columns stay as they are, so every older
preds.csv gets them too, and nothing of the route (nor the training cache keyed on it) changes. One header per
exam is read, never its pixel data (:func:`dens.route.dicomio.read_header`).
"""

from __future__ import annotations

import datetime as dt
import re
import warnings
from collections.abc import Callable, Mapping

from pydicom.dataset import Dataset

from dens import exams, labels
from dens.route.dicomio import header_text, read_header
from dens.route.errors import UnusableFile
from dens.sources import is_plain_image

STUDY_DATE, AGE = "study_date", "age"
_AGE_UNITS = {"D": "days", "W": "weeks", "M": "months"}  # and Y: years, shown as the bare number
_TRIES = 2  # headers read per exam at most


def facts(ds: Dataset) -> dict[str, str]:
    """The study date (ISO, or as written when it is no DICOM date) and the woman's age (years as a number, a
    younger age with its unit) that the header ``ds`` gives; a fact it does not give is left out."""
    found = {}
    written = header_text(ds, "StudyDate")
    study_date = _date(written)
    if written:
        found[STUDY_DATE] = study_date.isoformat() if study_date else written
    age = _age_string(header_text(ds, "PatientAge"))
    born = _date(header_text(ds, "PatientBirthDate"))
    if not age and born and study_date:  # her age on the study date, never on the day the page is written
        age = str(study_date.year - born.year - ((study_date.month, study_date.day) < (born.month, born.day)))
    if age:
        found[AGE] = age
    return found


def read_facts(path: str) -> dict[str, str]:
    """:func:`facts` of the DICOM file at ``path``; {} for a file whose header cannot be read. pydicom's warnings
    about a sender's odd values (a UID with letters) stay out of the terminal: the route has read the file already."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            ds, _ = read_header(path)
        except (UnusableFile, OSError):
            return {}
        return facts(ds)


def exam_facts(preds: Mapping[int, Mapping[str, str]], locate: Callable[[str], str]) -> dict[str, dict[str, str]]:
    """Exam key (as :func:`dens.exams.exam_key` gives it) -> its study facts, for the exams of ``preds`` (row ->
    preds.csv row, as strings): from the header of one of its ok DICOM files (a second where the first's cannot be
    read or says nothing). ``locate``: the file a ``path`` cell names. An exam whose headers give none is left
    out."""
    found: dict[str, dict[str, str]] = {}
    tries: dict[str, int] = {}
    for record in preds.values():
        key = exams.exam_key(record)
        if record.get(labels.STATUS) != "ok" or key in found or tries.get(key, 0) >= _TRIES:
            continue
        path = locate(record.get(labels.PATH, ""))
        if is_plain_image(path):
            continue
        tries[key] = tries.get(key, 0) + 1
        if got := read_facts(path):
            found[key] = got
    return found


def _date(text: str) -> dt.date | None:
    digits = re.sub(r"\D", "", text)  # DA is YYYYMMDD; an old ACR-NEMA header may write YYYY.MM.DD
    try:
        return dt.date(int(digits[:4]), int(digits[4:6]), int(digits[6:8])) if len(digits) == 8 else None
    except ValueError:
        return None


def _age_string(text: str) -> str:
    match = re.fullmatch(r"0*(\d+)\s*([DWMY]?)", text.strip().upper())
    if not match:
        return ""
    number, unit = int(match.group(1)), match.group(2) or "Y"
    return str(number) if unit == "Y" else f"{number} {_AGE_UNITS[unit]}"
