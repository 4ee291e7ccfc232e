"""A reviewer's verdicts back as data: the review page's export merged into preds.exam.csv, and how far
model and reviewer agree (the figures the field accepts such tools on).

The page exports one row per reviewed exam (:data:`dens.review.page.VERDICT_COLUMNS`): the exam key as
preds.exam.csv writes it (``exam``, with the patient ID, accession and study UID it showed), the call the
reviewer saw, ``agree`` or ``disagree``, the category the reviewer would give, and who the reviewer is
(``reviewer``; an export from before the page asked has no such column, and merges with it empty). A verdict
whose exam is not in preds.exam.csv, or whose identity or call differs from that exam's row there (the page of
another run, a file edited since), is an error: a merge never pairs a verdict with the wrong exam.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dens import counted, exams, labels
from dens.agreement import weighted_kappa
from dens.files import atomic_write
from dens.review.page import AGREE, DISAGREE, MODEL_DENSITY, REVIEWED_AT, REVIEWER, REVIEWER_DENSITY, VERDICT

MERGED_COLUMNS = (VERDICT, REVIEWER_DENSITY, REVIEWED_AT, REVIEWER)
_REQUIRED = (exams.EXAM, VERDICT, REVIEWER_DENSITY)
_LISTED = 10  # errors named in a message; the rest counted


class VerdictsError(Exception):
    """Verdicts that cannot be merged (unknown exams, another run's calls, bad values); the message lists
    them and says what to do."""


@dataclass(frozen=True)
class VerdictsConfig:
    """dens-verdicts' settings: the exam CSV, the page's export, and where to write the merged CSV (None:
    only report the agreement)."""

    exams: Path
    verdicts: Path
    out: Path | None = None


@dataclass(frozen=True)
class Agreement:
    """Model against reviewer over the reviewed exams.

    ``accepted``: verdicts ``agree``; ``categorised``: verdicts with the reviewer's category (every
    ``agree``, and each ``disagree`` that gives one); ``dense_agree``: of those, the exams both call on the
    same side of the dense line (A/B against C/D); ``confusion``: counts [model, reviewer] over A-D;
    ``reviewers``: each reviewer's name and verdict count, most verdicts first (none: an export without names).
    """

    exams: int
    reviewed: int
    accepted: int
    categorised: int
    dense_agree: int
    confusion: np.ndarray = field(repr=False)
    reviewers: tuple[tuple[str, int], ...] = ()

    @property
    def accepted_share(self) -> float:
        return self.accepted / self.reviewed if self.reviewed else float("nan")

    @property
    def dense_share(self) -> float:
        return self.dense_agree / self.categorised if self.categorised else float("nan")

    def kappa(self, weights: str | None = "linear") -> float:
        """Cohen's kappa over A-D (``linear``, ``quadratic`` or None: unweighted); NaN without verdicts."""
        return weighted_kappa(self.confusion, weights)

    def lines(self) -> list[str]:
        """The report dens-verdicts prints."""
        classes = labels.CLASSES
        width = max(len(c) for c in classes) + 4
        table = ["  model \\ reviewer " + "".join(f"{c:>{width}}" for c in classes)]
        for k, c in enumerate(classes):
            table.append(f"  {c:<17}" + "".join(f"{n:>{width}}" for n in self.confusion[k]))
        by = ", ".join(f"{name} ({n})" for name, n in self.reviewers)
        return [
            f"{self.reviewed} of {counted(self.exams, 'exam')} reviewed",
            *([f"reviewed by {by}"] if by else []),
            f"accepted (agree): {self.accepted} of {self.reviewed} ({_pct(self.accepted_share)})",
            f"dense/non-dense agreement: {self.dense_agree} of {self.categorised} ({_pct(self.dense_share)})",
            f"Cohen's kappa over A-D, linear weights: {self.kappa('linear'):.3f} "
            f"(quadratic {self.kappa('quadratic'):.3f}, unweighted {self.kappa(None):.3f}) over "
            f"{counted(self.categorised, 'exam')}",
            "counts:",
            *table,
        ]

    def to_dict(self) -> dict:
        return {
            "exams": self.exams,
            "reviewed": self.reviewed,
            "accepted": self.accepted,
            "accepted_share": self.accepted_share,
            "categorised": self.categorised,
            "dense_agree": self.dense_agree,
            "dense_share": self.dense_share,
            "kappa_linear": self.kappa("linear"),
            "kappa_quadratic": self.kappa("quadratic"),
            "confusion": self.confusion.tolist(),
            "reviewers": dict(self.reviewers),
        }


def _pct(share: float) -> str:
    return "n/a" if share != share else f"{100 * share:.1f}%"


def read_csv(path: Path, what: str) -> pd.DataFrame:
    """A CSV as strings, exactly as written (a spreadsheet's byte-order mark dropped)."""
    if not Path(path).is_file():
        raise VerdictsError(f"{what} {path} not found")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise VerdictsError(f"{what} {path} is not a readable CSV: {exc}") from exc


