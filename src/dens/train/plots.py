"""PNG figures of a run: confusion matrices (raw and row-normalised) and loss/accuracy/learning-rate curves.

Each figure is drawn on its own Agg canvas, never through pyplot: no display is needed on a training
machine, and importing this module selects no backend for the process that imports it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dens.labels import CLASSES


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


def curves_png(history: list[dict], out_dir: str | Path) -> list[Path]:
    """loss.png (train and validation), accuracy.png (validation accuracy and kappa), lr.png."""
    out_dir = Path(out_dir)
    epochs = [h["epoch"] for h in history]
    panels = (
        ("loss.png", "loss", [("train", "train_loss"), ("validation", "val_loss")]),
        (
            "accuracy.png",
            "validation",
            [
                ("accuracy", "val_accuracy"),
                ("balanced accuracy", "val_balanced_accuracy"),
                ("quadratic kappa", "val_kappa_quadratic"),
            ],
        ),
        ("lr.png", "learning rate", [("lr", "lr")]),
    )
    written = []
    for name, ylabel, series in panels:
        fig, ax = _figure(figsize=(5, 3.4))
        for label, key in series:
            values = [np.nan if h.get(key) is None else h[key] for h in history]
            ax.plot(epochs, values, marker="o", label=label)
        ax.set(xlabel="epoch", ylabel=ylabel)
        if name == "lr.png":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        else:
            ax.legend()
        ax.grid(alpha=0.3)
        written.append(_save(fig, out_dir / name))
    return written


def _figure(figsize: tuple[float, float]):
    fig = Figure(figsize=figsize, dpi=120)
    FigureCanvasAgg(fig)  # attaches itself to the figure: savefig renders with Agg
    return fig, fig.subplots()


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path)
    return path
