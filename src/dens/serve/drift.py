"""Drift: the mix of the node's exam calls per acquisition unit (DICOM Manufacturer and ManufacturerModelName),
over the last ``--drift-window`` exams of each, against what the model's card says it called on its test split.

A unit whose images look unlike the training data (a new detector, a software update that changed its
processing) often shows first as a shift in the share of dense calls (C or D) rather than as an error. The
reference is the model's own dense share on its test split's exams: its card (:mod:`dens.artifact.modelcard`)
holds, at exam level, the test exams (``n``), the truly dense ones (``positives``) and the call's sensitivity and
specificity, so the dense calls it made there were ``sensitivity * positives + (1 - specificity) * (n -
positives)``. A window's dense share is compared with the range it would stay within, 99 times in 100, were the
unit's exams drawn from the test split's population: the reference share plus or minus ``z`` (2.576) standard
errors of the difference of two shares, the window's ``n`` and the test split's (so a small test split widens
it): against a test split of endless size, the score test whose inversion is the Wilson interval. Its variance
uses the Wilson centre of the test split's share, so a share of 0 or 1 still gives a range of some width. No
verdict is given before a window holds :data:`MIN_EXAMS` exams, and none where the card has no test figures at
exam level (a model trained before cards, or no card): the status says so, and the node never warns.

The windows count exams, not images: the views of one woman are called alike, so her images are not
independent draws, and a range built on them as if they were would be too narrow and warn too often.

The reference is the test split's population, not the unit's: a site whose women are denser than the test
split's warns for that reason too. A warning says "look at this unit's images", not "the model is wrong".

The windows survive a restart: :meth:`Drift.load` reads the last answered exams back from the state's database
(each exam's call and the unit its usable images came from).
"""

from __future__ import annotations

import math
import re
import threading
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from dens import labels
from dens.artifact import modelcard
from dens.preds.columns import MANUFACTURER, MANUFACTURER_MODEL
from dens.serve.config import MIN_DRIFT_WINDOW
from dens.serve.state import ANSWERED, ROW_STATUS, State

MIN_EXAMS = MIN_DRIFT_WINDOW  # a window's exams before it gets a verdict
Z = 2.576  # a two-sided 99% range
MAX_UNITS = 32  # units tracked (and labelled in /metrics); exams of any further unit count under OTHER
OTHER = ("(other)", "(other)")
UNKNOWN = "(unknown)"
_UNIT_TEXT = 64  # characters kept of a Manufacturer or ManufacturerModelName
WITHIN, OUTSIDE, TOO_FEW, NO_REFERENCE = "within", "outside", "too_few", "no_reference"


@dataclass(frozen=True)
class Reference:
    """The model's dense calls on its test split's exams, from its card."""

    dense: float  # dense calls (C or D) on the test exams
    exams: int  # test exams
    images_by_class: Mapping[str, int]  # the test split's labelled images per class, for the reader

    @property
    def share(self) -> float:
        return self.dense / self.exams

    @classmethod
    def of(cls, metadata: Mapping) -> tuple[Reference | None, str]:
        """The reference a model's metadata gives, or None and why not (a sentence for the status)."""
        card = modelcard.of(metadata.get("summary"))
        if not card:
            return None, "the model carries no model card: no test split to compare with, so no drift verdict"
        dense = card.get("test", {}).get("exam", {}).get("dense", {})
        n, positives = dense.get("n"), dense.get("positives")
        sensitivity, specificity = dense.get("sensitivity"), dense.get("specificity")
        if not isinstance(n, int) or not isinstance(positives, int) or n <= 0 or not 0 <= positives <= n:
            return None, "the model's card has no exam-level test figures: no drift verdict"
        negatives = n - positives
        if (positives and not _finite(sensitivity)) or (negatives and not _finite(specificity)):
            return None, "the model's card lacks its test split's dense sensitivity or specificity: no drift verdict"
        calls = (sensitivity * positives if positives else 0.0) + ((1 - specificity) * negatives if negatives else 0.0)
        classes = card.get("data", {}).get("splits", {}).get("test", {}).get("classes", {})
        return cls(round(calls, 3), n, {c: int(classes.get(c, 0)) for c in labels.CLASSES}), ""

    def expected(self, n: int, z: float = Z) -> tuple[float, float]:
        """The range a window of ``n`` exams' dense share stays within (two-sided, ``z``) if its exams are like
        the test split's."""
        centre = (self.dense + z * z / 2) / (self.exams + z * z)  # Wilson's: never 0 or 1
        half = z * math.sqrt(centre * (1 - centre) * (1 / n + 1 / self.exams))
        return max(0.0, self.share - half), min(1.0, self.share + half)


