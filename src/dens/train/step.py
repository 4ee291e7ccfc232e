"""One optimisation step, and where it runs: the processes (torchrun ranks), the device and the precision.

Kept apart from the run loop so that the AMP step stays one small function with its own test (the bug class
of pytorch/vision PR 4874: a forward pass outside autocast, two optimizer steps).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger("dens.train")


def train_step(
    model: torch.nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    loss_fn: Callable,
    amp_dtype: torch.dtype | None,
) -> torch.Tensor:
    """One optimisation step: forward under autocast when ``amp_dtype`` is set, the loss in fp32, a scaled
    backward and exactly one optimizer step (the scaler skips it only on inf/NaN gradients). Returns the
    loss, detached (no host sync)."""
    images, targets = batch
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(images)
    loss = loss_fn(logits.float(), targets)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


# --- processes, devices, precision -----------------------------------------------------------------------


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (the others pass anything, None say)."""
        if self.world == 1:
            return obj
        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def setup_ranks(device: str = "auto") -> Ranks:
    """One process, or one of torchrun's (RANK/WORLD_SIZE/LOCAL_RANK set): joins the process group."""
    cuda = torch.cuda.is_available() and device != "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is visible")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks(0, 1, torch.device("cuda" if cuda else "cpu"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if cuda else "cpu"))


def resolve_precision(requested: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. On CUDA, auto is bf16 where the GPU supports it, else fp16 (with
    the GradScaler). On the CPU, auto is fp32 (the recipe's numerics); bf16 is honoured when asked for (CPU
    autocast: 1.5x to 2.7x the fp32 step on two AVX512-BF16 CPUs, bench/train_step.py), and fp16 falls back
    to fp32, said aloud."""
    if device.type != "cuda":
        if requested == "bf16":
            log.info("training with bf16 autocast on CPU")
            return torch.bfloat16
        if requested == "fp16":
            log.warning("fp16 mixed precision needs a CUDA device: training in fp32 on CPU (bf16 is the CPU's)")
        else:
            log.info("no CUDA device: training in fp32 on CPU")
        return None
    if requested == "fp32":
        return None
    if requested == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU does not support bf16; use --precision fp16 or auto")
    if requested == "fp16" or (requested == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16
