"""How a model card reads: the facts a training run records about its model, as Markdown (``model_card.md``),
as the short lines a review page shows, and as the caveats dens-infer prints before it calls anything.

The facts themselves (a JSON-able dict, :data:`CARD_KEY` in a checkpoint's summary and so in the ONNX
metadata dens-export copies the summary into) are gathered by the training run (:mod:`dens.train.card`);
this module only reads them, and is torch-free so that dens-infer's process can.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

CARD_KEY = "model_card"  # where the facts live in a checkpoint's summary
CARD_FORMAT = 1
# dens-synth writes this file beside its train.csv; a run trained on a folder that holds it was trained on
# synthetic phantoms, and its card and dens-infer say so.
SYNTH_MARKER = "dens-synth.json"

INTENDED_USE = (
    "Research and quality assurance of automated breast-density assessment: it estimates the BI-RADS "
    "(5th edition) breast composition category A-D of each image of a 2D screening mammogram (FFDM or "
    "digitised film; CC and MLO views), and the breast's and exam's category from them, for a radiologist "
    "to review. It does not detect or diagnose cancer, and it has not been validated on data other than "
    "the test split described here: check it on your own population, vendors and sites before relying on "
    "its figures."
)
NOT_A_MEDICAL_DEVICE = (
    "This model is not a medical device: it has no regulatory clearance (FDA, CE or other) and must not be "
    "the basis of the density notification a patient receives; a radiologist's assessment is."
)
HEADLINE = (
    ("accuracy", "accuracy"),
    ("balanced accuracy", "balanced_accuracy"),
    ("macro-F1", "macro_f1"),
    ("kappa (linear)", "kappa_linear"),
    ("kappa (quadratic)", "kappa_quadratic"),
)
DENSE = (("sensitivity", "sensitivity"), ("specificity", "specificity"), ("ROC AUC", "auc"))


def synthetic_folder(folder: str | Path) -> bool:
    """Whether ``folder`` is a dens-synth cohort (it holds :data:`SYNTH_MARKER`)."""
    return (Path(folder) / SYNTH_MARKER).is_file()


def of(summary: Mapping | None) -> dict:
    """The card facts in a checkpoint's (or an ONNX file's) summary; {} for a model trained before cards."""
    card = (summary or {}).get(CARD_KEY)
    return dict(card) if isinstance(card, Mapping) else {}


def caveats(summary: Mapping | None) -> list[str]:
    """What a user must know before trusting a model's calls, one sentence each: trained from random weights,
    on synthetic data, with classes it never saw, or without a card at all."""
    summary = summary or {}
    card = of(summary)
    out = []
    if summary.get("from_scratch") or card.get("model", {}).get("from_scratch"):
        out.append("it was trained from random weights, not fine-tuned from pretrained ones")
    if card.get("data", {}).get("synthetic"):
        out.append("it was trained on synthetic phantoms (dens-synth), not on mammograms: its calls mean nothing")
    absent = card.get("data", {}).get("classes_absent_from_training") or []
    if absent:
        out.append(f"it never saw class {', '.join(absent)} in training and cannot call it reliably")
    if not card:
        out.append("it carries no model card (trained by an older dens): its training data and figures are unknown")
    return out


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _with_ci(figures: Mapping, key: str, ci_key: str) -> str:
    value = _fmt(figures.get(key))
    low, high = (figures.get("ci") or {}).get(ci_key) or (None, None)
    return value if low is None or high is None else f"{value} [{low:.3f}, {high:.3f}]"


def _figure_rows(test: Mapping) -> list[str]:
    levels = [name for name in ("image", "breast", "exam") if name in test]
    rows = ["| figure | " + " | ".join(levels) + " |", "|---|" + "---|" * len(levels)]
    rows.append("| n | " + " | ".join(str(test[lv].get("n", "-")) for lv in levels) + " |")
    for label, key in HEADLINE:
        rows.append(f"| {label} | " + " | ".join(_with_ci(test[lv], key, key) for lv in levels) + " |")
    for label, key in DENSE:
        cells = [_with_ci(test[lv].get("dense", {}) | {"ci": test[lv].get("ci")}, key, f"dense_{key}") for lv in levels]
        rows.append(f"| dense {label} | " + " | ".join(cells) + " |")
    return rows


def render(card: Mapping) -> str:
    """``model_card.md``: the card's facts as Markdown, headed by the statements no reader may miss."""
    model, recipe, data = card.get("model", {}), card.get("recipe", {}), card.get("data", {})
    lines = [f"# Model card: dens {model.get('arch', '?')} breast-density classifier", ""]
    lines += [f"> **{NOT_A_MEDICAL_DEVICE}**", ""]
    for caveat in caveats({CARD_KEY: card}):
        lines += [f"> **Warning:** {caveat}.", ""]
    lines += ["## Intended use", "", INTENDED_USE, ""]
    lines += [
        "## Model",
        "",
        f"- architecture: {model.get('arch')}, input {model.get('input')}",
        f"- classes: {', '.join(model.get('classes', []))} (BI-RADS); dense = C or D",
        f"- starting weights: {model.get('weights')}{' (random initialisation)' if model.get('from_scratch') else ''}",
        f"- trained: {model.get('trained')} with dens {model.get('dens_version')} on {model.get('device')}",
        "",
        "## Recipe",
        "",
        "- " + ", ".join(f"{k} {_fmt(v)}" for k, v in recipe.items()),
        "",
        "## Training data",
        "",
        f"- source: {data.get('source')} ({data.get('csv')}); synthetic: {'yes' if data.get('synthetic') else 'no'}",
        f"- unusable files left out: {data.get('unusable', 0)}",
        "",
        "| split | images | patients | exams | " + " | ".join(model.get("classes", [])) + " |",
        "|---|---|---|---|" + "---|" * len(model.get("classes", [])),
    ]
    for split, part in data.get("splits", {}).items():
        counts = " | ".join(str(part.get("classes", {}).get(c, 0)) for c in model.get("classes", []))
        lines.append(f"| {split} | {part.get('images')} | {part.get('patients')} | {part.get('exams')} | {counts} |")
    for column, values in data.get("groups", {}).items():
        shown = ", ".join(f"{value} ({count})" for value, count in values.items())
        lines.append(f"\n- {column} (images): {shown}")
    lines.append("")
    absent = data.get("classes_absent_from_training") or []
    for warning in data.get("warnings", []):
        lines.append(f"- **{warning}**")
    if absent or data.get("warnings"):
        lines.append("")
    test = card.get("test", {})
    boot = card.get("bootstrap", {})
    lines += [
        "## Test figures",
        "",
        f"On the held-out test split; 95% confidence intervals from {boot.get('resamples', 0)} bootstrap "
        f"draws of its {boot.get('patients', '?')} patients (every image of a drawn patient comes with her). "
        "Dense-vs-not is the call (argmax C or D); its sensitivity and specificity are the operating point, "
        "the ROC AUC ranks by p_dense = p_C + p_D. A breast is the mean of its views, an exam takes its "
        "denser breast, as dens-infer's CSVs do.",
        "",
        *_figure_rows(test),
        "",
    ]
    for column, groups in card.get("test_by", {}).items():
        lines += [
            f"### By {column} (test, image level)",
            "",
            "| value | images | accuracy | kappa (quadratic) | dense ROC AUC |",
            "|---|---|---|---|---|",
        ]
        for value, figures in groups.items():
            lines.append(
                f"| {value} | {figures.get('n')} | {_with_ci(figures, 'accuracy', 'accuracy')} | "
                f"{_with_ci(figures, 'kappa_quadratic', 'kappa_quadratic')} | "
                f"{_with_ci(figures.get('dense', {}) | {'ci': figures.get('ci')}, 'auc', 'dense_auc')} |"
            )
        lines.append("")
    cal = card.get("calibration", {})
    lines += [
        "## Calibration",
        "",
        f"- temperature {_fmt(cal.get('temperature'))} ({'kept' if cal.get('kept') else 'not fitted or not kept'}): "
        f"{cal.get('reason', '')}",
        f"- test NLL {_fmt(cal.get('nll_before'))} -> {_fmt(cal.get('nll_after'))}, "
        f"ECE {_fmt(cal.get('ece_before'))} -> {_fmt(cal.get('ece_after'))}",
        "",
    ]
    return "\n".join(lines)


