"""Training throughput (img/s) of one `dens.train.step.train_step` over architectures, sizes and batches.

    python bench/train_step.py                # CUDA when present, else CPU
    python bench/train_step.py --device cpu   # resnet18 at 256 and resnet50 at 512, batch 8, fp32 vs bf16 autocast
    python bench/train_step.py --device cuda  # resnet50 at 512, fp32 vs bf16 vs fp16, channels_last off/on,
                                              # batch 32/64
    python bench/train_step.py --arch resnet50 --size 512 --batch 16 --precision fp32 --channels-last on

Each configuration runs the real step (uint8 batch -> model with normalisation inside -> weighted
cross-entropy -> Adam) on random images held on the device, so the figure is the model's cost with no data
loading; augmentation (`dens.train.data.augment`) is timed apart as `augment_img_s`. One warm-up step,
then timed steps until --min-seconds have passed (at least --min-steps). On CUDA the device is synchronised
around the timed region and peak memory is recorded. bf16 on the CPU is CPU autocast, what
`dens-train --precision bf16` runs there (its default on the CPU is fp32).
Writes bench/results/train_step-<host>-<time>.json.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import sync, write_result
from dens.artifact.model import ARCHS, build_model
from dens.train import data
from dens.train.step import train_step

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def bench_one(
    device: torch.device,
    arch: str,
    size: int,
    batch: int,
    precision: str,
    channels_last: bool,
    compile_model: bool,
    min_seconds: float,
    min_steps: int,
) -> dict:
    """img/s of the training step for one configuration."""
    torch.manual_seed(0)
    memory = torch.channels_last if channels_last else torch.preserve_format
    net = build_model(arch, weights=None).to(device, memory_format=memory).train()
    model = torch.compile(net) if compile_model else net
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-5, weight_decay=3e-3)
    amp_dtype = DTYPES[precision]
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor([2.0, 0.6, 0.6, 4.0], device=device))
    images = torch.randint(0, 256, (batch, 1, size, size), dtype=torch.uint8, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 4, (batch,), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_step(model, (images, targets), optimizer, scaler, loss_fn, amp_dtype)  # warm-up (and compile)
    sync(device)
    steps, start = 0, time.perf_counter()
    while steps < min_steps or time.perf_counter() - start < min_seconds:
        loss, _ = train_step(model, (images, targets), optimizer, scaler, loss_fn, amp_dtype)
        steps += 1
        if device.type == "cuda" and steps % 10:
            continue
        sync(device)
    sync(device)
    seconds = time.perf_counter() - start
    g = torch.Generator().manual_seed(0)
    data.augment(images, g)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(3):
        data.augment(images, g)
    sync(device)
    augment_s = (time.perf_counter() - t0) / 3
    row = {
        "arch": arch,
        "size": size,
        "batch": batch,
        "precision": precision,
        "channels_last": channels_last,
        "compile": compile_model,
        "steps": steps,
        "seconds": round(seconds, 2),
        "img_s": round(steps * batch / seconds, 2),
        "step_ms": round(1000 * seconds / steps, 1),
        "augment_img_s": round(batch / augment_s, 1),
        "loss_finite": bool(torch.isfinite(loss)),
    }
    if device.type == "cuda":
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--arch", nargs="+", choices=list(ARCHS))
    parser.add_argument("--size", nargs="+", type=int)
    parser.add_argument("--batch", nargs="+", type=int)
    parser.add_argument("--precision", nargs="+", choices=list(DTYPES))
    parser.add_argument("--channels-last", choices=["off", "on", "both"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--min-seconds", type=float, default=None, help="[CPU 8, CUDA 5]")
    parser.add_argument("--min-steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = parser.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    if cuda or args.arch or args.size:
        models = list(itertools.product(args.arch or ["resnet50"], args.size or [512]))
    else:  # CPU: the demo's model and the recipe's, each at a size a CPU trains it at
        models = [("resnet18", 256), ("resnet50", 512)]
    batches = args.batch or ([32, 64] if cuda else [8])
    precisions = args.precision or (["fp32", "bf16", "fp16"] if cuda else ["fp32", "bf16"])
    layouts = {"off": [False], "on": [True], "both": [False, True]}[args.channels_last or ("both" if cuda else "off")]
    min_seconds = args.min_seconds if args.min_seconds is not None else (5.0 if cuda else 8.0)
    rows, load_before = [], os.getloadavg()
    for (arch, size), batch, precision, channels_last in itertools.product(models, batches, precisions, layouts):
        row = bench_one(device, arch, size, batch, precision, channels_last, args.compile, min_seconds, args.min_steps)
        rows.append(row)
        print(
            f"{arch:9} S={size:<4} batch {batch:<3} {precision:4} channels_last={channels_last!s:5} "
            f"{row['img_s']:8.2f} img/s  ({row['step_ms']} ms/step, augment {row['augment_img_s']} img/s)",
            flush=True,
        )
    # Other work on a shared machine skews CPU figures: the load average says how much there was.
    path = write_result(
        "train_step",
        {
            "device": args.device,
            "threads": torch.get_num_threads(),
            "load_average_before": load_before,
            "results": rows,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
