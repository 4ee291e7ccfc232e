"""What dens-infer is asked to do: :class:`InferConfig`, which checks itself, its choice lists and its exit
statuses.

Nothing heavy at import (dens.artifact.metadata's and dens.scoring's names; dens.flags and dens.sources, which
the checks use, load numpy and the standard library only): dens-infer's command-line module imports this, and
a spawned decode worker imports that module before it starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dens.artifact.metadata import (
    PRECISIONS as PRECISIONS,  # --precision: the variant beside the model (model.int8.onnx)
)
from dens.commands import EXIT_ERRORS as EXIT_ERRORS
from dens.commands import EXIT_FAILED as EXIT_FAILED
from dens.commands import EXIT_INTERRUPTED as EXIT_INTERRUPTED
from dens.commands import EXIT_OK as EXIT_OK
from dens.commands import EXIT_TERMINATED as EXIT_TERMINATED
from dens.commands import EXIT_USAGE as EXIT_USAGE
from dens.scoring import DEVICES as DEVICES  # --device: ONNX Runtime's

ENGINES = ("local", "ray")  # local: this machine's decode processes; ray: Ray Data on a Ray cluster


@dataclass(frozen=True)
class InferConfig:
    """What ``dens-infer`` was asked to do. ``None`` means the default for the provider in use."""

    studies: Path
    out: Path = Path("preds.csv")
    model: Path | None = None  # default: runs/latest/model.onnx
    precision: str | None = None  # the variant dens-export wrote beside ``model`` (model.int8.onnx); None: ``model``
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
    allow_modified_model: bool = False  # score a model edited after export (its signature fails), loudly warned

    def __post_init__(self) -> None:
        """Refuse settings that cannot go together or cannot be read (ValueError, worded for the command line)."""
        from dens.flags import parse_flag
        from dens.sources import Shard

        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.overwrite and (self.resume or self.retry_errors):
            asked = "--retry-errors" if self.retry_errors else "--resume"
            raise ValueError(f"{asked} and --overwrite contradict each other: choose one")
        if self.allow_modified_model and self.engine == "ray":
            raise ValueError(
                "--allow-modified-model is for --engine local: the Ray engine's model actors verify the model "
                "themselves and refuse an edited one"
            )
        parse_flag(self.flag)
        Shard.parse(self.shard)
