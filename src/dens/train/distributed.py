"""Where a training run executes: one process, or one of torchrun's DistributedDataParallel processes.

:class:`Ranks` is the run's view of its process group; every collective the run makes goes through it, so
a single process (world 1) never touches ``torch.distributed`` and the other modules never import it.
NCCL joins CUDA processes, gloo CPU ones; rank 0 alone writes files and logs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """This process's rank, the number of processes and the device this process trains on."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def per_rank(self, batch_size: int) -> int:
        """This process's share of a global batch, which must divide evenly."""
        if batch_size % self.world:
            raise ValueError(f"--batch-size {batch_size} does not divide between {self.world} processes")
        return batch_size // self.world

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
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

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any: decisions every rank must take at the same step."""
        if self.world == 1:
            return flag
        tensor = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(tensor)
        return bool(tensor.item())

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks (in place), e.g. every rank's loss total and image count."""
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor


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


def wrap(net: torch.nn.Module, ranks: Ranks) -> torch.nn.Module:
    """``net`` (already on ``ranks.device``) as the module the training steps call: under DistributedDataParallel
    when there are several processes, which averages the gradients between them; ``net`` itself otherwise."""
    if ranks.world == 1:
        return net
    ids = [ranks.device.index] if ranks.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(net, device_ids=ids)