@dataclass(frozen=True)
class Change:
    """A unit whose verdict went from within the range (or none) to outside it, or back."""

    unit: tuple[str, str]
    warning: bool  # True: it left the range; False: it came back
    exams: int
    dense_share: float
    expected: tuple[float, float] | None  # None: no verdict any more (too few exams)
    reference: float

    def line(self) -> str:
        """What the log says of it."""
        maker, model = self.unit
        shown = "-" if self.expected is None else f"{self.expected[0]:.3f}-{self.expected[1]:.3f}"
        if not self.warning:
            return f"drift: {maker} {model} is back within {shown} ({self.dense_share:.3f} dense)"
        return (
            f"drift warning: {maker} {model}: {self.dense_share:.3f} of its last {self.exams} exams called dense, "
            f"outside the {shown} expected from the model card's test split ({self.reference:.3f}); look at this "
            "unit's images"
        )

    def fields(self) -> dict:
        """What the audit log says of it."""
        return {
            "manufacturer": self.unit[0],
            "manufacturer_model": self.unit[1],
            "exams": self.exams,
            "dense_share": self.dense_share,
            "expected": None if self.expected is None else list(self.expected),
            "reference": round(self.reference, 4),
        }


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def unit_of(rows) -> tuple[str, str]:
    """The unit an exam's images came from: the Manufacturer and ManufacturerModelName most of its usable
    images carry (``(unknown)`` where the header has none)."""
    found = Counter(
        (_unit_text(r.get(MANUFACTURER, "")), _unit_text(r.get(MANUFACTURER_MODEL, "")))
        for r in rows
        if r.get(labels.STATUS) == "ok"
    )
    return min(found.items(), key=lambda kv: (-kv[1], kv[0]))[0] if found else (UNKNOWN, UNKNOWN)


def _unit_text(value) -> str:
    text = re.sub(r"\s+", " ", str(value or "")).strip()[:_UNIT_TEXT]
    return text or UNKNOWN


