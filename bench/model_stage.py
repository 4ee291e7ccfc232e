"""The model stage alone: img/s of the exported model in ONNX Runtime over batch sizes, threads against
processes and fp32 against fp16, with PyTorch eager on the same checkpoint as the reference.

    python bench/model_stage.py [--arch resnet50] [--size 512] [--device auto|cpu|cuda] [--batch-sizes 1,4,8]
                          [--seconds 8]

Random initial weights and random uint8 images (the cost depends on neither), fed exactly as dens-infer
feeds them: through ``dens.scoring.runtime.open_runtime`` and ``Runtime.predict``, so the CPU figure is
``session.run`` on a host batch and the CUDA figure includes the uint8 copy to the device (IO binding) and
the probabilities coming back. Each setting runs one warm-up call, then calls until --seconds have passed.

CPU rows: one session on every core at each batch size; the default batch on 1, 2, 4 ... threads; the
same cores as P processes of one session each (img/s summed over processes that run at the same time);
the fp16 file; PyTorch eager fp32 at batch 1 and the default batch.
CUDA rows: the fp16 and fp32 files at batch 1, 2, 4 ... 256; the fp16 file with ORT's NHWC convolutions
(``prefer_nhwc``) at batch 64 and the largest; PyTorch eager fp32 and fp16 autocast (channels_last) at
batch 64. GFLOP per image is counted by torch's FlopCounterMode on the model (ResNet-50
at 512: about 42.7), which gives each GPU row its share of the GPU's dense fp16 tensor peak.
Writes bench/results/model-<host>-<time>.json.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import export_models, machine, up_to, write_result
from dens import usable_cores

# Dense (no sparsity) fp16 tensor-core peak in TFLOP/s from NVIDIA's data sheets, by a substring of the
# name nvidia-smi reports; a GPU not listed gets no share-of-peak figure rather than a guessed one.
FP16_PEAK_TFLOPS = {
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.4,
    "H200": 989.4,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
}


def fp16_peak(gpu: str | None) -> float | None:
    for key, tflops in FP16_PEAK_TFLOPS.items():  # longest-first matters: "H100 NVL" before "H100"
        if gpu and key in gpu:
            return tflops
    return None


def gflop_per_image(checkpoint: Path) -> float:
    """Forward-pass GFLOP for one image, counted by torch (a multiply-add is 2 FLOP)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dens.artifact.model import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    x = torch.zeros((1, 1, ckpt.preprocess.size, ckpt.preprocess.size), dtype=torch.uint8)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        ckpt.model.eval()(x)
    return counter.get_total_flops() / 1e9


def _timed(call, batch: int, seconds: float) -> tuple[int, float]:
    """(images, seconds) of repeated ``call()`` after one warm-up call."""
    call()
    images, start = 0, time.perf_counter()
    while images == 0 or time.perf_counter() - start < seconds:
        call()
        images += batch
    return images, time.perf_counter() - start


def bench_ort(
    onnx_path: Path, device: str, batch: int, threads: int | None, seconds: float, cuda_options: dict | None = None
) -> dict:
    from dens.scoring.runtime import open_runtime

    rt = open_runtime(onnx_path, device, batch_size=batch, threads=threads, cuda_options=cuda_options)
    size = rt.preprocess.size
    x = np.random.default_rng(batch).integers(0, 256, (batch, 1, size, size), dtype=np.uint8)
    images, elapsed = _timed(lambda: rt.predict(x), batch, seconds)
    return {
        "provider": rt.provider,
        "threads": rt.threads,
        "batch": batch,
        "images": images,
        "img_per_s": round(images / elapsed, 3),
    }


def _process_main(onnx_path: str, batch: int, threads: int, seconds: float, barrier, results) -> None:
    from dens.scoring.runtime import open_runtime

    rt = open_runtime(onnx_path, "cpu", batch_size=batch, threads=threads)
    x = np.random.default_rng(os.getpid()).integers(
        0, 256, (batch, 1, rt.preprocess.size, rt.preprocess.size), dtype=np.uint8
    )
    rt.predict(x)  # warm-up before the common start
    barrier.wait()
    images, start = 0, time.perf_counter()
    while images == 0 or time.perf_counter() - start < seconds:
        rt.predict(x)
        images += batch
    results.put((images, time.perf_counter() - start))


