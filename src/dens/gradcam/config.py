"""What dens-gradcam is asked to do: :class:`GradcamConfig`, which checks itself, and its choice lists.

torch-free: dens-gradcam's command-line module imports this, so that its usage errors and --help answer without
importing torch; :mod:`dens.gradcam.runner` imports torch when a run starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dens.flags import Flag
from dens.scoring import TORCH_DEVICES as DEVICES  # or cuda:N

THUMBNAILS = ("all", "flagged", "none")


class GradcamError(Exception):
    """A problem the user must fix (wrong model, missing checkpoint, not a preds.csv); the message says how."""


@dataclass(frozen=True)
class GradcamConfig:
    """Everything one Grad-CAM run needs (dens-gradcam's flags; dens-infer --gradcam fills it too).

    ``flag``: see :func:`dens.flags.parse_flag` (default: preds.csv's ``flagged`` column).
    ``model`` defaults to the newest run's ``model.onnx``, ``checkpoint`` to the one its metadata names.
    ``thumbnails``: which views the page shows: ``all`` (every ok row, so every call can be reviewed;
    decodes every file again), ``flagged`` (all views of exams with a flagged image) or ``none``.
    ``workers``: decode processes.
    """

    preds: Path
    out: Path
    model: Path | None = None
    checkpoint: Path | None = None
    flag: str | Flag | None = None
    layer: str | None = None
    batch_size: int = 8
    device: str = "auto"
    workers: int | None = None
    thumbnails: str = "all"
    report: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.thumbnails not in THUMBNAILS:
            raise ValueError(f"thumbnails must be {', '.join(THUMBNAILS)}, got {self.thumbnails!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
