"""dens.figures.evaluation: the levels are dens-infer's, the ROC agrees with scikit-learn, and the bootstrap
resamples patients, narrows as the test set grows and reports per site."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from dens import exams, labels
from dens.figures import evaluation, metrics

RNG = np.random.default_rng(11)


def _cohort(patients: int, views: int = 4, seed: int = 0, noise: float = 1.5) -> tuple[pd.DataFrame, np.ndarray]:
    """``patients`` women with one density each and ``views`` images (both breasts, CC and MLO), and logits
    that carry the density through noise; returns the images and their logits (labels in ``density``)."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        density = int(rng.choice(4, p=[0.1, 0.4, 0.4, 0.1]))
        for v in range(views):
            side, view = "LR"[v // 2 % 2], ("CC", "MLO")[v % 2]
            rows.append(
                {
                    labels.PATH: f"/d/{p}/{v}.dcm",
                    labels.PATIENT_ID: f"P{p}",
                    labels.STUDY_UID: f"S{p}",
                    labels.LATERALITY: side,
                    labels.VIEW: view,
                    "site_id": str(p % 2 + 1),
                    "y": density,
                }
            )
    images = pd.DataFrame(rows)
    logits = np.eye(4)[images["y"]] * 2.0 + rng.normal(0, noise, (len(images), 4))
    return images, logits


def _preds(images: pd.DataFrame, probs: np.ndarray) -> pd.DataFrame:
    """preds.csv's ok rows for these images and probabilities, as dens-infer writes them (strings)."""
    cells = {c: [f"{p:.6f}" for p in probs[:, k]] for k, c in enumerate(labels.PROB_COLUMNS)}
    return images.drop(columns=["y", "site_id"], errors="ignore").assign(
        **{labels.STATUS: "ok", labels.MODEL_SHA256: "f" * 64}, **cells
    )


def test_a_breast_is_the_mean_of_its_views_and_its_most_common_label():
    images = pd.DataFrame(
        {
            labels.PATIENT_ID: ["1", "1", "1", "1", "2"],
            labels.STUDY_UID: ["s", "s", "s", "s", "t"],
            labels.LATERALITY: ["L", "L", "R", "R", "L"],
        }
    )
    probs = np.array([[0.8, 0.2, 0, 0], [0.4, 0.6, 0, 0], [0, 0, 1, 0], [0, 0, 0.5, 0.5], [0, 0, 0, 1]])
    breast = evaluation.levels(images, probs, np.array([0, 1, 2, 2, 3]))["breast"]
    np.testing.assert_allclose(breast.probs, [[0.6, 0.4, 0, 0], [0, 0, 0.75, 0.25], [0, 0, 0, 1]])
    np.testing.assert_array_equal(breast.y, [0, 2, 3])  # a 0/1 tie goes to the lower class
    np.testing.assert_array_equal(breast.patient, [0, 0, 1])


def test_breasts_and_exams_are_those_of_dens_infers_csvs():
    # A study UID decides (two patient IDs in one study: one exam); without one, the accession, then the
    # patient; without any, each file is its own exam.
    images = pd.DataFrame(
        {
            labels.PATH: [f"/d/{i}.dcm" for i in range(9)],
            labels.PATIENT_ID: ["P1", "P1-typo", "P1", "P2", "P2", "P3", "P3", "", ""],
            labels.ACCESSION: ["", "", "", "A2", "A2", "", "", "", ""],
            labels.STUDY_UID: ["S1", "S1", "S1", "", "", "", "", "", ""],
            labels.LATERALITY: ["L", "L", "R", "R", "R", "L", "L", "L", "L"],
            labels.VIEW: ["CC", "MLO", "CC", "CC", "MLO", "CC", "MLO", "CC", "CC"],
        }
    )
    probs = RNG.dirichlet(np.ones(4), size=len(images))
    by_level = evaluation.levels(images, probs, np.zeros(len(images), np.int64))
    preds = _preds(images, probs)
    breasts = exams.breasts(preds)  # what dens-infer writes to preds.breast.csv
    assert list(zip(breasts[exams.EXAM], breasts[labels.LATERALITY], breasts[exams.N_IMAGES], strict=True)) == [
        ("accession:A2", "R", "2"),
        ("path:/d/7.dcm", "L", "1"),
        ("path:/d/8.dcm", "L", "1"),
        ("patient_id:P3", "L", "2"),
        ("study_uid:S1", "L", "2"),
        ("study_uid:S1", "R", "1"),
    ]
    np.testing.assert_allclose(by_level["breast"].probs, breasts[list(labels.PROB_COLUMNS)].astype(float), atol=1e-6)
    exam_rows = exams.exam_calls(preds)  # preds.exam.csv
    np.testing.assert_allclose(by_level["exam"].probs, exam_rows[list(labels.PROB_COLUMNS)].astype(float), atol=1e-6)


def test_an_exams_density_is_its_denser_breasts():
    images, logits = _cohort(30)
    y = images["y"].to_numpy().copy()
    y[images[labels.LATERALITY].eq("L").to_numpy() & (np.arange(len(y)) % 8 < 2)] = 0  # some left breasts fatty
    by_level = evaluation.levels(images, logits, y)
    breast_y = by_level["breast"].y.reshape(-1, 2)  # each exam: its L and R breasts, in key order
    np.testing.assert_array_equal(by_level["exam"].y, breast_y.max(1))


def test_roc_auc_agrees_with_scikit_learn_ties_and_weights_included():
    truth = RNG.random(300) < 0.4
    score = np.round(RNG.random(300) * 0.5 + truth * 0.3, 1)  # rounded: many ties
    weight = RNG.integers(0, 4, 300).astype(float)
    assert evaluation.roc_auc(truth, score) == pytest.approx(skm.roc_auc_score(truth, score))
    assert evaluation.roc_auc(truth, score, weight) == pytest.approx(
        skm.roc_auc_score(truth, score, sample_weight=weight)
    )
    np.testing.assert_allclose(
        evaluation._auc_weighted(truth, score, np.stack([weight, np.ones(300)])),
        [skm.roc_auc_score(truth, score, sample_weight=weight), skm.roc_auc_score(truth, score)],
    )
    fpr, tpr = evaluation.roc_curve(truth, score)
    sk_fpr, sk_tpr, _ = skm.roc_curve(truth, score, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)


def test_the_headline_of_a_stack_of_confusion_matrices_is_each_ones():
    cms = np.stack([metrics.confusion(RNG.integers(0, 4, 50), RNG.integers(0, 3, 50)) for _ in range(5)])
    stacked = metrics.headline(cms)
    for i, cm in enumerate(cms):
        one = metrics.class_metrics(cm)
        for name, values in stacked.items():
            assert values[i] == pytest.approx(one[name]), name


def test_the_interval_narrows_as_the_test_set_grows():
    widths = []
    for patients in (25, 100, 400):
        images, logits = _cohort(patients, seed=patients)
        report = evaluation.report(images, logits, images["y"].to_numpy(), resamples=400, groups=False)
        for level in evaluation.LEVELS:
            low, high = report[level]["ci"]["kappa_quadratic"]
            assert low <= report[level]["kappa_quadratic"] <= high
        widths.append([np.subtract(*report["exam"]["ci"][f][::-1]) for f in ("kappa_quadratic", "dense_auc")])
    widths = np.array(widths)
    assert (widths[1:] < widths[:-1]).all(), widths
    assert (widths[-1] < 0.6 * widths[0]).all(), widths  # 16x the patients: about a quarter of the width


def test_the_bootstrap_resamples_patients_not_images():
    # Four copies of each patient's one image carry no more information than the one image: resampling
    # patients gives the same interval for both, where resampling images would narrow it about twofold.
    images, logits = _cohort(60, views=1, seed=3)
    copied = images.loc[images.index.repeat(4)].reset_index(drop=True)
    copied[labels.LATERALITY] = np.tile(["L", "L", "R", "R"], len(images))
    y, y4 = images["y"].to_numpy(), copied["y"].to_numpy()
    one = evaluation.report(images, logits, y, resamples=300, groups=False)["image"]["ci"]
    four = evaluation.report(copied, np.repeat(logits, 4, axis=0), y4, resamples=300, groups=False)["image"]["ci"]
    for figure in ("accuracy", "kappa_quadratic", "dense_auc"):
        assert four[figure] == pytest.approx(one[figure]), figure


def test_figures_per_site_are_the_figures_of_its_images():
    images, logits = _cohort(40, seed=9)
    y = images["y"].to_numpy()
    report = evaluation.report(images, logits, y, resamples=50)
    assert list(report["by"]["site_id"]) == ["1", "2"]
    for site, figures in report["by"]["site_id"].items():
        mine = (images["site_id"] == site).to_numpy()
        alone = evaluation.report(images[mine], logits[mine], y[mine], resamples=50, groups=False)
        assert figures["exam"]["kappa_quadratic"] == pytest.approx(alone["exam"]["kappa_quadratic"])
        assert figures["image"]["n"] == mine.sum() and figures["bootstrap"]["patients"] == 20
    assert "by" in report and "site_id" not in evaluation.report(images.drop(columns="site_id"), logits, y, 10)["by"]


def test_undefined_figures_have_no_interval():
    images, logits = _cohort(10, seed=1)
    y = np.ones(len(images), np.int64)  # no dense case at all: no dense sensitivity, no AUC
    ci = evaluation.report(images, logits, y, resamples=50, groups=False)["image"]["ci"]
    assert ci["dense_sensitivity"] == [None, None] and ci["dense_auc"] == [None, None]
    assert ci["dense_specificity"][0] is not None
