"""Agreement between two raters of ordered classes (a model and its reference, a model and a reviewer): the
confusion matrix and Cohen's kappa, unweighted or weighted. numpy only: dens-train's figures and
dens-verdicts' agreement use the same definitions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dens.labels import CLASSES

NUM = len(CLASSES)


def confusion(y_true: Sequence[int], y_pred: Sequence[int], k: int = NUM) -> np.ndarray:
    """Counts ``[true, predicted]`` over ``k`` classes (rows: truth)."""
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    return np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)


def ratio(a: np.ndarray, b: np.ndarray, fill: float = np.nan) -> np.ndarray:
    """a / b elementwise, ``fill`` where b is 0."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.divide(a, b, out=np.full(np.broadcast(a, b).shape, fill), where=b != 0)


def weighted_kappa(cm: np.ndarray, weights: str | None = "quadratic") -> np.ndarray | float:
    """Cohen's kappa from a confusion matrix [K, K], or from each of a stack [..., K, K]; ``weights`` None,
    'linear' or 'quadratic'."""
    cm = np.asarray(cm, np.float64)
    k = cm.shape[-1]
    i, j = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
    if weights is None:
        w = (i != j).astype(np.float64)
    elif weights == "linear":
        w = np.abs(i - j).astype(np.float64)
    elif weights == "quadratic":
        w = ((i - j) ** 2).astype(np.float64)
    else:
        raise ValueError(f"unknown kappa weights {weights!r}")
    n = cm.sum((-2, -1))
    expected = ratio(cm.sum(-1)[..., :, None] * cm.sum(-2)[..., None, :], n[..., None, None])
    kappa = 1.0 - ratio((w * cm).sum((-2, -1)), (w * expected).sum((-2, -1)))
    return float(kappa) if kappa.ndim == 0 else kappa