def merge(exam_table: pd.DataFrame, verdicts: pd.DataFrame) -> tuple[pd.DataFrame, Agreement]:
    """preds.exam.csv's rows with the verdict columns (empty where unreviewed), and the agreement.

    Raises :class:`VerdictsError` listing every verdict that names an exam the table lacks, shows another
    identity or call than the table's row, repeats an exam, or holds a value the page never writes.
    """
    missing = [c for c in (exams.EXAM, labels.DENSITY) if c not in exam_table]
    if missing:
        raise VerdictsError(f"the exam CSV lacks {', '.join(missing)}: is it a dens-infer preds.exam.csv?")
    missing = [c for c in _REQUIRED if c not in verdicts]
    if missing:
        raise VerdictsError(
            f"the verdicts CSV lacks {', '.join(missing)}: is it the review page's export (Export verdicts)?"
        )
    rows = {str(r[exams.EXAM]): r for r in exam_table.to_dict("records")}
    problems: list[str] = []
    merged: dict[str, dict[str, str]] = {}
    for n, v in enumerate(verdicts.to_dict("records"), start=2):  # line 1 is the header
        key, verdict, density = v[exams.EXAM], v[VERDICT].strip().lower(), v[REVIEWER_DENSITY].strip().upper()
        where = f"line {n} ({key!r})"
        row = rows.get(key)
        if row is None:
            problems.append(f"{where}: no such exam in the exam CSV")
            continue
        shown = {c: v[c] for c in exams.IDENTITY if v.get(c)}
        other = [f"{c} {value!r} (the CSV has {row.get(c, '')!r})" for c, value in shown.items() if value != row.get(c)]
        if v.get(MODEL_DENSITY) and v[MODEL_DENSITY] != row[labels.DENSITY]:
            other.append(f"the call {v[MODEL_DENSITY]!r} (the CSV calls {row[labels.DENSITY]!r})")
        if other:
            problems.append(f"{where}: the page showed {', '.join(other)}")
        elif key in merged:
            problems.append(f"{where}: a second verdict for this exam")
        elif verdict not in (AGREE, DISAGREE):
            problems.append(f"{where}: verdict {v[VERDICT]!r} is neither {AGREE} nor {DISAGREE}")
        elif density and density not in labels.CLASSES:
            problems.append(f"{where}: reviewer_density {v[REVIEWER_DENSITY]!r} is not one of A-D")
        elif verdict == AGREE and density not in ("", row[labels.DENSITY]):
            problems.append(f"{where}: agrees with {row[labels.DENSITY]} but gives {density}")
        else:
            merged[key] = {
                VERDICT: verdict,
                REVIEWER_DENSITY: density or (row[labels.DENSITY] if verdict == AGREE else ""),
                REVIEWED_AT: v.get(REVIEWED_AT, ""),
                REVIEWER: v.get(REVIEWER, "").strip(),
            }
    if problems:
        listed = "\n  ".join(problems[:_LISTED])
        more = f"\n  ... and {len(problems) - _LISTED} more" if len(problems) > _LISTED else ""
        raise VerdictsError(
            f"{len(problems)} of {len(verdicts)} verdicts do not fit the exam CSV; nothing was merged. Export the "
            f"verdicts from the review page of this preds.exam.csv's run:\n  {listed}{more}"
        )

    out = exam_table.copy()
    for column in MERGED_COLUMNS:
        out[column] = [merged.get(str(k), {}).get(column, "") for k in out[exams.EXAM]]
    return out, agreement(out)


def agreement(merged: pd.DataFrame) -> Agreement:
    """The figures over a merged table's reviewed rows (model: ``density``; reviewer: the verdict)."""
    reviewed = merged[merged[VERDICT] != ""]
    categorised = reviewed[reviewed[REVIEWER_DENSITY] != ""]
    k = labels.NUM_CLASSES
    confusion = np.zeros((k, k), np.int64)
    for model, reviewer in zip(categorised[labels.DENSITY], categorised[REVIEWER_DENSITY], strict=True):
        confusion[labels.class_index(model), labels.class_index(reviewer)] += 1
    dense_agree = sum(
        labels.is_dense(m) == labels.is_dense(r)
        for m, r in zip(categorised[labels.DENSITY], categorised[REVIEWER_DENSITY], strict=True)
    )
    return Agreement(
        exams=len(merged),
        reviewed=len(reviewed),
        accepted=int((reviewed[VERDICT] == AGREE).sum()),
        categorised=len(categorised),
        dense_agree=int(dense_agree),
        confusion=confusion,
        reviewers=tuple((str(name), int(n)) for name, n in reviewed[REVIEWER].value_counts().items() if name)
        if REVIEWER in reviewed
        else (),
    )


def run(cfg: VerdictsConfig) -> Agreement:
    """Merge ``cfg.verdicts`` into ``cfg.exams``; write the merged CSV to ``cfg.out`` (atomically) when
    given; return the agreement."""
    merged, result = merge(read_csv(cfg.exams, "exam CSV"), read_csv(cfg.verdicts, "verdicts CSV"))
    if cfg.out is not None:
        with atomic_write(cfg.out, "w", encoding="utf-8", newline="") as f:
            merged.to_csv(f, index=False, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    return result
