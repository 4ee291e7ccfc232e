"""What dens-export is asked to do: :class:`ExportConfig`, which checks itself, and its choice lists and defaults
(opsets, batch sizes, image counts, int8 formats), which the exporter, the parity checks and the quantizer take
from here.

Nothing heavy at import (no torch, no onnx): dens-export's command-line module imports this, so that its usage
errors and --help answer at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_OPSET = 17
OPSETS = range(13, 21)  # what the legacy exporter writes (it warns past 20); 13: Softmax over one axis
DEFAULT_BATCH_SIZES = (1, 3, 8)  # parity: every image at each of these
DEFAULT_MAX_IMAGES = 32  # parity: usable images taken from --images
INT8_FORMATS = ("u8s8", "s8s8")  # activations x weights; the first is the default (dens.export.quantize)
DEFAULT_INT8_FORMAT = INT8_FORMATS[0]
DEFAULT_CALIBRATION_IMAGES = 300
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
