"""dens.figures.metrics: every figure agrees with scikit-learn (or with a hand count) on fixed inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from dens import labels
from dens.figures import metrics
from dens.figures.metrics import softmax
from dens.flags import prediction_cells

RNG = np.random.default_rng(7)
Y_TRUE = RNG.choice(4, size=300, p=[0.1, 0.4, 0.4, 0.1])
# Predictions near the truth, with ordinal slips and no prediction of class 3 at all.
Y_PRED = np.clip(Y_TRUE + RNG.choice([-2, -1, 0, 0, 0, 1], size=300), 0, 2)


def _probs(y_pred: np.ndarray, confidence: float = 0.7) -> np.ndarray:
    probs = np.full((len(y_pred), 4), (1 - confidence) / 3)
    probs[np.arange(len(y_pred)), y_pred] = confidence
    return probs


def test_class_metrics_agree_with_scikit_learn():
    cm = metrics.confusion(Y_TRUE, Y_PRED)
    np.testing.assert_array_equal(cm, skm.confusion_matrix(Y_TRUE, Y_PRED, labels=range(4)))
    got = metrics.class_metrics(cm)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(Y_TRUE, Y_PRED))
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(Y_TRUE, Y_PRED))
    assert got["macro_f1"] == pytest.approx(skm.f1_score(Y_TRUE, Y_PRED, average="macro", zero_division=0))
    for weights in ("linear", "quadratic"):
        assert got[f"kappa_{weights}"] == pytest.approx(skm.cohen_kappa_score(Y_TRUE, Y_PRED, weights=weights))
    assert metrics.weighted_kappa(cm, None) == pytest.approx(skm.cohen_kappa_score(Y_TRUE, Y_PRED))
    recall = skm.recall_score(Y_TRUE, Y_PRED, labels=range(4), average=None, zero_division=0)
    for i, c in enumerate("ABCD"):
        # Specificity of class i is the recall of "not i".
        specificity = skm.recall_score(i != Y_TRUE, i != Y_PRED)
        assert got["per_class"][c]["sensitivity"] == pytest.approx(recall[i])
        assert got["per_class"][c]["specificity"] == pytest.approx(specificity)
        assert got["per_class"][c]["support"] == int((i == Y_TRUE).sum())


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_a_class_absent_from_the_truth_is_left_out_like_scikit_learn():
    y_true, y_pred = np.array([0, 1, 1, 2, 2, 2]), np.array([0, 1, 2, 2, 2, 3])
    got = metrics.class_metrics(metrics.confusion(y_true, y_pred))
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y_true, y_pred))
    assert got["macro_f1"] == pytest.approx(skm.f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert np.isnan(got["per_class"]["D"]["sensitivity"])


def test_dense_figures_follow_the_density_call_as_dens_infer_does():
    y = np.array([0, 1, 2, 3, 2, 1])
    probs = np.array(
        [
            [0.7, 0.2, 0.05, 0.05],  # not dense, right
            [0.1, 0.45, 0.3, 0.15],  # not dense, right
            [0.1, 0.35, 0.3, 0.25],  # called B although p_dense is 0.55: dense missed, as preds.csv says
            [0.0, 0.1, 0.1, 0.8],  # dense, right
            [0.2, 0.6, 0.1, 0.1],  # dense missed
            [0.0, 0.3, 0.6, 0.1],  # not dense called dense
        ]
    )
    dense = metrics.evaluate(probs, y)["dense"]
    assert dense == {
        "n": 6,
        "positives": 3,
        "accuracy": pytest.approx(3 / 6),
        "sensitivity": pytest.approx(1 / 3),
        "specificity": pytest.approx(2 / 3),
    }
    called = [prediction_cells(p)[labels.DENSE] == "true" for p in probs]  # dens-infer's own column
    assert called == [False, False, False, True, False, True]


def test_evaluate_holds_both_confusion_matrices_and_is_strict_json():
    got = metrics.jsonable(metrics.evaluate(_probs(Y_PRED), Y_TRUE))
    assert np.array(got["confusion"]).sum() == len(Y_TRUE)
    normalised = np.array(got["confusion_normalised"])
    np.testing.assert_allclose(normalised.sum(1), 1.0, atol=1e-3)
    assert got["per_class"]["D"]["precision"] is None  # D never predicted: NaN became null
    json.loads(json.dumps(got, allow_nan=False))


def test_ece_by_hand():
    # Two bins: confidence 0.9 with 50% right (gap 0.4) and confidence 0.6 with 100% right (gap 0.4).
    probs = np.array([[0.9, 0.1, 0, 0], [0.9, 0.1, 0, 0], [0.6, 0.4, 0, 0], [0.6, 0.4, 0, 0]])
    y = np.array([0, 1, 0, 0])
    assert metrics.ece(probs, y) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    assert metrics.ece(_probs(np.array([0, 1, 2, 3]), 1.0), np.array([0, 1, 2, 3])) == pytest.approx(0.0)


@pytest.mark.parametrize("sharpen", [4.0, 0.3])
def test_temperature_scaling_fixes_a_miscalibrated_model(sharpen):
    rng = np.random.default_rng(0)
    calibrated = rng.normal(0, 1.5, (4000, 4))
    # Labels drawn from softmax(calibrated): those logits are calibrated by construction, T = 1 is right.
    p = softmax(calibrated)
    y = (rng.random(4000)[:, None] > p.cumsum(1)).sum(1)
    logits = calibrated * sharpen  # overconfident (x4) or underconfident (x0.3)
    t, at_bound = metrics.fit_temperature(logits, y)
    assert t == pytest.approx(sharpen, rel=0.15) and not at_bound
    cal = metrics.calibration(logits, y, t)
    assert cal["nll_after"] < cal["nll_before"] - 0.05
    assert cal["ece_after"] < cal["ece_before"]
    # Temperature never changes the predicted class.
    np.testing.assert_array_equal(softmax(logits, t).argmax(1), logits.argmax(1))


def _miscalibrated(n: int, sharpen: float = 4.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits ``sharpen`` times too confident, and labels drawn from the calibrated ones."""
    rng = np.random.default_rng(seed)
    calibrated = rng.normal(0, 1.5, (n, 4))
    y = (rng.random(n)[:, None] > softmax(calibrated).cumsum(1)).sum(1)
    return calibrated * sharpen, y


