"""A reviewer's verdicts back as data: the review page's export merged into preds.exam.csv, and how far
model and reviewer agree (the figures the field accepts such tools on).

The page exports one row per reviewed exam (:data:`dens.review.page.VERDICT_COLUMNS`): the exam key as
preds.exam.csv writes it (``exam``, with the patient ID, accession and study UID it showed), the call the
reviewer saw, ``agree`` or ``disagree``, the category the reviewer would give, and who the reviewer is
(``reviewer``; an export from before the page asked has no such column, and merges with it empty). A verdict
whose exam is not in preds.exam.csv, or whose identity or call differs from that exam's row there (the page of
another run, a file edited since), or whose exam has no call A-D there, is an error: a merge never pairs a verdict
with the wrong exam. An exam reviewed twice (two exports put together) counts once: its latest verdict (by
``reviewed_at``, else the later row) is merged, and the report says how many were dropped.

The export is untrusted text: it is streamed row by row (never held whole, so memory follows the exam CSV, not
the export), and every cell of the merged CSV is written through :mod:`dens.preds.cells`, as preds.csv's are.
"""

from __future__ import annotations

import contextlib
import csv
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from dens import counted, exams, labels
from dens.agreement import weighted_kappa
from dens.files import atomic_write
from dens.preds.cells import escape_text, raw_cell, text_cell
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
    ``reviewers``: each reviewer's name and verdict count, most verdicts first (none: an export without names);
    ``dropped``: repeated verdicts not counted (each exam's latest counts once); ``repeated_exams``: repeated
    rows of the exam CSV not counted.
    """

    exams: int
    reviewed: int
    accepted: int
    categorised: int
    dense_agree: int
    confusion: np.ndarray = field(repr=False)
    reviewers: tuple[tuple[str, int], ...] = ()
    dropped: int = 0  # verdicts dropped for a later verdict on the same exam
    repeated_exams: int = 0  # rows of the exam CSV dropped: an exam it lists twice is kept once

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
        by = ", ".join(f"{escape_text(name)} ({n})" for name, n in self.reviewers)
        dropped = []
        if self.dropped:
            dropped.append(
                f"{counted(self.dropped, 'repeated verdict')} dropped (an exam's latest verdict counts once)"
            )
        if self.repeated_exams:
            dropped.append(
                f"{counted(self.repeated_exams, 'repeated exam row')} of the exam CSV dropped (its first kept)"
            )
        return [
            f"{self.reviewed} of {counted(self.exams, 'exam')} reviewed",
            *dropped,
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
            "dropped": self.dropped,
            "repeated_exams": self.repeated_exams,
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


@dataclass(frozen=True)
class VerdictRows:
    """A verdicts export as :func:`merge` reads it: its header and its rows, each with its line number."""

    columns: tuple[str, ...]
    rows: Iterable[tuple[int, Mapping[str, str]]]

    @classmethod
    def of(cls, table: pd.DataFrame) -> VerdictRows:
        """A table's rows (line 1 being the header)."""
        return cls(tuple(table.columns), enumerate(table.to_dict("records"), start=2))


@contextlib.contextmanager
def open_verdicts(path: Path) -> Iterator[VerdictRows]:
    """The export at ``path``, streamed: its rows are read one at a time while :func:`merge` takes them. A file
    that is not a CSV (undecodable text, a cell longer than the csv module's field limit) raises
    :class:`VerdictsError` with its line."""
    if not Path(path).is_file():
        raise VerdictsError(f"verdicts CSV {path} not found")
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)

        def unreadable(exc: Exception) -> VerdictsError:
            return VerdictsError(f"verdicts CSV {path} is not a readable CSV (line {max(reader.line_num, 1)}): {exc}")

        try:
            header = tuple(next(reader, ()))
        except (csv.Error, UnicodeDecodeError) as exc:
            raise unreadable(exc) from exc

        def rows() -> Iterator[tuple[int, dict[str, str]]]:
            line = reader.line_num + 1
            try:
                for cells in reader:
                    if any(cells):
                        yield line, dict(zip(header, cells, strict=False))
                    line = reader.line_num + 1
            except (csv.Error, UnicodeDecodeError) as exc:
                raise unreadable(exc) from exc

        yield VerdictRows(header, rows())


def _when(text: str) -> datetime | None:
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    return when if when.tzinfo is not None else None  # naive times cannot be ordered against the page's (UTC)


def _later(new: Mapping[str, str], old: Mapping[str, str]) -> bool:
    """Whether verdict ``new`` (a later row) replaces ``old`` for their exam: unless both carry a time and
    ``new``'s is the earlier, the later row wins."""
    a, b = _when(new.get(REVIEWED_AT, "")), _when(old.get(REVIEWED_AT, ""))
    return a is None or b is None or a >= b


class _Problems:
    """The verdicts refused: the first few worded, the rest counted (a hostile export stays small in memory)."""

    def __init__(self) -> None:
        self.listed: list[str] = []
        self.count = 0

    def add(self, text: str) -> None:
        self.count += 1
        if len(self.listed) < _LISTED:
            self.listed.append(text)