def bench_ort_processes(onnx_path: Path, processes: int, threads: int, batch: int, seconds: float) -> dict:
    """``processes`` CPU sessions of ``threads`` threads each, started together; img/s summed."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    procs = [
        ctx.Process(target=_process_main, args=(str(onnx_path), batch, threads, seconds, barrier, results))
        for _ in range(processes)
    ]
    for p in procs:
        p.start()
    runs = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return {
        "provider": "CPUExecutionProvider",
        "processes": processes,
        "threads": threads,
        "batch": batch,
        "images": sum(n for n, _ in runs),
        "img_per_s": round(sum(n / s for n, s in runs), 3),
    }


def bench_torch(checkpoint: Path, device: str, batch: int, seconds: float, amp: bool = False) -> dict:
    import torch

    from dens.artifact.model import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    dev = torch.device(device)
    layout = torch.channels_last if dev.type == "cuda" else torch.preserve_format
    model = ckpt.model.to(dev, memory_format=layout).eval()
    size = ckpt.preprocess.size
    host = torch.from_numpy(np.random.default_rng(batch).integers(0, 256, (batch, 1, size, size), dtype=np.uint8))

    @torch.no_grad()
    def call() -> None:
        with torch.autocast(dev.type, dtype=torch.float16, enabled=amp):
            probs = torch.softmax(model(host.to(dev)).float() / ckpt.temperature, dim=1)
        probs.cpu()  # the host copy synchronises, as Runtime.predict's does

    images, elapsed = _timed(call, batch, seconds)
    return {
        "framework": "torch eager",
        "device": device,
        "precision": "fp16 autocast" if amp else "fp32",
        "threads": torch.get_num_threads(),
        "batch": batch,
        "images": images,
        "img_per_s": round(images / elapsed, 3),
    }


def cpu_rows(onnx: Path, fp16: Path, checkpoint: Path, batches: list[int], seconds: float) -> list[dict]:
    import torch

    from dens.scoring.runtime import DEFAULT_BATCH

    n, batch = usable_cores(), DEFAULT_BATCH["cpu"]
    plan = [("ort fp32", lambda b=b: bench_ort(onnx, "cpu", b, n, seconds)) for b in batches]
    plan += [("ort fp32", lambda t=t: bench_ort(onnx, "cpu", batch, t, seconds)) for t in up_to(n) if t != n]
    plan += [
        ("ort fp32 processes", lambda p=p: bench_ort_processes(onnx, p, n // p, batch, seconds))
        for p in up_to(n)
        if p > 1
    ]
    plan += [("ort fp16", lambda: bench_ort(fp16, "cpu", batch, n, seconds))]
    torch.set_num_threads(n)
    plan += [("torch fp32", lambda b=b: bench_torch(checkpoint, "cpu", b, seconds)) for b in sorted({1, batch})]
    return _run(plan)


def cuda_rows(onnx: Path, fp16: Path, checkpoint: Path, batches: list[int], seconds: float) -> list[dict]:
    plan = [("ort fp16", lambda b=b: bench_ort(fp16, "cuda", b, None, seconds)) for b in batches]
    plan += [("ort fp32", lambda b=b: bench_ort(onnx, "cuda", b, None, seconds)) for b in batches]
    # NHWC convolutions (tensor cores' own layout) are an ORT CUDA option dens-infer does not set yet: tried
    # here at two batch sizes, a failure recorded rather than ending the benchmark.
    nhwc = {"prefer_nhwc": "1"}
    plan += [
        ("ort fp16 prefer_nhwc", lambda b=b: _tried(lambda: bench_ort(fp16, "cuda", b, None, seconds, nhwc), b))
        for b in sorted({64, max(batches)})
    ]
    plan += [
        ("torch fp32", lambda: bench_torch(checkpoint, "cuda", 64, seconds)),
        ("torch fp16", lambda: bench_torch(checkpoint, "cuda", 64, seconds, amp=True)),
    ]
    return _run(plan)


def _tried(bench, batch: int) -> dict:
    try:
        return bench()
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return {"batch": batch, "error": first}


def _run(plan) -> list[dict]:
    rows = []
    for setting, bench in plan:
        row = {"setting": setting, **bench()}
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50", choices=["resnet50", "resnet18"])
    parser.add_argument("--size", type=int, default=512, help="canonical image size S")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch-sizes", default=None, help="comma-separated [CPU 1,2,4,8; CUDA 1,2,4 ... 256]")
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per setting")
    args = parser.parse_args()
    from dens.scoring.runtime import planned_device

    device = planned_device(args.device)  # auto: cuda when a GPU is present (tensorrt is not measured here)
    device = "cuda" if device == "tensorrt" else device
    default = "1,2,4,8" if device == "cpu" else "1,2,4,8,16,32,64,128,256"
    batches = [int(b) for b in (args.batch_sizes or default).split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, onnx, fp16 = export_models(Path(tmp), args.arch, args.size, fp16=True)
        gflop = gflop_per_image(checkpoint)
        rows = (cuda_rows if device == "cuda" else cpu_rows)(onnx, fp16, checkpoint, batches, args.seconds)

    peak = fp16_peak(machine()["gpu"]) if device == "cuda" else None
    for row in (r for r in rows if "img_per_s" in r):
        row["tflops"] = round(row["img_per_s"] * gflop / 1000, 3)
        if peak:
            row["share_of_fp16_peak"] = round(row["tflops"] / peak, 4)
    path = write_result(
        "model",
        {
            "settings": {
                "arch": args.arch,
                "size": args.size,
                "device": device,
                "batch_sizes": batches,
                "seconds": args.seconds,
            },
            "gflop_per_image": round(gflop, 2),
            "fp16_peak_tflops": peak,
            "results": rows,
        },
    )
    print(f"{args.arch} at S={args.size}: {gflop:.1f} GFLOP per image; wrote {path}")


if __name__ == "__main__":
    main()
