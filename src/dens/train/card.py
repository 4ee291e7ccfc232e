"""What a run's model card says: the facts, gathered from the run's config, data and test results into one
JSON-able dict that travels in best.pt's summary (and so in the ONNX metadata) and renders as model_card.md
(:mod:`dens.artifact.modelcard` reads and renders it)."""

from __future__ import annotations

import datetime as dt

from dens.artifact import modelcard
from dens.labels import CLASSES
from dens.train.data import SPLITS

# The recipe's settings a reader needs to reproduce or judge the run.
RECIPE = ("optimizer", "lr", "weight_decay", "epochs", "batch_size", "balance", "augment", "seed")
_FIGURES = ("n", "accuracy", "balanced_accuracy", "macro_f1", "kappa_linear", "kappa_quadratic", "ci")
_DENSE = ("n", "positives", "accuracy", "sensitivity", "specificity", "auc")


def _figures(level: dict) -> dict:
    out = {k: level[k] for k in _FIGURES if k in level}
    out["dense"] = {k: level["dense"][k] for k in _DENSE if k in level.get("dense", {})}
    return out


def facts(resolved: dict, info: dict, best_epoch: int, test: dict, calibration: dict) -> dict:
    """The card of a finished run: ``resolved`` is config.yaml's content, ``info`` metrics.json's ``data``,
    ``test`` the test split's report (:func:`dens.figures.evaluation.report`) and ``calibration`` the chosen
    temperature with the test split's NLL and ECE around it."""
    run = resolved["resolved"]
    return {
        "format": modelcard.CARD_FORMAT,
        "model": {
            "arch": resolved["arch"],
            "input": f"uint8 grey {_canvas(resolved)}, dens's canonical image",
            "classes": list(CLASSES),
            "weights": run["weights"],
            "from_scratch": run["weights"].startswith("none"),
            "trained": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
            "dens_version": run["dens_version"],
            "device": f"{run['device']} x{run['world_size']}, {run['precision']}",
        },
        "recipe": {
            **{k: resolved[k] for k in RECIPE},
            "schedule": "cosine",
            "best_epoch": best_epoch,
        },
        "data": {
            "csv": info.get("csv"),
            "source": info.get("source"),
            "synthetic": bool(info.get("synthetic")),
            "unusable": info.get("unusable", 0),
            "splits": {s: info[s] for s in SPLITS if s in info},
            "groups": info.get("groups", {}),
            "classes_absent_from_training": info.get("classes_absent_from_training", []),
            "warnings": info.get("warnings", []),
        },
        "test": {level: _figures(test[level]) for level in ("image", "breast", "exam") if level in test},
        "test_by": {
            column: {value: _figures(report["image"]) for value, report in groups.items()}
            for column, groups in test.get("by", {}).items()
        },
        "bootstrap": test.get("bootstrap", {}),
        "calibration": calibration,
        "intended_use": modelcard.INTENDED_USE,
        "not_a_medical_device": modelcard.NOT_A_MEDICAL_DEVICE,
    }


def _canvas(resolved: dict) -> str:
    """H x W of the run's canonical image (a config.yaml from before H x W holds only ``size``)."""
    side = resolved.get("size")
    return f"{side}x{side}" if side else f"{resolved['height']}x{resolved['width']}"
