"""What dens-train prints when a run ends: the test split's table and one line that says what was trained on what,
from where, and how well (quadratic kappa with its interval at each level)."""

from __future__ import annotations

import click

from dens.figures import metrics
from dens.train.config import TrainConfig


def print_result(cfg: TrainConfig, result: dict, seconds: float) -> None:
    """Print the summary of a finished run (``result``: what :func:`dens.train.loop.run` returned)."""
    test, best = result["test"], result["best"]
    calibration = result["calibration"]
    temperature = f"temperature {calibration['temperature']:.3f}"
    if not calibration["kept"]:
        temperature += f", not calibrated: {calibration['reason']}"
    for warning in result["warnings"]:  # said at the start too; repeated here, where the figures are read
        click.echo(f"dens-train: warning: {warning}", err=True)
    click.echo(f"\ntest split ({cfg.out}, best epoch {best['epoch']}, {temperature}):")
    click.echo(metrics.table({level: test[level] for level in ("image", "breast", "exam")}))
    images = sum(result["data"][s]["images"] for s in ("train", "val", "test"))
    kappa = {level: metrics.fmt(test[level]["kappa_quadratic"]) for level in ("image", "breast", "exam")}
    for level in kappa:
        low, high = test[level].get("ci", {}).get("kappa_quadratic", (None, None))
        if low is not None and high is not None:
            kappa[level] += f" [{low:.3f}, {high:.3f}]"
    start_weights = result["weights"]["start"]
    start_weights = "ImageNet weights" if start_weights == "imagenet" else f"the weights in {start_weights}"
    if result["weights"]["from_scratch"]:
        start_weights = "random weights: the model STARTED FROM SCRATCH (--weights none), not from pretrained ones"
    click.echo(
        f"dens-train: {images} images ({result['data']['unusable']} unusable), {cfg.epochs} epochs in "
        f"{seconds:.0f} s from {start_weights}; test quadratic kappa (95% CI) {kappa['image']} "
        f"(image), {kappa['breast']} (breast), {kappa['exam']} (exam); run and model card in {cfg.out}"
    )
