"""dens-gradcam: click options -> :class:`GradcamConfig` -> :func:`dens.gradcam.runner.run`."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from dens import show_progress
from dens.commands import check_flag
from dens.gradcam.config import DEVICES, THUMBNAILS, GradcamConfig, GradcamError


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("preds", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the overlay figures (<sop_uid>.png), raw maps (<sop_uid>.npy, the model's units, its input "
    "size, chest wall left) and thumbnails.",
)
@click.option(
    "--model",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The ONNX model that wrote PREDS [default: runs/latest/model.onnx]; its sha256 must match.",
)
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The PyTorch checkpoint the ONNX model was exported from [default: the one its metadata names].",
)
@click.option(
    "--flag",
    callback=check_flag,
    help="Which rows get maps: classes ('C,D') or a threshold ('p_dense>=0.5') [default: PREDS' flagged column].",
)
@click.option("--layer", default=None, help="Target layer, dotted [default: backbone.layer4.-1, the last block].")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Decode processes [min(4, cores)].")
@click.option(
    "--thumbnails",
    type=click.Choice(THUMBNAILS),
    default="all",
    show_default=True,
    help="Views shown on the review page: every file (decodes each again, at the display size), all views of "
    "exams with a flagged image, or none.",
)
@click.option(
    "--report/--no-report",
    default=True,
    show_default=True,
    help="Write the review page beside PREDS (<name>.report.html for <name>.csv).",
)
@click.option("--progress/--no-progress", default=None, help="Progress bars [default: when stderr is a terminal].")
def main(**options) -> None:
    """Grad-CAM maps for the flagged rows of an existing PREDS (a dens-infer preds.csv), without rerunning
    inference: an overlay and a raw map per flagged image, the preds.csv `gradcam` column, and the review page
    (NAME.report.html beside NAME.csv)."""
    from dens.gradcam.runner import run  # here: torch is imported once the options are known to be good

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = GradcamConfig(**{**options, "progress": show_progress(options["progress"])})
    try:
        table = run(cfg)
    except (GradcamError, ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    report = table.attrs.get("report")
    click.echo(
        f"dens-gradcam: {table.attrs['summary'].line()}; maps in {cfg.out}"
        + (f"; review page {report}" if report else "")
    )
