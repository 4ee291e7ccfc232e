"""TrainConfig: every setting of a training run and the choices each one takes.

The defaults are the seed recipe; ``dens-train``'s options take their defaults and choice lists from here,
and a run writes its config to ``config.yaml``. Which architectures exist is :mod:`dens.artifact.metadata`'s to
say. Nothing here imports torch: the command's usage errors answer without it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dens.artifact.metadata import ARCHS
from dens.route.config import HEIGHT, VERSION, VERSIONS, WIDTH
from dens.scoring import TORCH_DEVICES as DEVICES

OPTIMIZERS = ("adam", "adamw")
BALANCES = ("weighted-loss", "sampler", "none")

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# Below this peak learning rate a randomly initialised model barely moves in a run of this length: such
# rates suit fine-tuning pretrained weights, not training from scratch.
MIN_SCRATCH_LR = 1e-4


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run; the defaults are the seed recipe. Written to ``config.yaml``."""

    data: str | None = None
    out: str = "runs/train"
    arch: str = "resnet50"
    # 'imagenet': torchvision's file, downloaded into the torch hub cache once; 'none': random initialisation
    # (from scratch, with lr >= MIN_SCRATCH_LR); or the path of a local state dict. 'auto', which older
    # config files hold, means 'imagenet'.
    weights: str = "imagenet"
    # The canonical canvas, H x W (dens.route.config's default); size: a square S x S canvas instead.
    height: int = HEIGHT
    width: int = WIDTH
    size: int | None = None
    # The canonical image's route (dens.route.config.VERSIONS); older routes stay for comparison and old models.
    preprocess_version: int = VERSION
    epochs: int = 15
    batch_size: int = 32  # global: divided between the DDP processes
    lr: float = 1e-5
    weight_decay: float = 3e-3
    optimizer: str = "adam"
    balance: str = "weighted-loss"
    augment: bool = True
    seed: int = 0
    bootstrap: int = 1000  # draws of test patients for the 95% confidence intervals (0: no intervals)
    workers: int | None = None  # DataLoader workers per process [min(4, cores)]
    decode_workers: int | None = None  # processes that fill the decoded cache [all cores]
    cache: str | None = None  # [~/.cache/dens]
    device: str = "auto"
    precision: str = "auto"  # CUDA: bf16 where supported, else fp16 + GradScaler; CPU: fp32, or bf16 if asked
    channels_last: bool | None = None  # [on CUDA]
    compile: bool = False
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        choices = {
            "arch": ARCHS,
            "optimizer": OPTIMIZERS,
            "balance": BALANCES,
            "device": DEVICES,
            "precision": PRECISIONS,
            "preprocess_version": VERSIONS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}, got {getattr(self, name)!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.weight_decay < 0 or self.bootstrap < 0:
            raise ValueError("epochs and batch_size must be >= 1, lr > 0, weight_decay and bootstrap >= 0")
        if self.weights == "none" and self.lr < MIN_SCRATCH_LR:
            raise ValueError(
                f"--weights none trains from random weights, and --lr {self.lr:g} is a fine-tuning rate at which "
                f"such a model barely learns: raise --lr (e.g. --lr 1e-3; at least {MIN_SCRATCH_LR:g}), or start "
                "from pretrained weights (--weights imagenet, the default, or --weights PATH)"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
