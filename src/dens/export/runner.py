"""ExportConfig -> :func:`run`: export the checkpoint to ONNX (fp32, plus fp16 and int8 on request), then prove
each graph (fp32 and fp16 against the checkpoint, int8 against the fp32 graph) and write its parity report
beside it.

Which opsets the exporter writes is :mod:`dens.export.onnx`'s to say; the config takes that list from there.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dens import runs
from dens.artifact.metadata import read_metadata
from dens.artifact.model import load_checkpoint
from dens.export.onnx import DEFAULT_OPSET, OPSETS, export_onnx, fp16_path
from dens.export.parity import DEFAULT_BATCH_SIZES, DEFAULT_MAX_IMAGES, check_parity, load_images
from dens.export.quantize import (
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_INT8_FORMAT,
    INT8_FORMATS,
    check_int8_parity,
    int8_path,
    quantize_int8,
    split_calibration,
)

log = logging.getLogger(__name__)
PRECISIONS = ("fp32", "fp16", "int8")  # fp32 always; fp16 (--fp16) and int8 (--int8) in addition when asked


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
    int8: bool = False
    calibrate: Path | None = None  # int8: folder of mammograms, part calibrates the ranges, part is held out
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES  # usable images read from it, held-out part included
    int8_format: str = DEFAULT_INT8_FORMAT

    def __post_init__(self) -> None:
        if self.opset not in OPSETS:
            raise ValueError(f"opset {self.opset} is not supported: choose {OPSETS.start}..{OPSETS.stop - 1}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch sizes must be positive integers, got {self.batch_sizes!r}")
        if self.max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {self.max_images!r}")
        if self.int8 and self.calibrate is None:
            raise ValueError("--int8 needs calibration images: --calibrate DIR (a folder of mammograms)")
        if self.calibrate is not None and not self.int8:
            raise ValueError("--calibrate is for the int8 graph: add --int8")
        if self.calibration_images < 2:
            raise ValueError(f"calibration_images must be >= 2, got {self.calibration_images!r}")
        if self.int8_format not in INT8_FORMATS:
            raise ValueError(f"int8 format must be one of {', '.join(INT8_FORMATS)}, got {self.int8_format!r}")

    @property
    def precisions(self) -> tuple[str, ...]:
        """The precisions this run writes (or checks), in :data:`PRECISIONS` order."""
        return tuple(p for p, wanted in zip(PRECISIONS, (True, self.fp16, self.int8), strict=True) if wanted)


def parity_report_path(onnx_path: str | os.PathLike) -> Path:
    """``model.onnx`` -> ``model.parity.json``; ``model.fp16.onnx`` -> ``model.fp16.parity.json``; ``model.int8.onnx``
    -> ``model.int8.parity.json``."""
    return Path(onnx_path).with_suffix(".parity.json")


def resolve_paths(cfg: ExportConfig) -> tuple[Path, Path]:
    """(checkpoint, fp32 model path) for ``cfg``. Checking an existing file without ``--checkpoint`` uses the
    checkpoint its metadata names."""
    checkpoint = cfg.checkpoint
    if checkpoint is None and cfg.check_only and cfg.out is not None:
        named = Path(read_metadata(cfg.out).get("checkpoint_path") or "")
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
    report["calibration_folder"] = {
        "source": images.source,
        "files": images.files,
        "used": len(images.used),
        "skipped": images.skipped,
        "errors": images.errors,
    }
    report_path = parity_report_path(path)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    return {"path": path, "precision": "int8", "report_path": report_path, "report": report}
