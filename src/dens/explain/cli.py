"""dens-gradcam: click options -> :class:`GradcamConfig` -> :func:`dens.explain.runner.run`.
dens-qc: click options -> :class:`QcConfig` -> :func:`dens.explain.qc.run`.
dens-verdicts: click arguments -> :class:`VerdictsConfig` -> :func:`dens.explain.verdicts.run`."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from dens import show_progress
from dens.explain import qc, verdicts
from dens.explain.runner import DEVICES, THUMBNAILS, GradcamConfig, GradcamError, run
from dens.flags import parse_flag


def _check_flag(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    try:
        parse_flag(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    return value


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
    callback=_check_flag,
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


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("files_or_dirs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The contact sheet to write (.png or .jpg).",
)
@click.option(
    "--model",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="An ONNX model from dens-export: its preprocessing is used and each image shows its call and "
    "p_dense [default: no calls, the default preprocessing].",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=48,
    show_default=True,
    help="Images on the sheet: the first usable files, folders walked in sorted order.",
)
@click.option("--columns", type=click.IntRange(min=1), default=8, show_default=True, help="Images per row.")
@click.option("--plain-images", is_flag=True, help="Read PNG/PGM/TIFF/JPEG files too (else each is a skipped file).")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Decode processes [min(4, cores)].")
@click.option("--progress/--no-progress", default=None, help="Progress bars [default: when stderr is a terminal].")
def qc_main(files_or_dirs: tuple[Path, ...], **options) -> None:
    """A contact sheet of the canonical images the model sees for FILES_OR_DIRS: each image captioned with
    its file, manufacturer, side, view and decode route and, with --model, the call and p_dense, so a
    person checks the preprocessing (crop, orientation, grey range) at a glance."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = qc.QcConfig(files_or_dirs, **{**options, "progress": show_progress(options["progress"])})
        result = qc.run(cfg)
    except (qc.QcError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"dens-qc: {result.line()}")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("exams_csv", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("verdicts_csv", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write EXAMS_CSV with the columns verdict, reviewer_density and reviewed_at here [default: report only].",
)
def verdicts_main(exams_csv: Path, verdicts_csv: Path, out: Path | None) -> None:
    """Merge a reviewer's verdicts (the review page's 'Export verdicts' CSV) into EXAMS_CSV (dens-infer's
    preds.exam.csv) and report how far model and reviewer agree: the share of calls accepted, dense/non-dense
    agreement and Cohen's kappa over A-D, with their counts. A verdict for an exam EXAMS_CSV lacks, or made on
    another call or identity than EXAMS_CSV's, is an error and nothing is merged (exit 1)."""
    try:
        result = verdicts.run(verdicts.VerdictsConfig(exams_csv, verdicts_csv, out))
    except verdicts.VerdictsError as exc:
        raise click.ClickException(str(exc)) from exc
    for line in result.lines():
        click.echo(line)
    if out is not None:
        click.echo(f"merged: {out}")