def test_a_temperature_that_lowers_validation_nll_is_kept():
    logits, y = _miscalibrated(400)
    choice = metrics.choose_temperature(logits, y)
    assert choice["kept"] and choice["temperature"] == choice["fitted"] == pytest.approx(4.0, rel=0.3)
    assert metrics.nll(softmax(logits, choice["temperature"]), y) < metrics.nll(softmax(logits), y)
    assert "lowers the validation NLL" in choice["reason"]


def test_a_temperature_is_kept_only_when_it_helps_patients_it_was_not_fitted_on():
    """Half the patients' logits are too confident, half too timid: one T fitted on all of them lowers their
    NLL a little, but each half's T makes the other half worse, so no temperature ships."""
    sharp, y_sharp = _miscalibrated(200, sharpen=4.0, seed=1)
    timid, y_timid = _miscalibrated(200, sharpen=0.25, seed=2)
    logits, y = np.vstack([sharp, timid]), np.concatenate([y_sharp, y_timid])
    patients = [f"p{i:03d}" for i in range(200)]  # sorted patients alternate between the two halves
    groups = [patients[2 * (i // 2) + 0] for i in range(200)] + [patients[2 * (i // 2) + 1] for i in range(200)]
    choice = metrics.choose_temperature(logits, y, groups)
    assert choice["fitted"] is not None and not choice["kept"] and choice["temperature"] == 1.0
    assert "not on images it was not fitted on" in choice["reason"], choice["reason"]
    cross = choice["cross_fit"]
    assert cross["nll_after"] >= cross["nll_before"]
    assert cross["temperatures"][0] < 1 < cross["temperatures"][1]  # each half's T, fitted on the other half
    # The same images with one calibration error throughout: the check passes and the temperature ships.
    kept = metrics.choose_temperature(*_miscalibrated(400), [f"p{i // 4}" for i in range(400)])
    assert kept["kept"] and kept["cross_fit"]["nll_after"] < kept["cross_fit"]["nll_before"]


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("few images", "validation has 29 images; fitting a temperature needs at least 30"),
        ("one class", "validation has 1 class(es); fitting a temperature needs at least 2"),
        ("all right", "the fit hit the bound T = 0.05 of [0.05, 20]: every validation image is predicted right"),
        ("all wrong", "the fit hit the bound T = 20 of [0.05, 20]: the logits carry no useful signal"),
        ("no better", "does not lower the validation NLL"),
    ],
)
def test_otherwise_the_temperature_is_one_and_the_reason_recorded(case, reason):
    logits, y = _miscalibrated(400)
    if case == "few images":
        logits, y = logits[: metrics.MIN_CALIBRATION_IMAGES - 1], y[: metrics.MIN_CALIBRATION_IMAGES - 1]
    elif case == "one class":
        y = np.zeros(len(y), np.int64)
    elif case == "all right":  # the true class always ahead by 5: the NLL falls for ever as T -> 0
        logits = np.eye(4)[y] * 5.0
    elif case == "all wrong":  # the true class always behind: the uniform guess (T -> infinity) is best
        logits = -np.eye(4)[y] * 5.0
    elif case == "no better":  # logits without signal: every T gives the same NLL, none lowers it
        logits = np.zeros((400, 4))
    choice = metrics.choose_temperature(logits, y)
    assert (choice["fitted"] is None) == (case != "no better")  # a fit tried inside the bounds is recorded
    assert choice["temperature"] == 1.0 and not choice["kept"]
    assert reason in choice["reason"], choice["reason"]
    if case in ("all right", "all wrong"):  # the fit really ends at the bound: the NLL still falls there
        t, at_bound = metrics.fit_temperature(logits, y)
        assert at_bound and t in metrics.TEMPERATURE_BOUNDS


def test_table_lists_the_headline_figures():
    result = metrics.evaluate(_probs(Y_PRED), Y_TRUE)
    text = metrics.table({"image": result, "breast": result})
    assert "kappa quadratic" in text and f"{result['kappa_quadratic']:.3f}" in text
    assert text.splitlines()[-1].split()[-1] == str(len(Y_TRUE))
