"""dens-export: click options -> :class:`ExportConfig` -> :func:`dens.export.runner.run`, then a summary line per
model and the exit status (2 when parity fails)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from dens import counted, show_progress
from dens.artifact.metadata import OnnxMetadataError
from dens.export.config import (
    DEFAULT_BATCH_SIZES,
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_INT8_FORMAT,
    DEFAULT_MAX_IMAGES,
    DEFAULT_OPSET,
    INT8_FORMATS,
    OPSETS,
    ExportConfig,
)

PARITY_FAILED = 2  # the exit status when a graph does not match its checkpoint


def _batch_sizes(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"{value!r}: expected positive integers separated by commas, e.g. 1,3,8")
    return sizes


def _summary(model: dict) -> str:
    r = model["report"]
    size_mb = model["path"].stat().st_size / 2**20
    head = f"{model['path']} ({r['precision']}, opset {r['opset']}, {size_mb:.1f} MiB)"
    if r["precision"] == "int8":
        return f"{head}: {_int8_summary(r)}; report {model['report_path']}"
    if r.get("max_abs_prob_diff") is None:
        return f"{head}: parity FAILED before any comparison; report {model['report_path']}"
    seen = f"{r['random']['count']} random"
    if "images" in r:
        seen += f" + {r['images'].get('count', 0)} preprocessed images{_files_note(r['images'])}"
    return (
        f"{head}: parity {'passed' if r['passed'] else 'FAILED'} on {seen} at batch "
        f"{','.join(map(str, r['batch_sizes']))}: max |Δp| {r['max_abs_prob_diff']:.2g} "
        f"(≤ {r['thresholds']['prob_atol']:g}), argmax agreement {r['argmax_agreement']:.1%}; "
        f"report {model['report_path']}"
    )


def _files_note(images: dict) -> str:
    """What became of the other files of an image folder: those that gave no image, and those ignored as no
    image at all (a samples folder's notes, labels, readme)."""
    from dens.export.parity import ignored_note  # imported by the run already

    unusable = sum(images["skipped"].values()) + len(images["errors"])
    notes = [f"{counted(unusable, 'file')} unusable"] if unusable else []
    notes += [ignored_note(images.get("ignored", []))] if images.get("ignored") else []
    return f" ({'; '.join(notes)})" if notes else ""


def _int8_summary(r: dict) -> str:
    calibrated = f"calibrated on {r['int8'].get('calibration_images', '?')} images"
    if "calibration_folder" in r:
        calibrated += _files_note(r["calibration_folder"])
    if r.get("argmax_agreement") is None:
        return f"{calibrated}; parity FAILED before any comparison"
    t = r["thresholds"]
    return (
        f"{calibrated}; parity with fp32 {'passed' if r['passed'] else 'FAILED'} on {r['images']} held-out images: "
        f"dense-call agreement {r['dense_agreement']:.1%} (≥ {t['dense_agreement']:.0%}), argmax agreement "
        f"{r['argmax_agreement']:.1%} (≥ {t['argmax_agreement']:.0%}), mean |Δp| {r['mean_abs_prob_diff']:.2g} "
        f"(≤ {t['mean_abs_prob_diff']:g}), max |Δp| {r['max_abs_prob_diff']:.2g}, kappa {r['kappa']:.3f}"
    )


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--onnx", "onnx_format", is_flag=True, help="Export to ONNX (the one format so far; required).")
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Checkpoint to export [default: runs/latest/best.pt].",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="ONNX file to write [default: model.onnx beside the checkpoint].",
)
@click.option("--fp16", is_flag=True, help="Also write the float16 variant for GPU providers (<out>.fp16.onnx).")
@click.option(
    "--images",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Folder of DICOM/PNG files (searched recursively) for parity on real preprocessed images.",
)
@click.option(
    "--max-images",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_IMAGES,
    show_default=True,
    help="Usable images taken from --images.",
)
@click.option(
    "--opset",
    type=click.IntRange(OPSETS.start, OPSETS.stop - 1),
    default=DEFAULT_OPSET,
    show_default=True,
    help="ONNX opset of the graph.",
)
@click.option(
    "--batch-sizes",
    default=",".join(map(str, DEFAULT_BATCH_SIZES)),
    show_default=True,
    callback=_batch_sizes,
    help="Batch sizes the parity check runs every image at.",
)
@click.option(
    "--optimize/--no-optimize",
    default=True,
    show_default=True,
    help="Save ORT's provider-independent (BASIC) graph optimisation into the file.",
)
@click.option(
    "--int8",
    is_flag=True,
    help="Also write the int8 variant for CPUs (<out>.int8.onnx): static quantization calibrated on --calibrate, "
    "checked against the fp32 graph on held-out images.",
)
@click.option(
    "--calibrate",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="With --int8: folder of DICOM/PNG mammograms (searched recursively, sorted) whose first "
    "--calibration-images usable images calibrate the int8 ranges, 20% of them (at least 40 where there "
    "are 80) held out for parity.",
)
@click.option(
    "--calibration-images",
    type=click.IntRange(min=2),
    default=DEFAULT_CALIBRATION_IMAGES,
    show_default=True,
    help="Usable images taken from --calibrate, the held-out part included.",
)
@click.option(
    "--int8-format",
    type=click.Choice(INT8_FORMATS),
    default=DEFAULT_INT8_FORMAT,
    show_default=True,
    help="Activations x weights. u8s8: fast on every x86 CPU (AVX2 and VNNI), weights in a 7-bit range; "
    "s8s8: full 8-bit weights, measured at about fp32's speed on x86 CPUs (bench/int8.py): for other CPUs.",
)
@click.option("--check-only", is_flag=True, help="Do not export: check parity of the existing --out file(s).")
@click.option("--progress/--no-progress", default=None, help="Progress bars [default: when stderr is a terminal].")
def main(onnx_format: bool, **options) -> None:
    """Export a dens checkpoint to ONNX (uint8 image in; probs and logits out; its configuration in the
    file's metadata) and prove it against PyTorch (the int8 variant: against the fp32 graph, on decisions).
    Exits with status 2 when parity fails."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # pydicom logs a traceback for every decoder plugin that fails before another succeeds; the parity report
    # records each file's outcome (used, skipped with a reason, error) instead.
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    if not onnx_format:
        raise click.UsageError("choose the export format: --onnx")
    try:
        cfg = ExportConfig(**{**options, "progress": show_progress(options["progress"])})
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    # Here, once the options are known to be good: torch and onnx take seconds to import.
    from dens.artifact.model import CheckpointError
    from dens.export.runner import run

    try:
        result = run(cfg)
    except (CheckpointError, OnnxMetadataError, FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    for model in result["models"]:
        click.echo(f"dens-export: {_summary(model)}")
    failed = [m for m in result["models"] if not m["report"]["passed"]]
    if failed:
        for model in failed:
            failures = model["report"]["failures"]
            listed = "; ".join(failures[:3]) + (f" (+{len(failures) - 3} more)" if len(failures) > 3 else "")
            click.echo(
                f"dens-export: PARITY FAILED for {model['path']}: it does not match "
                f"{model['report'].get('reference_path', result['checkpoint'])}; "
                f"do not use it. {listed}. Details: {model['report_path']}",
                err=True,
            )
        sys.exit(PARITY_FAILED)
