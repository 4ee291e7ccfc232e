"""Every figure dens-train and dens-eval report, computed from labels and probabilities with numpy.

One confusion matrix feeds all the class metrics, so they cannot disagree with each other; the tests hold
them equal to scikit-learn's on fixed inputs. Dense-vs-not is the density call's (the argmax is C or D),
the rule behind dens-infer's ``dense`` column and its default flag, so the training figures describe what a
deployed model calls dense. The levels (image, breast, exam), their intervals and the per-site figures are
:mod:`dens.figures.evaluation`'s.
Temperature scaling (Guo et al. 2017) is fitted on validation logits, kept only when it lowers their NLL
(:func:`choose_temperature`), and stored in the checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from dens.agreement import confusion, ratio, weighted_kappa
from dens.labels import CLASSES, DENSE_CLASSES

NUM = len(CLASSES)
DENSE_INDEX = [CLASSES.index(c) for c in DENSE_CLASSES]
ECE_BINS = 15
# Calibration: a temperature is fitted only on a validation split this big, and only within these bounds.
MIN_CALIBRATION_IMAGES = 30
MIN_CALIBRATION_CLASSES = 2
TEMPERATURE_BOUNDS = (0.05, 20.0)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """The model's probabilities from its logits ``[N, classes]``: ``softmax(logits / temperature)`` in
    float64, the reference that training's figures use and the exported graph's ``probs`` is held to."""
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _div(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def headline(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, balanced accuracy, macro-F1 and the linear and quadratic kappas of a confusion matrix
    [K, K], or of each of a stack [..., K, K] (a bootstrap's draws): arrays of the leading shape.

    Balanced accuracy and macro-F1 average over the classes present in the truth (scikit-learn's choice
    for balanced accuracy; for F1 a class absent from truth and predictions would otherwise count as 0).
    """
    cm = np.asarray(cm, np.float64)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    support, predicted = cm.sum(-1), cm.sum(-2)
    present = support > 0
    recall, precision = ratio(tp, support, 0.0), ratio(tp, predicted, 0.0)
    f1 = ratio(2 * precision * recall, precision + recall, 0.0)
    counted = present | (predicted > 0)  # sklearn's macro-F1 averages over labels seen in truth or predictions
    return {
        "accuracy": ratio(tp.sum(-1), cm.sum((-2, -1))),
        "balanced_accuracy": ratio((recall * present).sum(-1), present.sum(-1)),
        "macro_f1": ratio((f1 * counted).sum(-1), counted.sum(-1)),
        "kappa_linear": np.asarray(weighted_kappa(cm, "linear")),
        "kappa_quadratic": np.asarray(weighted_kappa(cm, "quadratic")),
    }


def class_metrics(cm: np.ndarray) -> dict:
    """:func:`headline`'s figures and per-class support, sensitivity, specificity, precision and F1 of one
    confusion matrix ``cm`` (rows: truth)."""
    cm = np.asarray(cm, np.int64)
    n = int(cm.sum())
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(1).astype(np.float64), cm.sum(0).astype(np.float64)
    recall, precision = ratio(tp, support), ratio(tp, predicted)
    f1 = ratio(2 * np.nan_to_num(precision) * np.nan_to_num(recall), np.nan_to_num(precision + recall), 0.0)
    specificity = ratio(n - support - predicted + tp, n - support)
    per_class = {
        c: {
            "support": int(support[i]),
            "sensitivity": float(recall[i]),
            "specificity": float(specificity[i]),
            "precision": float(precision[i]),
            "f1": float(f1[i]),
        }
        for i, c in enumerate(CLASSES[: cm.shape[0]])
    }
    return {"n": n, **{name: float(value) for name, value in headline(cm).items()}, "per_class": per_class}


def binary_metrics(truth: np.ndarray, flagged: np.ndarray) -> dict:
    """Accuracy, sensitivity and specificity of boolean flags against boolean truth."""
    truth, flagged = np.asarray(truth, bool), np.asarray(flagged, bool)
    tp, tn = int((truth & flagged).sum()), int((~truth & ~flagged).sum())
    pos, neg = int(truth.sum()), int((~truth).sum())
    return {
        "n": len(truth),
        "positives": pos,
        "accuracy": _div(tp + tn, len(truth)),
        "sensitivity": _div(tp, pos),
        "specificity": _div(tn, neg),
    }


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class."""
    p = np.clip(np.asarray(probs, np.float64)[np.arange(len(y)), np.asarray(y)], 1e-12, 1.0)
    return float(-np.log(p).mean()) if len(y) else float("nan")


def ece(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: |accuracy - confidence| of the top class, weighted over equal-width bins."""
    probs, y = np.asarray(probs, np.float64), np.asarray(y)
    if not len(y):
        return float("nan")
    confidence, predicted = probs.max(1), probs.argmax(1)
    correct = (predicted == y).astype(np.float64)
    # Bin i holds confidences in (i/bins, (i+1)/bins]; confidence is always > 1/K > 0.
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        sel = index == b
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - confidence[sel].mean())
    return float(total)


