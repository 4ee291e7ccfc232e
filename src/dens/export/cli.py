"""dens-export: click options -> ExportConfig -> :func:`run` (export, then parity, per precision)."""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from dens import runs, show_progress
from dens.export.onnx import DEFAULT_OPSET, OPSETS, export_onnx, fp16_path
from dens.export.parity import DEFAULT_BATCH_SIZES, DEFAULT_MAX_IMAGES, check_parity, load_images
from dens.metadata import OnnxMetadataError, read_metadata
from dens.model import CheckpointError, load_checkpoint

log = logging.getLogger(__name__)
PARITY_FAILED = 2  # the exit status when a graph does not match its checkpoint


@dataclass(frozen=True)
class ExportConfig:
    """Everything one dens-export run needs. ``checkpoint`` None: the newest run's best.pt; ``out`` None:
    ``model.onnx`` beside the checkpoint. ``check_only``: no export, parity of the existing file(s) only."""

    checkpoint: Path | None = None
    out: Path | None = None
    fp16: bool = False
    images: Path | None = None
    opset: int = DEFAULT_OPSET
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    optimize: bool = True
    max_images: int = DEFAULT_MAX_IMAGES
    check_only: bool = False
    progress: bool = True


def parity_report_path(onnx_path: str | os.PathLike) -> Path:
    """``model.onnx`` -> ``model.parity.json``; ``model.fp16.onnx`` -> ``model.fp16.parity.json``."""
    return Path(onnx_path).with_suffix(".parity.json")


def resolve_paths(cfg: ExportConfig) -> tuple[Path, Path]:
    """(checkpoint, fp32 model path) for ``cfg``. Checking an existing file without ``--checkpoint`` uses the
    checkpoint its metadata names."""
    checkpoint = cfg.checkpoint
    if checkpoint is None and cfg.check_only and cfg.out is not None:
        named = Path(read_metadata(cfg.out).get("checkpoint_path") or "")
        if not named.is_file():
            raise FileNotFoundError(f"{cfg.out} was exported from {named}, which is not found: name the checkpoint "
                                    "with --checkpoint")  # fmt: skip
        checkpoint = named
    if checkpoint is None:
        checkpoint = runs.latest_file("best.pt")
    return Path(checkpoint), Path(cfg.out) if cfg.out is not None else Path(checkpoint).parent / "model.onnx"


def run(cfg: ExportConfig) -> dict[str, Any]:
    """Export (unless ``check_only``) and check parity; writes each model's report beside it. Returns
    ``{"passed", "checkpoint", "models": [{"path", "precision", "report_path", "report"}]}``."""
    checkpoint_path, out = resolve_paths(cfg)
    ckpt = load_checkpoint(checkpoint_path)
    images = None
    if cfg.images is not None:  # loaded once for both precisions
        images = load_images(cfg.images, ckpt, max_images=cfg.max_images, progress=cfg.progress)
    models = []
    for path, fp16 in [(out, False)] + ([(fp16_path(out), True)] if cfg.fp16 else []):
        if cfg.check_only:
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: export it first (dens-export --onnx without --check-only)")
        else:
            log.info("exporting %s -> %s (%s)", checkpoint_path, path, "fp16" if fp16 else "fp32")
            export_onnx(checkpoint_path, path, opset=cfg.opset, fp16=fp16, optimize=cfg.optimize, checkpoint=ckpt)
        report = check_parity(path, ckpt, images=images, batch_sizes=cfg.batch_sizes, progress=cfg.progress)
        report_path = parity_report_path(path)
        report_path.write_text(json.dumps(report, indent=2) + "\n")
        models.append({"path": path, "precision": report["precision"], "report_path": report_path, "report": report})
    return {"passed": all(m["report"]["passed"] for m in models), "checkpoint": checkpoint_path, "models": models}


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
    if r.get("max_abs_prob_diff") is None:
        return f"{head}: parity FAILED before any comparison; report {model['report_path']}"
    seen = f"{r['random']['count']} random"
    if "images" in r:
        unusable = sum(r["images"]["skipped"].values()) + len(r["images"]["errors"])
        seen += f" + {r['images'].get('count', 0)} preprocessed images ({unusable} files unusable)"
    return (f"{head}: parity {'passed' if r['passed'] else 'FAILED'} on {seen} at batch "
            f"{','.join(map(str, r['batch_sizes']))}: max |Δp| {r['max_abs_prob_diff']:.2g} "
            f"(≤ {r['thresholds']['prob_atol']:g}), argmax agreement {r['argmax_agreement']:.1%}; "
            f"report {model['report_path']}")  # fmt: skip


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--onnx", "onnx_format", is_flag=True, help="Export to ONNX (the one format so far; required).")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path),
              help="Checkpoint to export [default: runs/latest/best.pt].")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="ONNX file to write [default: model.onnx beside the checkpoint].")
@click.option("--fp16", is_flag=True, help="Also write the float16 variant for GPU providers (<out>.fp16.onnx).")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of DICOM/PNG files (searched recursively) for parity on real preprocessed images.")
@click.option("--max-images", type=click.IntRange(min=1), default=DEFAULT_MAX_IMAGES, show_default=True,
              help="Usable images taken from --images.")
@click.option("--opset", type=click.IntRange(OPSETS.start, OPSETS.stop - 1), default=DEFAULT_OPSET, show_default=True,
              help="ONNX opset of the graph.")
@click.option("--batch-sizes", default=",".join(map(str, DEFAULT_BATCH_SIZES)), show_default=True,
              callback=_batch_sizes, help="Batch sizes the parity check runs every image at.")
@click.option("--optimize/--no-optimize", default=True, show_default=True,
              help="Save ORT's provider-independent (BASIC) graph optimisation into the file.")
@click.option("--check-only", is_flag=True, help="Do not export: check parity of the existing --out file(s).")
@click.option("--progress/--no-progress", default=None, help="Progress bars [default: when stderr is a terminal].")
def main(onnx_format: bool, **options) -> None:
    """Export a dens checkpoint to ONNX (uint8 image in; probs and logits out; its configuration in the
    file's metadata) and prove it against PyTorch. Exits with status 2 when parity fails."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # pydicom logs a traceback for every decoder plugin that fails before another succeeds; the parity report
    # records each file's outcome (used, skipped with a reason, error) instead.
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    if not onnx_format:
        raise click.UsageError("choose the export format: --onnx")
    cfg = ExportConfig(**{**options, "progress": show_progress(options["progress"])})
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
            click.echo(f"dens-export: PARITY FAILED for {model['path']}: it does not match {result['checkpoint']}; "
                       f"do not use it. {listed}. Details: {model['report_path']}", err=True)  # fmt: skip
        sys.exit(PARITY_FAILED)
