"""Verdicts as data: dens-verdicts merges a reviewer's verdicts into preds.exam.csv and reports agreement
(accepted share, dense/non-dense agreement, Cohen's kappa over A-D), refuses verdicts that fit no exam; and
the round trip through the page itself: marked in headless Chromium, exported, merged, scored."""

from __future__ import annotations

import csv
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from chromium import CHROMIUM, MISSING, Browser
from dens import exams, labels, verdicts
from dens.review import report
from dens.review.page import VERDICT_COLUMNS
from dens.verdicts.cli import main as verdicts_main

CALLS = ["A", "B", "C", "D", "C", "B"]


def exam_table() -> pd.DataFrame:
    rows = []
    for k, call in enumerate(CALLS):
        p_dense = {"A": 0.05, "B": 0.3, "C": 0.7, "D": 0.95}[call]
        rows.append(
            {
                exams.EXAM: f"study_uid:1.2.{k}",
                labels.PATIENT_ID: f"P{k}",
                labels.ACCESSION: f"A{k}",
                labels.STUDY_UID: f"1.2.{k}",
                labels.DENSITY: call,
                labels.P_DENSE: f"{p_dense:.6f}",
            }
        )
    return pd.DataFrame(rows)


def verdict(k: int, what: str, density: str, **changes) -> dict:
    row = exam_table().iloc[k]
    return {
        exams.EXAM: row[exams.EXAM],
        labels.PATIENT_ID: row[labels.PATIENT_ID],
        labels.ACCESSION: row[labels.ACCESSION],
        labels.STUDY_UID: row[labels.STUDY_UID],
        "model_density": row[labels.DENSITY],
        "model_p_dense": row[labels.P_DENSE],
        "verdict": what,
        "reviewer_density": density,
        "reviewed_at": "2026-12-01T04:00:00Z",
        "run": "0123456789abcdef",
        **changes,
    }


def linear_kappa(pairs: list[tuple[str, str]]) -> float:
    """Cohen's linearly weighted kappa from its definition, pair by pair (no confusion-matrix code shared
    with the module under test)."""
    index = {c: k for k, c in enumerate(labels.CLASSES)}
    a = [index[x] for x, _ in pairs]
    b = [index[y] for _, y in pairs]
    n, k = len(pairs), len(labels.CLASSES)
    observed = sum(abs(x - y) for x, y in zip(a, b, strict=True)) / n
    pa = [a.count(i) / n for i in range(k)]
    pb = [b.count(j) / n for j in range(k)]
    expected = sum(pa[i] * pb[j] * abs(i - j) for i in range(k) for j in range(k))
    return 1 - observed / expected


def test_merge_adds_the_verdicts_and_reports_agreement():
    given = pd.DataFrame(
        [
            verdict(0, "agree", "A"),
            verdict(1, "disagree", "C"),
            verdict(2, "disagree", "B"),
            verdict(3, "agree", ""),  # agree without a category: the model's call is the reviewer's
            verdict(4, "disagree", ""),  # disagree, no category given: counted as not accepted, no kappa
        ]
    )
    merged, result = verdicts.merge(exam_table(), given)
    assert list(merged.columns) == [*exam_table().columns, *verdicts.MERGED_COLUMNS]
    assert merged["verdict"].tolist() == ["agree", "disagree", "disagree", "agree", "disagree", ""]
    assert merged["reviewer_density"].tolist() == ["A", "C", "B", "D", "", ""]
    assert (result.exams, result.reviewed, result.accepted, result.categorised) == (6, 5, 2, 4)
    assert result.dense_agree == 2  # A/A and D/D; B->C and C->B cross the dense line
    pairs = [("A", "A"), ("B", "C"), ("C", "B"), ("D", "D")]
    assert result.kappa("linear") == pytest.approx(linear_kappa(pairs))
    assert result.confusion.sum() == 4 and result.confusion[1, 2] == 1 and result.confusion[2, 1] == 1
    text = "\n".join(result.lines())
    assert "5 of 6 exams reviewed" in text and "accepted (agree): 2 of 5 (40.0%)" in text
    assert "dense/non-dense agreement: 2 of 4 (50.0%)" in text
    assert f"linear weights: {linear_kappa(pairs):.3f}" in text