def evaluate(probs: np.ndarray, y: np.ndarray) -> dict:
    """Every figure for one set of predictions: class metrics, dense-vs-not, confusion matrices, NLL, ECE."""
    probs, y = np.asarray(probs, np.float64), np.asarray(y, np.int64)
    cm = confusion(y, probs.argmax(1) if len(y) else y)
    out = class_metrics(cm)
    called = np.isin(probs.argmax(1), DENSE_INDEX) if len(y) else np.zeros(0, bool)
    out["dense"] = binary_metrics(np.isin(y, DENSE_INDEX), called)
    out["confusion"] = cm.tolist()
    rows = cm.sum(1, keepdims=True)
    out["confusion_normalised"] = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0).round(4).tolist()
    out["nll"] = nll(probs, y)
    out["ece"] = ece(probs, y)
    return out


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> tuple[float, bool]:
    """The temperature T within ``TEMPERATURE_BOUNDS`` that minimises the NLL of ``softmax(logits / T)``,
    and whether the NLL still falls at the bound it returns (the true minimum lies at or beyond it).

    The NLL is convex in 1/T, so its slope in 1/T rises monotonically: the minimum is where the slope
    crosses zero, found by bisection on log(1/T), and a slope of one sign across the whole range means the
    minimum is out of range. No clamp hides that: the caller learns it hit a bound.
    """
    z, y = np.asarray(logits, np.float64), np.asarray(y, np.int64)
    if not len(y):
        return 1.0, False
    margin = z - z[np.arange(len(y)), y][:, None]  # z_k - z_true: summed with p_k, tiny p_k still count

    def slope(inverse_t: float) -> float:  # d NLL / d(1/T)
        return float((softmax(z, 1.0 / inverse_t) * margin).sum(1).mean())

    t_low, t_high = TEMPERATURE_BOUNDS
    if slope(1.0 / t_low) < 0:  # still falling at the smallest T: every image right by a wide margin
        return t_low, True
    if slope(1.0 / t_high) > 0:  # still falling at the largest T: the logits carry no useful signal
        return t_high, True
    lo, hi = -math.log(t_high), -math.log(t_low)  # log(1/T)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if slope(math.exp(mid)) > 0 else (mid, hi)
    return float(math.exp(-(lo + hi) / 2)), False


def choose_temperature(logits: np.ndarray, y: np.ndarray, groups: Sequence | None = None) -> dict:
    """The temperature a model ships with, and why: fitted on validation (:func:`fit_temperature`) only when
    validation has at least ``MIN_CALIBRATION_IMAGES`` images of at least ``MIN_CALIBRATION_CLASSES``
    classes, and kept only when the fit stays inside ``TEMPERATURE_BOUNDS``, lowers the validation NLL, and
    lowers it on images it was not fitted on as well (:func:`cross_fitted_nll`: two halves of the validation
    split, by patient when ``groups`` gives each image's patient, each scored with the temperature fitted on
    the other); otherwise 1.0 (the logits as trained). Returns ``{"temperature", "fitted", "kept", "reason",
    "cross_fit"}`` (``fitted``: the fit's value, None when no fit was tried or it hit a bound), so calibration
    is not kept on the strength of fitting its own split, and never clamps silently."""
    y = np.asarray(y, np.int64)
    n, present = len(y), len(np.unique(y))
    out = {"temperature": 1.0, "fitted": None, "kept": False}
    if n < MIN_CALIBRATION_IMAGES:
        return {
            **out,
            "reason": f"validation has {n} images; fitting a temperature needs at least {MIN_CALIBRATION_IMAGES}",
        }
    if present < MIN_CALIBRATION_CLASSES:
        return {
            **out,
            "reason": f"validation has {present} class(es); "
            f"fitting a temperature needs at least {MIN_CALIBRATION_CLASSES}",
        }
    t, at_bound = fit_temperature(logits, y)
    if at_bound:
        why = (
            "every validation image is predicted right by a wide margin, so the NLL falls for ever as T -> 0"
            if t == TEMPERATURE_BOUNDS[0]
            else "the logits carry no useful signal on validation, so the NLL falls for ever as T grows"
        )
        low, high = TEMPERATURE_BOUNDS
        return {**out, "reason": f"the fit hit the bound T = {t:g} of [{low:g}, {high:g}]: {why}"}
    out["fitted"] = t
    before, after = nll(softmax(logits), y), nll(softmax(logits, t), y)
    if not after < before:
        return {**out, "reason": f"T = {t:.4g} does not lower the validation NLL ({before:.4f} -> {after:.4f})"}
    cross = cross_fitted_nll(logits, y, groups)
    out["cross_fit"] = cross
    if not cross["nll_after"] < cross["nll_before"]:
        return {
            **out,
            "reason": f"T = {t:.4g} lowers the validation NLL ({before:.4f} -> {after:.4f}) but not on images it was "
            f"not fitted on (two halves of validation, each with the other's T: {cross['nll_before']:.4f} -> "
            f"{cross['nll_after']:.4f})",
        }
    return {
        **out,
        "temperature": t,
        "kept": True,
        "reason": f"T = {t:.4g} lowers the validation NLL from {before:.4f} to {after:.4f}, and from "
        f"{cross['nll_before']:.4f} to {cross['nll_after']:.4f} on images it was not fitted on",
    }


