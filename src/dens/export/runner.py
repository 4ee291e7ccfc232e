"""ExportConfig -> :func:`run`: export the checkpoint to ONNX (fp32, plus fp16 on request), then prove each
graph against the checkpoint and write its parity report beside it.

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
from dens.export.onnx import DEFAULT_OPSET, OPSETS, export_onnx, fp16_path
from dens.export.parity import DEFAULT_BATCH_SIZES, DEFAULT_MAX_IMAGES, check_parity, load_images
from dens.metadata import read_metadata
from dens.model import load_checkpoint

log = logging.getLogger(__name__)
PRECISIONS = ("fp32", "fp16")  # fp32 always; fp16 in addition when asked (--fp16)


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

    def __post_init__(self) -> None:
        if self.opset not in OPSETS:
            raise ValueError(f"opset {self.opset} is not supported: choose {OPSETS.start}..{OPSETS.stop - 1}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch sizes must be positive integers, got {self.batch_sizes!r}")
        if self.max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {self.max_images!r}")

    @property
    def precisions(self) -> tuple[str, ...]:
        """The precisions this run writes (or checks), in :data:`PRECISIONS` order."""
        return PRECISIONS if self.fp16 else PRECISIONS[:1]


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
