"""ExportConfig -> :func:`run`: export the checkpoint to ONNX (fp32, plus fp16 and int8 on request), then prove
each graph (fp32 and fp16 against the checkpoint, int8 against the fp32 graph) and write its parity report
beside it.

The settings, their choice lists and defaults are :mod:`dens.export.config`'s.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from dens import runs
from dens.artifact.metadata import ModelModifiedError, read_metadata
from dens.artifact.model import load_checkpoint
from dens.export.config import ExportConfig
from dens.export.onnx import export_onnx, fp16_path
from dens.export.parity import check_metadata, check_parity, load_images
from dens.export.quantize import check_int8_parity, int8_path, quantize_int8, split_calibration

log = logging.getLogger(__name__)


def parity_report_path(onnx_path: str | os.PathLike) -> Path:
    """``model.onnx`` -> ``model.parity.json``; ``model.fp16.onnx`` -> ``model.fp16.parity.json``; ``model.int8.onnx``
    -> ``model.int8.parity.json``."""
    return Path(onnx_path).with_suffix(".parity.json")


def resolve_paths(cfg: ExportConfig) -> tuple[Path, Path]:
    """(checkpoint, fp32 model path) for ``cfg``. Checking an existing file without ``--checkpoint`` uses the
    checkpoint its metadata names."""
    checkpoint = cfg.checkpoint
    if checkpoint is None and cfg.check_only and cfg.out is not None:
        try:
            meta = read_metadata(cfg.out)
        except ModelModifiedError as exc:  # the parity check reports it; the checkpoint is still the one named
            meta = exc.metadata
        named = Path(meta.get("checkpoint_path") or "")
        if not named.is_file():
            raise FileNotFoundError(
                f"{cfg.out} was exported from {named}, which is not found: name the checkpoint with --checkpoint"
            )
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
    for precision in cfg.precisions:
        if precision == "int8":
            models.append(_int8(cfg, ckpt, out))
            continue
        fp16 = precision == "fp16"
        path = fp16_path(out) if fp16 else out
        if cfg.check_only:
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: export it first (dens-export --onnx without --check-only)")
        else:
            log.info("exporting %s -> %s (%s)", checkpoint_path, path, precision)
            export_onnx(checkpoint_path, path, opset=cfg.opset, fp16=fp16, optimize=cfg.optimize, checkpoint=ckpt)
        report = check_parity(path, ckpt, images=images, batch_sizes=cfg.batch_sizes, progress=cfg.progress)
        report_path = parity_report_path(path)
        report_path.write_text(json.dumps(report, indent=2) + "\n")
        models.append({"path": path, "precision": report["precision"], "report_path": report_path, "report": report})
    return {"passed": all(m["report"]["passed"] for m in models), "checkpoint": checkpoint_path, "models": models}


def _int8(cfg: ExportConfig, ckpt, fp32: Path) -> dict[str, Any]:
    """Quantize the fp32 graph on part of ``cfg.calibrate`` (unless ``check_only``) and compare the two graphs on
    the rest; the same model entry as the other precisions get."""
    path = int8_path(fp32)
    images = load_images(cfg.calibrate, ckpt, max_images=cfg.calibration_images, progress=cfg.progress)
    split = split_calibration(images)
    if cfg.check_only:
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: export it first (dens-export --onnx --int8 --calibrate DIR)")
    else:
        log.info(
            "quantizing %s -> %s (int8 %s; ranges from %d images of %s, %d held out for parity)",
            fp32,
            path,
            cfg.int8_format,
            len(split.calibration),
            cfg.calibrate,
            len(split.held_out),
        )
        quantize_int8(fp32, path, split, int8_format=cfg.int8_format)
    report = check_int8_parity(path, fp32, split)
    # The int8 file's metadata against the checkpoint too: the graphs' comparison cannot see it.
    report["failures"] += [f for f in check_metadata(path, ckpt)[1] if f not in report["failures"]]
    report["passed"] = not report["failures"]
    report["calibration_folder"] = {
        "source": images.source,
        "files": images.files,
        "used": len(images.used),
        "skipped": images.skipped,
        "errors": images.errors,
        "ignored": images.ignored,
    }
    report_path = parity_report_path(path)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    return {"path": path, "precision": "int8", "report_path": report_path, "report": report}