def summary_lines(card: Mapping) -> list[str]:
    """The few lines a review page heads itself with: what the model is, what it was trained on, its test
    figures at exam level with their intervals, and the statements no reader may miss."""
    if not card:
        return [f"No model card: this model was trained by an older dens. {NOT_A_MEDICAL_DEVICE}"]
    model, data = card.get("model", {}), card.get("data", {})
    splits = data.get("splits", {})
    images = sum(part.get("images", 0) for part in splits.values())
    patients = sum(part.get("patients", 0) for part in splits.values())
    exam = card.get("test", {}).get("exam", {})
    weights = model.get("weights") or "?"
    start = {"imagenet": "ImageNet weights", "none": "random weights"}.get(weights, f"the weights in {weights}")
    lines = [
        f"Model: {model.get('arch')} from {start}, trained {model.get('trained')} on "
        f"{images} images of {patients} patients ({'synthetic' if data.get('synthetic') else data.get('source')}).",
        f"Test, exam level: quadratic kappa {_with_ci(exam, 'kappa_quadratic', 'kappa_quadratic')}; dense "
        f"sensitivity {_with_ci(exam.get('dense', {}) | {'ci': exam.get('ci')}, 'sensitivity', 'dense_sensitivity')}, "
        f"specificity {_with_ci(exam.get('dense', {}) | {'ci': exam.get('ci')}, 'specificity', 'dense_specificity')} "
        "(95% CI).",
    ]
    lines += [f"Warning: {c}." for c in caveats({CARD_KEY: card})]
    lines.append(NOT_A_MEDICAL_DEVICE)
    return lines
