"""summary.md: dens-eval's figures as a page a person reads, the intervals beside each figure."""

from __future__ import annotations

from pathlib import Path

from dens.figures.evaluation import LEVELS
from dens.figures.metrics import fmt

# (row label, key in a level's figures, key in its "dense" figures, key in its "ci")
ROWS = (
    ("accuracy", "accuracy", None, "accuracy"),
    ("balanced accuracy", "balanced_accuracy", None, "balanced_accuracy"),
    ("macro-F1", "macro_f1", None, "macro_f1"),
    ("kappa, linear", "kappa_linear", None, "kappa_linear"),
    ("kappa, quadratic", "kappa_quadratic", None, "kappa_quadratic"),
    ("dense (C/D): accuracy", None, "accuracy", "dense_accuracy"),
    ("dense (C/D): sensitivity", None, "sensitivity", "dense_sensitivity"),
    ("dense (C/D): specificity", None, "specificity", "dense_specificity"),
    ("dense (C/D): AUC", None, "auc", "dense_auc"),
)
# The per-group table: a few figures of the image level.
GROUP_ROWS = ("accuracy", "kappa, quadratic", "dense (C/D): AUC")


def markdown(result: dict) -> str:
    """The page for metrics.json's ``result``: what was scored, the figures per level with their 95%
    intervals, the same per site and manufacturer, calibration, and the figures' files."""
    model, data, figures = result["model"], result["data"], result["figures"]
    height, width = model["canvas"]
    version = model["preprocess"].get("version", 1)  # a version 1 route's dict has no version key
    split = f", split {data['split']}" if data.get("split") else ""
    lines = [
        f"# dens-eval: {Path(model['path']).name} on {data['csv']}{split}",
        "",
        f"- model: `{model['path']}` ({model['kind']}, sha256 {model['sha256'][:12]}), temperature "
        f"{model['temperature']:.3g}, preprocess version {version}, canvas {height}x{width}",
        f"- data: {data['images']} images of {data['patients']} patients, {data['exams']} exams; "
        f"{data['unusable']} unusable (listed in unusable.csv)",
        "- classes: " + ", ".join(f"{c} {n}" for c, n in data["classes"].items()),
        f"- intervals: 95%, {figures['bootstrap']['resamples']} bootstrap draws of patients",
        *(f"- warning: {w}" for w in result.get("warnings", [])),
        "",
        "| figure | " + " | ".join(LEVELS) + " |",
        "|---|" + "---:|" * len(LEVELS),
    ]
    for label, key, dense, ci in ROWS:
        lines.append(f"| {label} | " + " | ".join(_cell(figures[level], key, dense, ci) for level in LEVELS) + " |")
    lines.append("| n | " + " | ".join(str(figures[level]["n"]) for level in LEVELS) + " |")
    for column, groups in figures.get("by", {}).items():
        lines += ["", f"Per {column.replace('_', ' ')}, image level:", ""]
        lines.append(f"| {column} | images | patients | " + " | ".join(GROUP_ROWS) + " |")
        lines.append("|---|---:|---:|" + "---:|" * len(GROUP_ROWS))
        rows = {label: (key, dense, ci) for label, key, dense, ci in ROWS}
        for value, report in groups.items():
            cells = [_cell(report["image"], *rows[label]) for label in GROUP_ROWS]
            patients = report["bootstrap"]["patients"]
            lines.append(f"| {value} | {report['image']['n']} | {patients} | " + " | ".join(cells) + " |")
    calibration = result["calibration"]
    lines += [
        "",
        f"Calibration (image level, temperature {calibration['temperature']:.3g}): NLL "
        f"{fmt(calibration['nll_before'])} -> {fmt(calibration['nll_after'])}, ECE {fmt(calibration['ece_before'])}"
        f" -> {fmt(calibration['ece_after'])}.",
        "",
        "Figures: " + ", ".join(f"[{name}]({name}.png)" for name in _PNGS) + ".",
        "",
    ]
    return "\n".join(lines)


_PNGS = (
    *(f"confusion_{level}" for level in LEVELS),
    *(f"confusion_{level}_normalised" for level in LEVELS),
    "roc_dense",
    "reliability",
)


def _cell(level: dict, key: str | None, dense: str | None, ci: str) -> str:
    value = level[key] if key else level["dense"].get(dense)
    low, high = level.get("ci", {}).get(ci, (None, None))
    return fmt(value) + (f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else "")
