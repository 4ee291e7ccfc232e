"""``dens-infer STUDIES --out preds.csv``: click options -> :class:`InferConfig` -> :func:`dens.infer.runner.run`."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import click

from dens import show_progress
from dens.commands import EXIT_NOTHING_SCORED, PULL_AUTH_OPTIONS, flag_option, progress_option, scoring_options
from dens.infer.config import (
    ENGINES,
    EXIT_ERRORS,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    EXIT_USAGE,
    PRECISIONS,
    RETRIEVES,
    InferConfig,
)
from dens.pull import is_remote
from dens.pull.source import DEFAULT_AE_TITLE, DEFAULT_MAX_ANSWER_MIB, DEFAULT_MOVE_PORT

_EPILOG = f"""\b
Exit status: 0 every file ok or skipped, some scored; {EXIT_ERRORS} the run finished but --out holds
'error' rows (see their reason, pull_failed for an instance a PACS did not deliver; --retry-errors does
them again), or a pulled study's instances could not be listed; {EXIT_NOTHING_SCORED} nothing scored:
the run finished but no file gave an image to call (every one skipped or an error: plain
images without --plain-images, reports, unusable files; their rows say why); {EXIT_FAILED} the
run could not start or go on (no model, no GPU for an explicit --device, an existing --out,
another run writing --out, no files in STUDIES, a PACS that cannot be reached, refuses the
credentials or finds no study, an output that cannot be written); {EXIT_USAGE} bad options;
{EXIT_INTERRUPTED} interrupted, {EXIT_TERMINATED} terminated (continue with --resume).
"""


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so the run stops as it does on Ctrl-C (and, like Ctrl-C, past any
    ``except Exception``)."""


def _terminate(signum, frame) -> None:
    raise _Terminated


_PULL = (
    click.option(
        "--study-date",
        default=None,
        metavar="DATE[-DATE]",
        help="PACS: the studies of this StudyDate, YYYYMMDD, or of a range YYYYMMDD-YYYYMMDD (an end may be open).",
    ),
    click.option(
        "--since",
        default=None,
        metavar="Nh|Nd",
        help="PACS: the studies of the last N hours or days (24h, 7d): a StudyDate range ending today.",
    ),
    click.option(
        "--modality",
        default=None,
        metavar="CODE",
        help="PACS: only studies holding this modality (ModalitiesInStudy) [default: MG; with --study-uid, any].",
    ),
    click.option(
        "--study-uid",
        "study_uid",
        multiple=True,
        metavar="UID",
        help="PACS: pull this study (repeatable), instead of a search by date.",
    ),
    click.option(
        "--query",
        "query",
        multiple=True,
        metavar="KEY=VALUE",
        help="PACS: one more matching key of the study search (repeatable), a DICOM keyword: AccessionNumber=A123, "
        "PatientID=P1, InstitutionName=...",
    ),
    click.option(
        "--pull-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="PACS: where the pulled files are kept, as STUDY_UID/SERIES_UID/SOP_UID.dcm; Grad-CAM and the review "
        "page read them later [default: <--out stem>.pulled beside --out].",
    ),
    *PULL_AUTH_OPTIONS,
    click.option(
        "--max-answer-mib",
        type=click.IntRange(min=1),
        default=None,
        help=f"DICOMweb: the longest answer read from the server (an instance, a listing), in MiB; a longer "
        f"instance is an error row, however the server sends it [default: {DEFAULT_MAX_ANSWER_MIB}].",
    ),
    click.option(
        "--ae-title",
        default=None,
        metavar="AET",
        help=f"DIMSE: dens's AE title, calling the PACS and receiving its C-MOVE [default: {DEFAULT_AE_TITLE}].",
    ),
    click.option(
        "--retrieve",
        type=click.Choice(RETRIEVES),
        default=None,
        help="DIMSE: move (C-MOVE to dens's own storage SCP on --move-port; the PACS must know dens's AE title, "
        "address and port) or get (C-GET on the query's association; nothing to register) [default: move].",
    ),
    click.option(
        "--move-port",
        type=click.IntRange(1, 65535),
        default=None,
        help=f"DIMSE, --retrieve move: the port dens receives the C-MOVE on, while the pull runs "
        f"[default: {DEFAULT_MOVE_PORT}].",
    ),
)


