"""dens-qc: click options -> :class:`QcConfig` -> :func:`dens.qc.runner.run`."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from dens import show_progress
from dens.qc.runner import QcConfig, QcError, run


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
def main(files_or_dirs: tuple[Path, ...], **options) -> None:
    """A contact sheet of the canonical images the model sees for FILES_OR_DIRS: each image captioned with
    its file, manufacturer, side, view and decode route and, with --model, the call and p_dense, so a
    person checks the preprocessing (crop, orientation, grey range) at a glance."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = QcConfig(files_or_dirs, **{**options, "progress": show_progress(options["progress"])})
        result = run(cfg)
    except (QcError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"dens-qc: {result.line()}")