def cross_fitted_nll(logits: np.ndarray, y: np.ndarray, groups: Sequence | None = None) -> dict:
    """The validation NLL without and with a temperature on images it was not fitted on: validation split into
    two halves (by group, i.e. patient, where ``groups`` is given: every image of a patient in one half;
    alternating otherwise), each half scored with the temperature fitted on the other. Returns ``{"nll_before",
    "nll_after", "temperatures"}`` (NLLs over all images)."""
    z, y = np.asarray(logits, np.float64), np.asarray(y, np.int64)
    if groups is None:
        half = np.arange(len(y)) % 2
    else:
        keys = np.asarray([str(g) for g in groups])
        order = {g: i % 2 for i, g in enumerate(sorted(set(keys)))}
        half = np.asarray([order[g] for g in keys])
    losses_before, losses_after, temperatures = [], [], []
    for h in (0, 1):
        fit, score = half != h, half == h
        t = fit_temperature(z[fit], y[fit])[0] if fit.any() else 1.0
        temperatures.append(t)
        for losses, temperature in ((losses_before, 1.0), (losses_after, t)):
            p = softmax(z[score], temperature)[np.arange(int(score.sum())), y[score]]
            losses.append(-np.log(np.clip(p, 1e-12, 1.0)))
    return {
        "nll_before": float(np.concatenate(losses_before).mean()),
        "nll_after": float(np.concatenate(losses_after).mean()),
        "temperatures": temperatures,
    }


def calibration(logits: np.ndarray, y: np.ndarray, temperature: float) -> dict:
    """NLL and ECE before and after dividing the logits by ``temperature``."""
    before, after = softmax(logits), softmax(logits, temperature)
    return {
        "temperature": temperature,
        "nll_before": nll(before, y),
        "nll_after": nll(after, y),
        "ece_before": ece(before, y),
        "ece_after": ece(after, y),
    }


def jsonable(value):
    """NaN/inf -> None and numpy scalars -> Python, recursively, so metrics.json is strict JSON."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def table(results: dict[str, dict]) -> str:
    """A short fixed-width table of the headline figures, one column per result (e.g. image, breast)."""
    rows = [
        ("accuracy", "accuracy"),
        ("balanced acc", "balanced_accuracy"),
        ("macro-F1", "macro_f1"),
        ("kappa linear", "kappa_linear"),
        ("kappa quadratic", "kappa_quadratic"),
    ]
    names = list(results)
    lines = [f"{'':<18}" + "".join(f"{n:>10}" for n in names)]
    for label, key in rows:
        lines.append(f"{label:<18}" + "".join(f"{fmt(results[n].get(key)):>10}" for n in names))
    for key in ("accuracy", "sensitivity", "specificity", "auc"):
        cells = "".join(f"{fmt(results[n]['dense'].get(key)):>10}" for n in names)
        lines.append(f"{'dense ' + key[:4] + '.':<18}" + cells)
    for c in CLASSES:
        cells = "".join(f"{fmt(results[n]['per_class'][c]['sensitivity']):>10}" for n in names)
        lines.append(f"{'sensitivity ' + c:<18}" + cells)
    lines.append(f"{'n':<18}" + "".join(f"{results[n]['n']:>10}" for n in names))
    return "\n".join(lines)


def fmt(value) -> str:
    """A figure with three decimals, or "-" when it is undefined (None or NaN)."""
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.3f}"
