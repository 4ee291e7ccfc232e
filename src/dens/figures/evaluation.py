"""The figures of one split at every level (image, breast, exam), with bootstrap 95% confidence intervals that
resample patients, overall and per site and per manufacturer.

* Levels are formed as dens-infer forms them (:mod:`dens.exams`): a breast is the mean of its views, an exam
  takes its denser breast's call. A breast's density is the most common label of its views (the lower class
  on a tie); an exam's is its denser breast's, as BI-RADS assigns density per exam.
* The images of one woman are not independent draws (her views share her density; her two breasts nearly
  do), so an interval from resampling images would be too narrow. The bootstrap draws patients with
  replacement (a cluster bootstrap) and every image, breast and exam of a drawn patient comes with her; the
  same draws serve every level, so the levels' intervals describe the same resampled cohorts.
* Dense-vs-not is the density call's (the argmax is C or D, dens-infer's default flag): its sensitivity and
  specificity are the operating point on the ROC curve of p_dense, whose area is reported beside them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from dens import exams, labels
from dens.figures import metrics
from dens.figures.metrics import softmax
from dens.manifest import GROUP_COLUMNS

LEVELS = ("image", "breast", "exam")
RESAMPLES = 1000  # bootstrap draws: the 2.5th and 97.5th percentiles move by well under 0.01 beyond this
CONFIDENCE = 0.95
# Figures that get an interval: the class figures, and dense-vs-not's.
_CHUNK = 100


@dataclass(frozen=True)
class Level:
    """One level's units (images, breasts or exams): their probabilities [n, K], densities [n] and the
    patient each belongs to (an index into the split's patients)."""

    probs: np.ndarray
    y: np.ndarray
    patient: np.ndarray


def p_dense(probs: np.ndarray) -> np.ndarray:
    """The summed probability of the dense classes (C, D): the score the dense ROC ranks by."""
    return np.asarray(probs, np.float64)[:, metrics.DENSE_INDEX].sum(1)


def levels(images: pd.DataFrame, probs: np.ndarray, y: np.ndarray) -> dict[str, Level]:
    """The image, breast and exam levels of one split. ``images`` has one row per image (in ``probs``' order)
    with ``patient_id`` and the identity columns :func:`dens.exams.breast_key` reads."""
    images = images.reset_index(drop=True)
    probs, y = np.asarray(probs, np.float64), np.asarray(y, np.int64)
    patient = pd.factorize(images[labels.PATIENT_ID].astype(str))[0].astype(np.int64)
    k = probs.shape[1]
    groups = list(exams.breast_groups(images).items())
    breast_probs = np.stack([exams.breast_probabilities(probs[g]) for _, g in groups]) if groups else probs[:0]
    breast_y = np.array([np.bincount(y[g], minlength=k).argmax() for _, g in groups], np.int64)
    breast_patient = np.array([patient[g[0]] for _, g in groups], np.int64)
    by_exam: dict[str, list[int]] = {}
    for b, ((exam, _side), _g) in enumerate(groups):
        by_exam.setdefault(exam, []).append(b)
    members = [np.asarray(m, np.int64) for m in by_exam.values()]
    chosen = [m[exams.denser_breast(breast_probs[m])] for m in members]
    return {
        "image": Level(probs, y, patient),
        "breast": Level(breast_probs, breast_y, breast_patient),
        "exam": Level(
            breast_probs[chosen] if chosen else probs[:0],
            np.array([breast_y[m].max() for m in members], np.int64),
            np.array([breast_patient[m[0]] for m in members], np.int64),
        ),
    }


# --- the dense ROC ------------------------------------------------------------------------------------------


def roc_auc(truth: np.ndarray, score: np.ndarray, weight: np.ndarray | None = None) -> float:
    """Area under the ROC curve of ``score`` for boolean ``truth`` (ties count half), each unit weighted by
    ``weight`` (how often a bootstrap draw holds it); NaN without both positives and negatives."""
    truth, score = np.asarray(truth, bool), np.asarray(score, np.float64)
    weight = np.ones(len(truth)) if weight is None else np.asarray(weight, np.float64)
    _, rank = np.unique(score, return_inverse=True)
    positives = np.bincount(rank, weight * truth)
    negatives = np.bincount(rank, weight * ~truth)
    total_pos, total_neg = positives.sum(), negatives.sum()
    if not total_pos or not total_neg:
        return float("nan")
    below = np.cumsum(negatives) - negatives  # negatives scored lower than each distinct score
    return float((positives * (below + negatives / 2)).sum() / (total_pos * total_neg))


def roc_curve(truth: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates as the threshold falls through every distinct score, from (0, 0)."""
    truth, score = np.asarray(truth, bool), np.asarray(score, np.float64)
    order = np.argsort(-score, kind="stable")
    truth, score = truth[order], score[order]
    last = np.r_[np.flatnonzero(np.diff(score)), len(score) - 1]  # the last unit of each distinct score
    tp, fp = np.cumsum(truth)[last], np.cumsum(~truth)[last]
    pos, neg = max(int(truth.sum()), 1), max(int((~truth).sum()), 1)
    return np.r_[0.0, fp / neg], np.r_[0.0, tp / pos]


# --- figures and intervals ----------------------------------------------------------------------------------


def figures(level: Level) -> dict:
    """:func:`dens.figures.metrics.evaluate` and the dense ROC AUC of one level."""
    out = metrics.evaluate(level.probs, level.y)
    out["dense"]["auc"] = roc_auc(np.isin(level.y, metrics.DENSE_INDEX), p_dense(level.probs))
    return out


def _auc_weighted(truth: np.ndarray, score: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """:func:`roc_auc` for each row of ``weight`` [draws, units] at once (ties count half)."""
    order = np.argsort(score, kind="stable")
    truth, score, weight = truth[order], score[order], weight[:, order]
    starts = np.r_[0, np.flatnonzero(np.diff(score)) + 1]  # where each run of one score begins
    group = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(score)]))
    negatives = np.cumsum(weight * ~truth, axis=1)
    ends = np.r_[starts[1:], len(score)] - 1
    below = np.where(starts > 0, negatives[:, np.maximum(starts - 1, 0)], 0.0)  # lower scores, per run
    same = negatives[:, ends] - below  # negatives sharing the run's score
    positive = weight * truth
    area = (positive * (below + same / 2)[:, group]).sum(1)
    return metrics.ratio(area, positive.sum(1) * (weight * ~truth).sum(1))


def _draw_figures(level: Level, weight: np.ndarray) -> dict[str, np.ndarray]:
    """The figures that get an interval, for each row of ``weight`` [draws, units]: how often each unit of
    ``level`` is in that draw."""
    k = level.probs.shape[1]
    cell = level.y * k + level.probs.argmax(1)
    cm = np.stack([np.bincount(cell, w, minlength=k * k) for w in weight]).reshape(-1, k, k)
    out = dict(metrics.headline(cm))
    dense = np.isin(np.arange(k), metrics.DENSE_INDEX)
    tp, fn = cm[:, dense][:, :, dense].sum((1, 2)), cm[:, dense][:, :, ~dense].sum((1, 2))
    fp, tn = cm[:, ~dense][:, :, dense].sum((1, 2)), cm[:, ~dense][:, :, ~dense].sum((1, 2))
    out["dense_accuracy"] = metrics.ratio(tp + tn, tp + fn + fp + tn)
    out["dense_sensitivity"] = metrics.ratio(tp, tp + fn)
    out["dense_specificity"] = metrics.ratio(tn, tn + fp)
    out["dense_auc"] = _auc_weighted(np.isin(level.y, metrics.DENSE_INDEX), p_dense(level.probs), weight)
    return out


def bootstrap(
    by_level: dict[str, Level], patients: int, resamples: int = RESAMPLES, seed: int = 0
) -> dict[str, dict[str, list[float | None]]]:
    """Per level, ``{figure: [low, high]}``: the central ``CONFIDENCE`` interval of each figure over
    ``resamples`` draws of ``patients`` patients with replacement (None where a figure is undefined in every
    draw, e.g. a sensitivity without dense cases). The same draws serve every level."""
    rng = np.random.default_rng(seed)
    draws: dict[str, list[dict[str, np.ndarray]]] = {name: [] for name in by_level}
    for start in range(0, resamples, _CHUNK):  # a chunk of draws at a time: [draws, units] arrays stay small
        chosen = rng.integers(0, patients, (min(_CHUNK, resamples - start), patients))
        counts = np.stack([np.bincount(row, minlength=patients) for row in chosen]).astype(np.float64)
        for name, level in by_level.items():
            draws[name].append(_draw_figures(level, counts[:, level.patient]))
    tail = (1 - CONFIDENCE) / 2 * 100
    out = {}
    for name, chunks in draws.items():
        out[name] = {}
        for figure in chunks[0]:
            values = np.concatenate([c[figure] for c in chunks])
            finite = values[np.isfinite(values)]
            out[name][figure] = (
                [float(np.percentile(finite, tail)), float(np.percentile(finite, 100 - tail))]
                if len(finite)
                else [None, None]
            )
    return out


def report(
    images: pd.DataFrame,
    logits: np.ndarray,
    y: np.ndarray,
    temperature: float = 1.0,
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
    groups: bool = True,
) -> dict:
    """One split's figures at every level, each with its intervals (``ci``, :func:`bootstrap`; none when
    ``resamples`` is 0), how the bootstrap drew (``bootstrap``), and, when ``groups``, the same per value of
    each :data:`GROUP_COLUMNS` column the split has (``by``)."""
    probs = softmax(logits, temperature)
    out = _report(images, probs, y, resamples, seed)
    if groups:
        out["by"] = {}
        for column in GROUP_COLUMNS:
            values = images[column].astype(str).str.strip() if column in images else None
            if values is None or (values == "").all():
                continue
            out["by"][column] = {
                value: _report(images[mask], probs[mask.to_numpy()], y[mask.to_numpy()], resamples, seed)
                for value in sorted(values.unique(), key=_natural)
                if (mask := values == value).any()
            }
    return out


def _natural(value: str) -> tuple:
    """Numbers in numeric order (machine 29 before 170), then the rest alphabetically."""
    return (0, int(value), "") if value.isdigit() else (1, 0, value)


def _report(images: pd.DataFrame, probs: np.ndarray, y: np.ndarray, resamples: int, seed: int) -> dict:
    by_level = levels(images, probs, np.asarray(y, np.int64))
    patients = int(images[labels.PATIENT_ID].nunique())
    out: dict = {name: figures(level) for name, level in by_level.items()}
    out["bootstrap"] = {"unit": "patient", "patients": patients, "resamples": resamples, "confidence": CONFIDENCE}
    if resamples and patients:
        for name, ci in bootstrap(by_level, patients, resamples, seed).items():
            out[name]["ci"] = ci
    return out


def curves(images: pd.DataFrame, logits: np.ndarray, y: np.ndarray, temperature: float) -> dict[str, dict]:
    """Per level, the dense ROC curve (``fpr``, ``tpr``) and the call's operating point on it, for the plot."""
    out = {}
    for name, level in levels(images, softmax(logits, temperature), y).items():
        truth = np.isin(level.y, metrics.DENSE_INDEX)
        called = np.isin(level.probs.argmax(1), metrics.DENSE_INDEX)
        fpr, tpr = roc_curve(truth, p_dense(level.probs))
        point = metrics.binary_metrics(truth, called)
        out[name] = {"fpr": fpr, "tpr": tpr, "operating_point": (1 - point["specificity"], point["sensitivity"])}
    return out
