"""PNG figures: of a scored split (dens-train's test split, dens-eval's set), the confusion matrices (raw
and row-normalised) per level, the dense ROC and the reliability diagram (:func:`split_pngs`); of a training
run, the class distribution per split and the loss/accuracy/learning-rate curves.

Each figure is drawn on its own Agg canvas, never through pyplot: no display is needed on a training
machine, and importing this module selects no backend for the process that imports it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from dens.figures import evaluation
from dens.figures.metrics import ECE_BINS, softmax
from dens.labels import CLASSES


def split_pngs(
    out_dir: str | Path,
    report: dict,
    images: pd.DataFrame,
    logits: np.ndarray,
    y: np.ndarray,
    temperature: float,
    name: str = "test",
) -> list[Path]:
    """The figures of one scored split into ``out_dir``: ``confusion_<level>.png`` and
    ``confusion_<level>_normalised.png`` per level, ``roc_dense.png`` and ``reliability.png``. ``report``:
    :func:`dens.figures.evaluation.report` of the same ``images``, ``logits``, ``y`` and ``temperature``;
    ``name`` heads every figure's title."""
    out_dir = Path(out_dir)
    written = []
    for level in evaluation.LEVELS:
        title = f"{name}, {level} level"
        cm, normalised = report[level]["confusion"], report[level]["confusion_normalised"]
        written.append(confusion_png(cm, out_dir / f"confusion_{level}.png", normalised=False, title=title))
        written.append(
            confusion_png(
                normalised,
                out_dir / f"confusion_{level}_normalised.png",
                normalised=True,
                title=f"{title} (row-normalised)",
            )
        )
    curves = evaluation.curves(images, logits, y, temperature)
    written.append(roc_png(curves, report, out_dir / "roc_dense.png", name=name))
    before, after = softmax(logits), softmax(logits, temperature)
    written.append(reliability_png(before, after, y, temperature, out_dir / "reliability.png", name=name))
    return written


def confusion_png(cm: list | np.ndarray, path: str | Path, *, normalised: bool, title: str) -> Path:
    """One confusion matrix (rows: truth, columns: prediction) with its values written in the cells."""
    cm = np.asarray(cm, np.float64)
    fig, ax = _figure(figsize=(4.2, 3.8))
    image = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1 if normalised else max(1.0, cm.max()))
    fig.colorbar(image, ax=ax, fraction=0.046)
    ticks = range(len(CLASSES))
    ax.set(
        xticks=ticks,
        yticks=ticks,
        xticklabels=CLASSES,
        yticklabels=CLASSES,
        xlabel="predicted",
        ylabel="true",
        title=title,
    )
    threshold = (1 if normalised else cm.max()) / 2
    for i in ticks:
        for j in ticks:
            text = f"{cm[i, j]:.2f}" if normalised else f"{int(cm[i, j])}"
            ax.text(j, i, text, ha="center", va="center", color="white" if cm[i, j] > threshold else "black")
    return _save(fig, path)


