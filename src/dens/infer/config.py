"""What dens-infer is asked to do: :class:`InferConfig`, its choice lists and its exit statuses.

Standard library only (and dens.artifact.metadata's names, which need nothing more at import): dens-infer's
command-line module imports this, and a spawned decode worker imports that module before it starts, so
nothing heavy may load here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dens.artifact.metadata import (
    PRECISIONS as PRECISIONS,  # --precision: the variant beside the model (model.int8.onnx)
)
from dens.scoring import DEVICES as DEVICES  # --device: ONNX Runtime's

ENGINES = ("local", "ray")  # local: this machine's decode processes; ray: Ray Data on a Ray cluster
# Exit status of dens-infer (130: Ctrl-C; 143: SIGTERM).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ERRORS, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 3, 130, 143


@dataclass(frozen=True)
class InferConfig:
    """What ``dens-infer`` was asked to do. ``None`` means the default for the provider in use."""

    studies: Path
    out: Path = Path("preds.csv")
    model: Path | None = None  # default: runs/latest/model.onnx
    device: str = "auto"
    batch_size: int | None = None
    workers: int | None = None
    threads: int | None = None  # ONNX Runtime intra-op threads
    resume: bool = False
    overwrite: bool = False
    progress: bool | None = None  # None: when the terminal is interactive
    flag: str | None = None  # which calls are flagged (dens.flags.parse_flag); default C/D
    plain_images: bool = False  # read PNG/PGM/TIFF/JPEG files too (else each is a skipped row)
    retry_errors: bool = False  # resume, and do the files of the earlier error rows again
    sr: Path | None = None  # --sr DIR: one density SR per exam (dens.sr) after the run
    engine: str = "local"
    ray_address: str | None = None  # --engine ray: None starts a local Ray; 'auto' or 'ray://host:10001' joins one
    shard: str | None = None  # 'i/N': only the files whose path hashes to shard i of N (dens.sources)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