def merge(exam_table: pd.DataFrame, verdicts: pd.DataFrame | VerdictRows) -> tuple[pd.DataFrame, Agreement]:
    """preds.exam.csv's rows with the verdict columns (empty where unreviewed), and the agreement.

    Raises :class:`VerdictsError` listing every verdict that names an exam the table lacks, shows another
    identity or call than the table's row, reviews an exam the table has no call A-D for, or holds a value
    the page never writes. An exam reviewed more than once gets its latest verdict (:func:`_later`); an exam
    the table repeats is kept once (its first row). The agreement counts what was dropped.
    """
    if isinstance(verdicts, pd.DataFrame):
        verdicts = VerdictRows.of(verdicts)
    missing = [c for c in (exams.EXAM, labels.DENSITY) if c not in exam_table]
    if missing:
        raise VerdictsError(f"the exam CSV lacks {', '.join(missing)}: is it a dens-infer preds.exam.csv?")
    missing = [c for c in _REQUIRED if c not in verdicts.columns]
    if missing:
        raise VerdictsError(
            f"the verdicts CSV lacks {', '.join(missing)}: is it the review page's export (Export verdicts)?"
        )
    repeated = int(exam_table[exams.EXAM].duplicated(keep="first").sum())
    if repeated:
        exam_table = exam_table.drop_duplicates(subset=exams.EXAM, keep="first")
    rows = {str(r[exams.EXAM]): r for r in exam_table.to_dict("records")}
    problems = _Problems()
    merged: dict[str, dict[str, str]] = {}
    given = dropped = 0
    for n, v in verdicts.rows:
        given += 1
        key = v.get(exams.EXAM) or ""
        verdict, density = (v.get(VERDICT) or "").strip().lower(), (v.get(REVIEWER_DENSITY) or "").strip().upper()
        where = f"line {n} ({key!r})"
        row = rows.get(key)
        if row is None:
            problems.add(f"{where}: no such exam in the exam CSV")
            continue
        call = row[labels.DENSITY]
        shown = {c: v[c] for c in exams.IDENTITY if v.get(c)}
        other = [f"{c} {value!r} (the CSV has {row.get(c, '')!r})" for c, value in shown.items() if value != row.get(c)]
        if v.get(MODEL_DENSITY) and v[MODEL_DENSITY] != call:
            other.append(f"the call {v[MODEL_DENSITY]!r} (the CSV calls {call!r})")
        if other:
            problems.add(f"{where}: the page showed {', '.join(other)}")
        elif call not in labels.CLASSES:
            problems.add(f"{where}: the exam CSV's call {call!r} is not one of A-D: is it a dens-infer preds.exam.csv?")
        elif verdict not in (AGREE, DISAGREE):
            problems.add(f"{where}: verdict {v.get(VERDICT)!r} is neither {AGREE} nor {DISAGREE}")
        elif density and density not in labels.CLASSES:
            problems.add(f"{where}: reviewer_density {v.get(REVIEWER_DENSITY)!r} is not one of A-D")
        elif verdict == AGREE and density not in ("", call):
            problems.add(f"{where}: agrees with {call} but gives {density}")
        else:
            value = {
                VERDICT: verdict,
                REVIEWER_DENSITY: density or (call if verdict == AGREE else ""),
                REVIEWED_AT: v.get(REVIEWED_AT) or "",
                REVIEWER: (v.get(REVIEWER) or "").strip(),
            }
            if key in merged:
                dropped += 1
                if not _later(value, merged[key]):
                    continue
            merged[key] = value
    if problems.count:
        listed = "\n  ".join(problems.listed)
        more = (
            f"\n  ... and {problems.count - len(problems.listed)} more" if problems.count > len(problems.listed) else ""
        )
        raise VerdictsError(
            f"{problems.count} of {given} verdicts do not fit the exam CSV; nothing was merged. Export the "
            f"verdicts from the review page of this preds.exam.csv's run:\n  {listed}{more}"
        )

    out = exam_table.reset_index(drop=True)
    for column in MERGED_COLUMNS:
        out[column] = [merged.get(str(k), {}).get(column, "") for k in out[exams.EXAM]]
    return out, replace(agreement(out), dropped=dropped, repeated_exams=repeated)


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
    exam_table = read_csv(cfg.exams, "exam CSV")
    with open_verdicts(cfg.verdicts) as given:
        merged, result = merge(exam_table, given)
    if cfg.out is not None:
        write_merged(merged, cfg.out, exam_columns=tuple(exam_table.columns))
    return result


def write_merged(merged: pd.DataFrame, path: Path, exam_columns: tuple[str, ...]) -> None:
    """The merged table as a CSV (atomically), every cell a :mod:`dens.preds.cells` cell: the exam CSV's own
    cells (``exam_columns``) kept as they are written (guarded once, however often merged), the verdicts'
    values escaped and guarded against formulas."""
    with atomic_write(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
        columns = list(merged.columns)
        writer.writerow([text_cell(c) for c in columns])
        kept = [c in exam_columns for c in columns]
        for values in merged.itertuples(index=False, name=None):
            writer.writerow(
                [text_cell(raw_cell(v)) if exam else text_cell(v) for v, exam in zip(values, kept, strict=True)]
            )
