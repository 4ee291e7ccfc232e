"""``dens-infer STUDIES --out preds.csv``: click options -> :class:`InferConfig` -> :func:`dens.infer.runner.run`."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import click

from dens import show_progress
from dens.infer.config import (
    DEVICES,
    ENGINES,
    EXIT_ERRORS,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    EXIT_USAGE,
    PRECISIONS,
    InferConfig,
)

_EPILOG = f"""\b
Exit status: 0 every file ok or skipped; {EXIT_ERRORS} the run finished but --out holds
'error' rows (see their reason; --retry-errors does them again); {EXIT_FAILED} the run could
not start or go on (no model, no GPU for an explicit --device, an existing --out, another run
writing --out, no files in STUDIES, an output that cannot be written); {EXIT_USAGE} bad
options; {EXIT_INTERRUPTED} interrupted, {EXIT_TERMINATED} terminated (continue with --resume).
"""


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so the run stops as it does on Ctrl-C (and, like Ctrl-C, past any
    ``except Exception``)."""


def _terminate(signum, frame) -> None:
    raise _Terminated


def _check_flag(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from dens.flags import parse_flag  # here: pandas stays out of the decode workers' imports

    try:
        parse_flag(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    return value


def _check_shard(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from dens.sources import Shard

    try:
        Shard.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    return value


@click.command(epilog=_EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("studies", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("preds.csv"),
    show_default=True,
    help="preds.csv to write; preds.breast.csv and preds.exam.csv go beside it.",
)
@click.option(
    "--model",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="ONNX model from dens-export [default: runs/latest/model.onnx]. Image size and preprocessing "
    "come from its metadata.",
)
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default=None,
    help="Run the variant dens-export wrote beside --model: int8 (model.int8.onnx; the fast one on CPUs), fp16 "
    "(model.fp16.onnx; GPUs) or fp32 (model.onnx) [default: the --model file as it is].",
)
@click.option(
    "--device",
    type=click.Choice(DEVICES),
    default="auto",
    show_default=True,
    help="auto: TensorRT, then CUDA, then CPU (GPU ones only where a GPU is present). An explicit GPU "
    "choice that cannot be honoured is an error.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Images per model call [default: 4 on CPU, 64 on CUDA/TensorRT].",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Decode processes [default: CPU: all cores, at a lower priority than the model, which uses "
    "all of them too; GPU: cores - 1].",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="ONNX Runtime intra-op threads [default: CPU: all cores; GPU: 1].",
)
@click.option("--resume", is_flag=True, help="Continue a killed run: skip the files --out already has a row for.")
@click.option(
    "--retry-errors",
    is_flag=True,
    help="Continue as --resume does, and do again the files whose rows in --out are errors.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@click.option(
    "--plain-images",
    is_flag=True,
    help="Read PNG/PGM/TIFF/JPEG files too (as the breast image, like a DICOM's pixels); without it each is a "
    "skipped row (plain_image_not_requested), so pictures in an archive get no density call.",
)
@click.option("--progress/--no-progress", default=None, help="Progress bar [default: when stderr is a terminal].")
@click.option(
    "--flag",
    "flag",
    default=None,
    metavar="RULE",
    callback=_check_flag,
    help="Which calls are flagged for review: classes ('C,D', the default) or a threshold ('p_dense>=0.5', 'p_D>0.3').",
)
@click.option(
    "--gradcam",
    "gradcam",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="After inference, compute Grad-CAM (PyTorch) for the flagged images into this folder, add a "
    "'gradcam' column to --out and write the review page beside it (preds.csv -> preds.report.html).",
)
@click.option(
    "--checkpoint",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="PyTorch checkpoint for --gradcam [default: the one named in the model's metadata; its sha256 must match].",
)
@click.option(
    "--engine",
    type=click.Choice(ENGINES),
    default="local",
    show_default=True,
    help="local: decode processes on this machine; ray: Ray Data on a Ray cluster (pip install 'dens[ray]'; "
    "STUDIES on a filesystem every node mounts).",
)
@click.option(
    "--ray-address",
    default=None,
    metavar="ADDRESS",
    help="--engine ray: 'auto' (the cluster this machine is a node of), 'HOST:PORT' or 'ray://HOST:10001' "
    "[default: start a local Ray].",
)
@click.option(
    "--shard",
    default=None,
    metavar="I/N",
    callback=_check_shard,
    help="Only the files whose path hashes to shard I of N (0-based), for N array jobs of a scheduler "
    "(Slurm, Kubernetes); join their outputs with dens-merge.",
)
@click.option(
    "--sr",
    "sr",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="After inference, write one DICOM density SR per exam into this folder (<StudyInstanceUID>.sr.dcm; "
    "only screening-complete exams get a call).",
)
@click.option("-v", "--verbose", is_flag=True, help="Log every skipped or failed file.")
def main(
    studies: Path,
    out: Path,
    model: Path | None,
    precision: str | None,
    device: str,
    batch_size: int | None,
    workers: int | None,
    threads: int | None,
    resume: bool,
    retry_errors: bool,
    overwrite: bool,
    plain_images: bool,
    progress: bool | None,
    flag: str | None,
    gradcam: Path | None,
    checkpoint: Path | None,
    engine: str,
    ray_address: str | None,
    shard: str | None,
    sr: Path | None,
    verbose: bool,
) -> None:
    """Classify breast density (BI-RADS A-D) for every file under STUDIES (a folder, or a CSV/Parquet
    manifest with a 'path' column): one row per file in --out (status ok | skipped | error, with a reason),
    plus breast- and exam-level calls beside it."""
    from dens.infer.runner import InferError, run  # here: spawned workers import this module
    from dens.scoring.model import ModelError, resolve_model
    from dens.scoring.runtime import model_for_precision

    if overwrite and (resume or retry_errors):
        raise click.UsageError(
            f"{'--retry-errors' if retry_errors else '--resume'} and --overwrite contradict each other: choose one"
        )
    signal.signal(signal.SIGTERM, _terminate)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("PIL", "pydicom", "matplotlib", "highdicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if precision is not None:
        try:
            model = model_for_precision(resolve_model(model), precision)
        except ModelError as exc:
            click.echo(f"dens-infer: error: {exc}", err=True)
            sys.exit(EXIT_FAILED)
    cfg = InferConfig(
        studies=studies,
        out=out,
        model=model,
        device=device,
        batch_size=batch_size,
        workers=workers,
        threads=threads,
        resume=resume,
        overwrite=overwrite,
        progress=progress,
        flag=flag,
        plain_images=plain_images,
        retry_errors=retry_errors,
        sr=sr,
        engine=engine,
        ray_address=ray_address,
        shard=shard,
    )
    try:
        summary = run(cfg)
    except InferError as exc:
        click.echo(f"dens-infer: error: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (_Terminated)
        what, status = (
            ("terminated", EXIT_TERMINATED) if isinstance(exc, _Terminated) else ("interrupted", EXIT_INTERRUPTED)
        )
        click.echo(f"\ndens-infer: {what}; the rows written so far are in {out}: continue with --resume", err=True)
        sys.exit(status)
    click.echo(summary.line())
    for warning in summary.warnings():
        click.echo(f"dens-infer: warning: {warning}", err=True)
    click.echo(f"dens-infer: wrote {summary.out}, {summary.breast_csv}, {summary.exam_csv}")
    if sr is not None:
        click.echo(f"dens-infer: wrote {len(summary.reports)} density SRs (one per exam) to {sr}")
    if gradcam is not None:
        _gradcam(summary, gradcam, model, checkpoint, progress)
    if summary.errors or summary.already_errors:
        earlier = f" ({summary.already_errors} from the earlier run)" if summary.already_errors else ""
        click.echo(
            f"dens-infer: {summary.errors + summary.already_errors} files could not be read{earlier}: their rows in "
            f"{summary.out} have status 'error' and say why (exit status {EXIT_ERRORS}); --retry-errors does them "
            "again",
            err=True,
        )
    sys.exit(summary.exit_code)


def _gradcam(summary, out_dir: Path, model: Path | None, checkpoint: Path | None, progress: bool | None) -> None:
    """Grad-CAM for the rows dens-infer flagged, on the device the ONNX model ran on."""
    from dens.gradcam import GradcamConfig, GradcamError, run  # torch: imported only when asked for
    from dens.preds.lock import OutputLocked, output_lock

    device = "cuda" if summary.provider.lower().startswith(("cuda", "tensorrt")) else "cpu"
    try:
        with output_lock(summary.out):  # it rewrites preds.csv: no other run may append meanwhile
            table = run(
                GradcamConfig(
                    summary.out,
                    out_dir,
                    model=model,
                    checkpoint=checkpoint,
                    device=device,
                    progress=show_progress(progress),
                )
            )
    except (GradcamError, OutputLocked, OSError) as exc:
        click.echo(
            f"dens-infer: --gradcam failed: {exc}; the predictions in {summary.out} are complete "
            "(rerun `dens-gradcam` on them)",
            err=True,
        )
        sys.exit(EXIT_FAILED)
    click.echo(table.attrs["summary"].line())


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("shards", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The merged preds.csv.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@click.option(
    "--flag", "flag", default=None, metavar="RULE", callback=_check_flag, help="As dens-infer's (default C,D)."
)
def merge_main(shards: tuple[Path, ...], out: Path, overwrite: bool, flag: str | None) -> None:
    """Join the preds.csv files of `dens-infer --shard i/N` runs (SHARDS) into one --out, and write its
    breast and exam CSVs from all of them (an exam's views may lie in several shards). Exit status as
    dens-infer's: 3 when the merged file holds error rows."""
    from dens.flags import parse_flag
    from dens.preds.merge import MergeError, merge
    from dens.preds.writer import CorruptOutput, OutputExists

    try:
        merged = merge(shards, out, overwrite=overwrite, rule=parse_flag(flag))
    except (MergeError, CorruptOutput, OutputExists, OSError) as exc:
        click.echo(f"dens-merge: error: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    click.echo(
        f"dens-merge: {merged.rows} rows from {merged.shards} shards ({merged.errors} errors) into {merged.out}; "
        f"wrote {merged.breast_csv}, {merged.exam_csv}"
    )
    sys.exit(EXIT_ERRORS if merged.errors else 0)