class Drift:
    """The last ``window`` exam calls of each unit, and their verdicts against ``reference``. Used from the
    scheduler's thread (:meth:`add`) and the status' and metrics' (:meth:`snapshot`), under one lock."""

    def __init__(self, window: int, reference: Reference | None, why: str = "", min_exams: int = MIN_EXAMS):
        self.window, self.reference, self.why, self.min_exams = window, reference, why, min_exams
        self._calls: dict[tuple[str, str], OrderedDict[str, str]] = {}  # unit -> study key -> call
        self._unit: dict[str, tuple[str, str]] = {}  # study key -> its unit, for the exams in a window
        self._outside: set[tuple[str, str]] = set()
        self._lock = threading.RLock()

    def add(self, study_key: str, unit: tuple[str, str], density: str) -> Change | None:
        """An exam's call (a study answered again replaces its call); the unit's change of verdict, if any."""
        with self._lock:
            unit = self._put(study_key, unit, density)
            return None if unit is None else self._judge(unit)

    def _put(self, study_key: str, unit: tuple[str, str], density: str) -> tuple[str, str] | None:
        if density not in labels.CLASSES:
            return None
        if unit not in self._calls and len(self._calls) >= MAX_UNITS:
            unit = OTHER
        previous = self._unit.get(study_key)
        if previous is not None and previous != unit:
            self._calls[previous].pop(study_key, None)
        calls = self._calls.setdefault(unit, OrderedDict())
        calls[study_key] = density
        calls.move_to_end(study_key)
        self._unit[study_key] = unit
        while len(calls) > self.window:
            gone, _ = calls.popitem(last=False)
            del self._unit[gone]
        return unit

    def _judge(self, unit: tuple[str, str]) -> Change | None:
        shown = self.unit(unit)
        outside = shown["verdict"] == OUTSIDE
        if outside == (unit in self._outside):
            return None
        (self._outside.add if outside else self._outside.discard)(unit)
        expected = None if shown["expected"] is None else tuple(shown["expected"])
        return Change(unit, outside, shown["exams"], shown["dense_share"], expected, self.reference.share)

    def unit(self, unit: tuple[str, str]) -> dict:
        """One unit's window: its exams, the share of each call, the dense share, the expected range and the
        verdict (``within``, ``outside``, ``too_few`` exams yet, ``no_reference``)."""
        with self._lock:
            calls = Counter(self._calls.get(unit, {}).values())
        n = sum(calls.values())
        dense = sum(calls[c] for c in labels.DENSE_CLASSES) / n if n else None
        expected = self.reference.expected(n) if self.reference and n >= self.min_exams else None
        verdict = (
            NO_REFERENCE
            if self.reference is None
            else TOO_FEW
            if expected is None
            else WITHIN
            if expected[0] <= dense <= expected[1]
            else OUTSIDE
        )
        return {
            "manufacturer": unit[0],
            "manufacturer_model": unit[1],
            "exams": n,
            "shares": {c: round(calls[c] / n, 4) if n else None for c in labels.CLASSES},
            "dense_share": None if dense is None else round(dense, 4),
            "expected": None if expected is None else [round(expected[0], 4), round(expected[1], 4)],
            "verdict": verdict,
        }

    def snapshot(self) -> dict:
        """The drift section of the status: the window, the reference (or why there is none) and each unit."""
        ref = self.reference
        with self._lock:
            units = [self.unit(u) for u in sorted(self._calls)]
        return {
            "window": self.window,
            "min_exams": self.min_exams,
            "confidence": 0.99,
            "reference": None
            if ref is None
            else {
                "source": "the model card's test split, exam level: the model's dense calls there",
                "exams": ref.exams,
                "dense_share": round(ref.share, 4),
                "test_images_by_class": dict(ref.images_by_class),
            },
            "no_reference": self.why or None,
            "units": units,
        }

    def load(self, state: State) -> list[Change]:
        """Fill the windows from the state's last answered exams (the most recent ``window`` x
        :data:`MAX_UNITS`); the units then outside their range (each a warning to give)."""
        found = state.read(
            "SELECT s.study_key, s.density, (SELECT json_extract(i.row, ?) || char(31) || json_extract(i.row, ?) "
            f"FROM instances i WHERE i.study_key = s.study_key AND {ROW_STATUS} = 'ok' GROUP BY 1 "
            "ORDER BY COUNT(*) DESC, 1 LIMIT 1) FROM studies s WHERE s.state = ? AND s.density IN ('A', 'B', 'C', "
            "'D') ORDER BY s.answered DESC LIMIT ?",
            [f"$.{MANUFACTURER}", f"$.{MANUFACTURER_MODEL}", ANSWERED, self.window * MAX_UNITS],
        )
        with self._lock:
            for study_key, density, unit in reversed(found):
                maker, _, model = (unit or "").partition("\x1f")
                self._put(study_key, (_unit_text(maker), _unit_text(model)), density)
            return [change for unit in list(self._calls) if (change := self._judge(unit)) is not None]

    @property
    def exams(self) -> int:
        """Exams in all the windows."""
        return len(self._unit)
