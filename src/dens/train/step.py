"""One optimisation step and the precision it runs in; the processes it runs in are :mod:`dens.train.distributed`.

Kept apart from the run loop so that the AMP step stays one small function with its own test (the bug class
of pytorch/vision PR 4874: a forward pass outside autocast, two optimizer steps).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger("dens.train")


def train_step(
    model: torch.nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    loss_fn: Callable,
    amp_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step: forward under autocast when ``amp_dtype`` is set, the loss in fp32, a scaled
    backward and exactly one optimizer step (the scaler skips it only on inf/NaN gradients). Returns the
    loss and how many of the batch's images the forward pass called right (the running train accuracy),
    both detached device tensors (no host sync)."""
    images, targets = batch
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(images)
    loss = loss_fn(logits.float(), targets)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), (logits.detach().argmax(1) == targets).sum()


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