def pull_options(command):
    """The options of a pull from a PACS (dens.pull): the query, the pull folder, and how dens reaches it."""
    for option in reversed(_PULL):
        command = option(command)
    return command


def _studies(ctx: click.Context, param: click.Parameter, value: str) -> Path | str:
    """STUDIES: a PACS's URL as it is (its checks are the config's), else a folder or manifest that exists."""
    if is_remote(value):
        return value
    if not Path(value).exists():
        raise click.BadParameter(
            f"{value!r} does not exist: give a folder of studies, a manifest (.csv, .parquet), a DICOMweb URL "
            "(https://HOST/dicom-web) or dicom://AET@HOST:PORT"
        )
    return Path(value)


@click.command(epilog=_EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("studies", callback=_studies)
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
    "--allow-modified-model",
    is_flag=True,
    help="Score a model whose graph or metadata was edited after dens-export signed it, with a loud warning "
    "[default: refuse it; re-export instead].",
)
@scoring_options
@click.option(
    "--resume",
    is_flag=True,
    help="Continue a killed run: skip the files --out already has a row for (from a PACS: the instances whose SOP "
    "Instance UID has one, which are not fetched again).",
)
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
@progress_option
@flag_option
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
    help="Only the files whose path hashes to shard I of N (0-based), for N array jobs of a scheduler "
    "(Slurm, Kubernetes); join their outputs with dens-merge. The run records its shard, model and inputs "
    "beside --out (<stem>.shard.json), so that dens-merge can check the set is whole.",
)
@click.option(
    "--sr",
    "sr",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="After inference, write one DICOM density SR per exam into this folder (<StudyInstanceUID>.sr.dcm): each "
    "breast with a usable view gets its composition, the exam the denser breast's; a missing view or side is named "
    "and the SR marked PARTIAL. Plain images get no SR.",
)
@pull_options
@click.option("-v", "--verbose", is_flag=True, help="Log every skipped or failed file.")
def main(gradcam: Path | None, checkpoint: Path | None, verbose: bool, **options) -> None:
    """Classify breast density (BI-RADS A-D) for every file under STUDIES: a folder; a CSV/Parquet
    manifest with a 'path' column, and optionally identity columns (patient_id, study_uid or study_id,
    accession, laterality L/R, view CC/MLO), which name plain images and fill what a DICOM header leaves
    out; or a PACS to pull the studies of a query from, a DICOMweb base URL (https://HOST/dicom-web) or
    dicom://CALLED_AET@HOST:PORT (C-FIND, then C-MOVE or C-GET), the files kept in --pull-dir. One row per
    file in --out (status ok | skipped | error, with a reason), plus breast- and exam-level calls beside it."""
    from dens.infer.runner import InferError, run  # here: spawned workers import this module

    try:
        cfg = InferConfig(**options)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    signal.signal(signal.SIGTERM, _terminate)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("PIL", "pydicom", "matplotlib", "highdicom", "dicomweb_client"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # pynetdicom logs a refused connection as an error of its own; the pull says it again, with what to check.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING if verbose else logging.CRITICAL)
    try:
        summary = run(cfg)
    except InferError as exc:
        click.echo(f"dens-infer: error: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (_Terminated)
        what, status = (
            ("terminated", EXIT_TERMINATED) if isinstance(exc, _Terminated) else ("interrupted", EXIT_INTERRUPTED)
        )
        click.echo(f"\ndens-infer: {what}; the rows written so far are in {cfg.out}: continue with --resume", err=True)
        sys.exit(status)
    summary.print()
    if gradcam is not None:
        _gradcam(summary, gradcam, checkpoint, cfg.progress)
    sys.exit(summary.exit_code)


def _gradcam(summary, out_dir: Path, checkpoint: Path | None, progress: bool | None) -> None:
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
                    model=summary.model,
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
    report = table.attrs.get("report")
    click.echo(
        f"dens-infer: --gradcam: {table.attrs['summary'].line()}; maps in {out_dir}"
        + (f"; review page {report}" if report else "")
    )