def test_the_reviewer_is_merged_and_exports_without_the_column_still_merge(tmp_path):
    given = pd.DataFrame([verdict(0, "agree", "A", reviewer="Dr A"), verdict(1, "disagree", "C", reviewer="Dr B")])
    given = pd.concat([given, pd.DataFrame([verdict(2, "agree", "C", reviewer="Dr A")])], ignore_index=True)
    merged, result = verdicts.merge(exam_table(), given)
    assert merged["reviewer"].tolist() == ["Dr A", "Dr B", "Dr A", "", "", ""]
    assert "reviewed by Dr A (2), Dr B (1)" in result.lines()
    older = given.drop(columns=["reviewer"])  # exported before the page asked who reviews
    exam_csv, verdicts_csv, out = tmp_path / "preds.exam.csv", tmp_path / "verdicts.csv", tmp_path / "merged.csv"
    exam_table().to_csv(exam_csv, index=False)
    older.to_csv(verdicts_csv, index=False)
    outcome = CliRunner().invoke(verdicts_main, [str(exam_csv), str(verdicts_csv), "--out", str(out)])
    assert outcome.exit_code == 0, outcome.output
    assert "3 of 6 exams reviewed" in outcome.output and "reviewed by" not in outcome.output
    assert pd.read_csv(out, dtype=str, keep_default_na=False)["reviewer"].tolist() == [""] * 6


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (verdict(0, "agree", "A", exam="study_uid:9.9.9"), "no such exam"),
        (verdict(1, "agree", "B", model_density="C"), "the call 'C' (the CSV calls 'B')"),
        (verdict(2, "agree", "C", patient_id="someone else"), "patient_id 'someone else'"),
        (verdict(3, "maybe", "D"), "neither agree nor disagree"),
        (verdict(3, "disagree", "E"), "not one of A-D"),
        (verdict(3, "agree", "B"), "agrees with D but gives B"),
        (verdict(0, "agree", "C", model_density="B"), "the call 'B' (the CSV calls 'A')"),  # a repeat, refused too
    ],
)
def test_verdicts_that_fit_no_exam_are_errors_and_nothing_is_merged(tmp_path, bad, message):
    exam_csv, verdicts_csv, out = tmp_path / "preds.exam.csv", tmp_path / "verdicts.csv", tmp_path / "merged.csv"
    exam_table().to_csv(exam_csv, index=False)
    pd.DataFrame([verdict(0, "agree", "A"), bad]).to_csv(verdicts_csv, index=False)
    with pytest.raises(verdicts.VerdictsError, match=re.escape(message)):
        verdicts.run(verdicts.VerdictsConfig(exam_csv, verdicts_csv, out))
    assert not out.exists()
    result = CliRunner().invoke(verdicts_main, [str(exam_csv), str(verdicts_csv), "--out", str(out)])
    assert result.exit_code == 1 and "line 3" in result.output and "nothing was merged" in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_cli_reports_and_writes_the_merged_csv(tmp_path):
    exam_csv, verdicts_csv, out = tmp_path / "preds.exam.csv", tmp_path / "verdicts.csv", tmp_path / "merged.csv"
    exam_table().to_csv(exam_csv, index=False)
    pd.DataFrame([verdict(k, "agree", CALLS[k]) for k in range(3)]).to_csv(verdicts_csv, index=False)
    result = CliRunner().invoke(verdicts_main, [str(exam_csv), str(verdicts_csv), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "3 of 6 exams reviewed" in result.output and "accepted (agree): 3 of 3 (100.0%)" in result.output
    merged = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert merged[exams.EXAM].tolist() == exam_table()[exams.EXAM].tolist()
    assert merged["verdict"].tolist() == ["agree"] * 3 + [""] * 3
    missing = CliRunner().invoke(verdicts_main, [str(exam_csv), str(tmp_path / "none.csv")])
    assert missing.exit_code == 1 and "not found" in missing.output


# --- the round trip through the page ---------------------------------------------------------------


@pytest.fixture(scope="module")
def reviewed_run(tmp_path_factory, synthetic_cohort) -> dict:
    """dens-infer's outputs for a small cohort (resnet18 at S=64, random weights), with calls spread over
    A-D as a trained model would make them (each exam's probabilities set, the breast and exam CSVs
    written again by dens-infer's own aggregation), then dens-gradcam's review page over them."""
    from dens.artifact.model import build_model, save_checkpoint
    from dens.export.onnx import export_onnx
    from dens.flags import prediction_cells
    from dens.gradcam import run_gradcam
    from dens.infer import InferConfig
    from dens.infer import run as infer
    from dens.preds.aggregate import write_aggregates
    from dens.route.config import PreprocessConfig

    root = tmp_path_factory.mktemp("verdicts")
    torch.manual_seed(0)
    save_checkpoint(root / "best.pt", build_model("resnet18", weights=None), PreprocessConfig(size=64))
    export_onnx(root / "best.pt", root / "model.onnx")
    preds_csv = root / "out" / "preds.csv"
    infer(
        InferConfig(
            studies=synthetic_cohort(4, seed=7),
            out=preds_csv,
            model=root / "model.onnx",
            device="cpu",
            workers=1,
            progress=False,
        )
    )
    with open(preds_csv, newline="") as f:
        header, *rows = list(csv.reader(f))
    col = {name: k for k, name in enumerate(header)}
    study_order = sorted({r[col[labels.STUDY_UID]] for r in rows if r[col[labels.STATUS]] == "ok"})
    assert len(study_order) >= 4
    for r in rows:
        if r[col[labels.STATUS]] != "ok":
            continue
        k = study_order.index(r[col[labels.STUDY_UID]]) % 4
        probs = np.full(4, 0.1)
        probs[k] = 0.7
        for name, value in prediction_cells(probs).items():
            r[col[name]] = value
    with open(preds_csv, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([header, *rows])
    write_aggregates(preds_csv)
    run_gradcam(preds_csv, root / "out" / "cams", model_path=root / "model.onnx", progress=False, workers=1)
    return {"preds_csv": preds_csv, "exam_csv": exams.aggregate_paths(preds_csv)[1], "root": root}


@pytest.mark.skipif(CHROMIUM is None, reason=MISSING)
def test_verdicts_marked_in_the_page_come_back_as_data(reviewed_run, tmp_path):
    exam_table = pd.read_csv(reviewed_run["exam_csv"], dtype=str, keep_default_na=False)
    calls = dict(zip(exam_table[exams.EXAM], exam_table[labels.DENSITY], strict=True))
    assert len(set(calls.values())) == 4  # every category among the model's calls
    page = report.report_path(reviewed_run["preds_csv"])
    moved = tmp_path / "mailed" / "report.html"  # the page alone, as a reviewer receives it
    moved.parent.mkdir()
    shutil.copy(page, moved)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    keys = sorted(calls)
    # What the reviewer does: agree with two calls, disagree with one giving a category, pick a category
    # alone on another (one step denser), and leave the rest.
    denser = {"A": "B", "B": "C", "C": "D", "D": "C"}
    marks = [(keys[0], "agree", None), (keys[1], "agree", None), (keys[2], "disagree", denser[calls[keys[2]]])]
    marks.append((keys[3], None, denser[calls[keys[3]]]))

    def row(key: str) -> str:
        return f'#exams tr[data-exam="{key}"]'

    with Browser(tmp_path / "profile", downloads) as browser:
        browser.open(moved.as_uri())
        browser.click("#reviewer")
        browser.call("Input.insertText", text="Dr A. Reader")
        for key, what, category in marks:
            if what:
                browser.click(f'{row(key)} button[data-verdict="{what}"]')
            if category:
                browser.click(f'{row(key)} button[data-category="{category}"]')
        browser.reload()  # the verdicts live in localStorage under the page's run: a reload keeps them
        pressed = browser.evaluate(
            "Array.from(document.querySelectorAll('#exams tr.reviewed')).map(r => r.dataset.exam).sort()"
        )
        assert pressed == sorted(keys[:4])
        assert "4 of" in browser.evaluate("document.getElementById('reviewed').textContent")
        name = browser.download("#export")
    exported = downloads / name
    assert exported.is_file() and name.startswith("verdicts-")
    table = pd.read_csv(exported, dtype=str, keep_default_na=False)
    assert list(table.columns) == list(VERDICT_COLUMNS) and len(table) == 4
    assert (table["reviewer"] == "Dr A. Reader").all()  # who reviewed, on every verdict

    out = tmp_path / "merged.csv"
    result = CliRunner().invoke(verdicts_main, [str(reviewed_run["exam_csv"]), str(exported), "--out", str(out)])
    assert result.exit_code == 0, result.output
    merged = pd.read_csv(out, dtype=str, keep_default_na=False).set_index(exams.EXAM)
    expected = {keys[0]: calls[keys[0]], keys[1]: calls[keys[1]]}
    expected |= {keys[2]: denser[calls[keys[2]]], keys[3]: denser[calls[keys[3]]]}
    assert merged["reviewer_density"].to_dict() == {k: expected.get(k, "") for k in merged.index}
    assert merged.loc[keys[3], "verdict"] == "disagree"  # a category other than the call is a disagreement
    assert merged["reviewer"].to_dict() == {k: "Dr A. Reader" if k in keys[:4] else "" for k in merged.index}
    assert "reviewed by Dr A. Reader (4)" in result.output
    pairs = [(calls[k], expected[k]) for k in keys[:4]]
    dense_same = sum(labels.is_dense(a) == labels.is_dense(b) for a, b in pairs)
    assert f"{len(keys[:4])} of {len(calls)} exams reviewed" in result.output
    assert "accepted (agree): 2 of 4 (50.0%)" in result.output
    assert f"dense/non-dense agreement: {dense_same} of 4" in result.output
    assert f"linear weights: {linear_kappa(pairs):.3f}" in result.output


def test_kappa_matches_a_textbook_value_and_is_undefined_without_pairs():
    """Unweighted kappa is (p_o - p_e) / (1 - p_e) from its definition; perfect agreement is 1; no pairs, NaN.
    dens-verdicts and dens-train share this function (dens.agreement)."""
    from dens.agreement import weighted_kappa

    cm = np.array([[44, 5, 1], [7, 20, 3], [9, 5, 6]])
    p_o = np.trace(cm) / cm.sum()
    p_e = (cm.sum(0) * cm.sum(1)).sum() / cm.sum() ** 2
    assert weighted_kappa(cm, None) == pytest.approx((p_o - p_e) / (1 - p_e))
    assert weighted_kappa(np.eye(4) * 3, "linear") == pytest.approx(1.0)
    assert np.isnan(weighted_kappa(np.zeros((4, 4))))
