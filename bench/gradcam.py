"""Grad-CAM cost per flagged image: the map itself, next to plain inference, and writing its files.

    python bench/gradcam.py [--device cpu|cuda|auto] [--models resnet50:512,resnet18:512] [--batches 1,8]
                            [--repeat 3] [--threads N]

For each model and batch size: ms per image for the Grad-CAM call (forward, the gradient from the class
score back to the target layer, the map upsampled and normalised, copied to the host), for a plain
``no_grad`` forward pass of the same PyTorch model (the ratio is what Grad-CAM adds), and for writing one
image's overlay PNG + raw map ``.npy`` + thumbnail. The best of ``--repeat`` rounds after a warm-up, the three
taking turns in each round; random initial weights and random pixels (the cost depends on neither). Writes
bench/results/gradcam-<host>-<time>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch

from common import sync, write_result
from dens.artifact.model import build_model
from dens.gradcam import GradCAM
from dens.gradcam.runner import pick_device
from dens.review import display
from dens.review.views import write_view_files
from dens.route.config import PreprocessConfig


def write_cam_files(out_dir: Path, stem: str, image: np.ndarray, cam: np.ndarray) -> Path:
    """What dens-gradcam writes for one flagged image: its raw map (``<stem>.npy``, float16) and its view
    files (thumbnail, overlay figure, overlay thumbnail) with the image as displayed and the map on its own
    scale. Returns the overlay figure's path."""
    stored = cam.astype(np.float16)
    np.save(out_dir / f"{stem}.npy", stored)
    peak = float(stored.max())
    cfg = PreprocessConfig(height=image.shape[0], width=image.shape[1])
    scaled = stored.astype(np.float32) / peak if peak > 0 else np.zeros(cam.shape, np.float32)
    label = ["L (as PACS shows it)", "Grad-CAM; 1 = this map's largest value; breast only"]
    return write_view_files(out_dir, stem, display.as_displayed(image, "L", cfg), scaled, label, cfg.version).overlay


def _best_ms(fns: dict[str, Callable[[], object]], device: torch.device, repeat: int) -> dict[str, float]:
    """Best wall time of each function over ``repeat`` rounds after a warm-up (allocator, cuDNN algorithm
    choice, first-touch pages). The functions take turns within a round, so a machine whose load changes
    while it runs slows them alike and their ratio stays fair."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeat + 1):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if round_:
                times[name].append((time.perf_counter() - start) * 1000)
    return {name: min(t) for name, t in times.items()}


def bench_batch(model: torch.nn.Module, size: int, batch: int, device: torch.device, repeat: int) -> dict:
    """Timings for one batch size."""
    images = np.random.default_rng(batch).integers(0, 256, (batch, 1, size, size), dtype=np.uint8)
    x = torch.from_numpy(images).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def forward() -> None:
        with torch.no_grad():
            model(x)

    with GradCAM(model) as cam, tempfile.TemporaryDirectory() as tmp:
        maps = cam(images).maps
        best = _best_ms(
            {
                "gradcam": lambda: cam(images),
                "forward": forward,
                "files": lambda: write_cam_files(Path(tmp), "bench", images[0, 0], maps[0]),
            },
            device,
            repeat,
        )
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "size": size,
        "batch": batch,
        "gradcam_ms_per_image": round(best["gradcam"] / batch, 1),
        "forward_ms_per_image": round(best["forward"] / batch, 1),
        "gradcam_over_forward": round(best["gradcam"] / best["forward"], 2),
        "files_ms_per_image": round(best["files"], 1),
        "total_ms_per_image": round(best["gradcam"] / batch + best["files"], 1),
        "cuda_peak_mib": round(peak, 1) if peak is not None else None,
    }


def bench_model(arch: str, size: int, batches: list[int], device: torch.device, repeat: int) -> list[dict]:
    torch.manual_seed(0)
    model = build_model(arch, weights=None).eval().to(device)
    results = []
    for batch in batches:
        row = {"arch": arch, **bench_batch(model, size, batch, device, repeat)}
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        results.append(row)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--models", default="resnet50:512,resnet18:512", help="arch:size, comma-separated")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads [torch's default]")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    batches = [int(b) for b in args.batches.split(",")]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    results = []
    for spec in args.models.split(","):
        arch, size = spec.split(":")
        results += bench_model(arch, int(size), batches, device, args.repeat)
    path = write_result(
        "gradcam",
        {
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg(),
            "repeat": args.repeat,
            "results": results,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