def curves_png(history: list[dict], out_dir: str | Path, best_epoch: int | None = None) -> list[Path]:
    """loss.png (train and validation), accuracy.png (train accuracy beside validation accuracy, balanced
    accuracy and kappa), lr.png; the best epoch (the weights kept) marked on each."""
    out_dir = Path(out_dir)
    epochs = [h["epoch"] for h in history]
    panels = (
        ("loss.png", "loss", [("train", "train_loss"), ("validation", "val_loss")]),
        (
            "accuracy.png",
            "accuracy / kappa",
            [
                ("train accuracy (running, augmented)", "train_accuracy"),
                ("validation accuracy", "val_accuracy"),
                ("validation balanced accuracy", "val_balanced_accuracy"),
                ("validation quadratic kappa", "val_kappa_quadratic"),
            ],
        ),
        ("lr.png", "learning rate", [("lr", "lr")]),
    )
    written = []
    for name, ylabel, series in panels:
        fig, ax = _figure(figsize=(5.6, 3.6))
        for label, key in series:
            values = [np.nan if h.get(key) is None else h[key] for h in history]
            ax.plot(epochs, values, marker="o", label=label)
        if best_epoch:
            ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"best epoch ({best_epoch})")
        ax.set(xlabel="epoch", ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if name == "lr.png":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
        written.append(_save(fig, out_dir / name))
    return written


def roc_png(curves: dict[str, dict], test: dict, path: str | Path, name: str = "test") -> Path:
    """The dense-vs-not ROC curve of p_dense at each level, its AUC with the 95% interval in the legend, and
    the density call's operating point (argmax C or D) on each curve; ``name`` heads the title."""
    fig, ax = _figure(figsize=(4.8, 4.6))
    for level, curve in curves.items():
        auc = test[level]["dense"].get("auc")
        low, high = test[level].get("ci", {}).get("dense_auc", (None, None))
        label = f"{level}: AUC {'-' if auc is None else f'{auc:.3f}'}"
        if low is not None and high is not None:
            label += f" [{low:.3f}, {high:.3f}]"
        (line,) = ax.plot(curve["fpr"], curve["tpr"], label=label)
        x, y = curve["operating_point"]
        if np.isfinite(x) and np.isfinite(y):
            ax.plot([x], [y], marker="o", color=line.get_color(), markeredgecolor="black")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.plot([], [], marker="o", color="white", markeredgecolor="black", linestyle="", label="the call (C or D)")
    ax.set(
        xlabel="1 - specificity", ylabel="sensitivity", title=f"{name}: dense (C/D) vs not", xlim=(0, 1), ylim=(0, 1)
    )
    ax.legend(fontsize="small", loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def reliability_png(
    before: np.ndarray, after: np.ndarray, y: np.ndarray, temperature: float, path: str | Path, name: str = "test"
) -> Path:
    """Reliability diagram of a split (``name``): accuracy against confidence of the top class, in
    equal-width bins, before and after dividing the logits by the temperature, with how many images each bin
    holds."""
    fig = Figure(figsize=(5, 5.2), dpi=120)
    FigureCanvasAgg(fig)
    ax, counts = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    edges = np.linspace(0, 1, ECE_BINS + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    y = np.asarray(y)
    for probs, label in ((before, "T = 1"), (after, f"T = {temperature:.3g}")):
        confidence, right = probs.max(1), probs.argmax(1) == y
        index = np.clip(np.ceil(confidence * ECE_BINS).astype(np.int64) - 1, 0, ECE_BINS - 1)
        n = np.bincount(index, minlength=ECE_BINS)
        accuracy = np.divide(np.bincount(index, right, ECE_BINS), n, out=np.full(ECE_BINS, np.nan), where=n > 0)
        mean_conf = np.divide(np.bincount(index, confidence, ECE_BINS), n, out=np.full(ECE_BINS, np.nan), where=n > 0)
        ax.plot(mean_conf, accuracy, marker="o", label=label)
        counts.bar(centres, n, width=1 / ECE_BINS, alpha=0.5, label=label)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="calibrated")
    ax.set(ylabel="accuracy", title=f"{name}: reliability of the top class", xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    counts.set(xlabel="confidence (top-class probability)", ylabel="images")
    return _save(fig, path)


def classes_png(classes: dict[str, dict[str, int]], path: str | Path) -> Path:
    """Images per density class in each split, side by side, with the counts written on the bars."""
    fig, ax = _figure(figsize=(5.2, 3.4))
    width = 0.8 / max(len(classes), 1)
    x = np.arange(len(CLASSES))
    for i, (split, counts) in enumerate(classes.items()):
        values = [counts.get(c, 0) for c in CLASSES]
        bars = ax.bar(x + (i - (len(classes) - 1) / 2) * width, values, width, label=split)
        ax.bar_label(bars, fontsize="x-small")
    ax.set(xticks=x, xticklabels=CLASSES, xlabel="density", ylabel="images", title="class distribution per split")
    ax.legend(fontsize="small")
    return _save(fig, path)


def _figure(figsize: tuple[float, float]):
    fig = Figure(figsize=figsize, dpi=120)
    FigureCanvasAgg(fig)  # attaches itself to the figure: savefig renders with Agg
    return fig, fig.subplots()


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path)
    return path
