"""dens-eval: click options -> :class:`EvalConfig` -> :func:`dens.eval.runner.run`, then the figures' table
and a one-line summary."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from dens import show_progress
from dens.eval.runner import EvalConfig, run
from dens.figures import evaluation, metrics
from dens.scoring import TORCH_DEVICES as DEVICES


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for metrics.json, summary.md, unusable.csv and the PNGs.",
)
@click.option(
    "--split",
    default=None,
    help="Score only the rows whose split column holds this value, e.g. test with a dens-train run's split.csv.",
)
@click.option(
    "--bootstrap",
    type=click.IntRange(min=0),
    default=evaluation.RESAMPLES,
    show_default=True,
    help="Draws of patients for the 95% intervals (0: none).",
)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="The bootstrap's seed.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Decode processes [min(4, cores)].")
@click.option(
    "--device",
    type=click.Choice(DEVICES),
    default="auto",
    show_default=True,
    help="Where a .pt checkpoint runs (auto: CUDA when there is one); an ONNX model runs on the CPU.",
)
@click.option("--overwrite", is_flag=True, help="Replace an earlier dens-eval output in --out.")
@click.option("--progress/--no-progress", default=None, help="Progress bars [default: when stderr is a terminal].")
def main(progress: bool | None, **options) -> None:
    """Score MODEL (an ONNX file from dens-export, or a dens-train .pt checkpoint) on DATA (a labelled folder
    or CSV, as dens-train's --data takes) and write the figures of dens-train's test section into --out."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = EvalConfig(**options, progress=show_progress(progress))
        result = run(cfg)
    except (ValueError, FileNotFoundError) as exc:
        raise click.UsageError(str(exc)) from exc
    for warning in result.metrics["warnings"]:
        click.echo(f"dens-eval: warning: {warning}", err=True)
    figures = result.metrics["figures"]
    click.echo(metrics.table({level: figures[level] for level in evaluation.LEVELS}))
    click.echo(result.line())


if __name__ == "__main__":
    main()
