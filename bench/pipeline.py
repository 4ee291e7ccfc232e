"""End-to-end img/s of dens-infer against a naive reference, in one run on one full-size synthetic cohort, and
img/s of each stage alone.

    python bench/pipeline.py [--cohort DIR] [--arch resnet50] [--size 512] [--device auto]
                             [--workers N] [--threads N] [--batch-size N] [--sweep] [--skip-naive]
                             [--naive-files N]

The naive reference (written for the purpose, in bench/naive.py) is what a first script does: one process,
pydicom's full-resolution decode (``ds.pixel_array``), pydicom's Modality LUT and VOI, an OpenCV resize to
S x S, PyTorch eager on the checkpoint, batch 1. dens-infer runs through ``dens.infer.run`` on the same
folder and model (exported from the same checkpoint). Stages alone: decode in the worker pool, decode in
one process, the model alone in ONNX Runtime at the threads and batch dens-infer used (and how much of that
the model stage keeps inside dens-infer), and the naive pipeline's two halves.
dens-infer is timed from outside (start-up included) and by its own in-process clock; the naive figure
leaves its start-up out. ``--sweep`` also runs dens-infer at each (workers, ORT threads) pair up to the
core count. Writes bench/results/pipeline-<host>-<time>.json.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DEFAULT_COHORT, ensure_cohort, export_models, shown, write_result
from dens import usable_cores
from dens.infer import DEVICES
from dens.route.config import PreprocessConfig
from model_stage import bench_ort

# dens.scoring.runtime, dens.engine, torch and the naive pipeline are imported where they are used: decode
# workers are spawned, and a spawned child imports this script again before it starts.
# The summary line dens-infer prints (dens.infer.runner.Summary.line).
SUMMARY = re.compile(
    r"(?P<files>\d+) files.*?: (?P<ok>\d+) ok, .*? in (?P<run_s>[\d.]+) s, .*?; "
    r"decode (?P<decode_s>[\d.]+) s \((?P<workers>\d+) workers\), "
    r"model (?P<model_s>[\d.]+) s \((?P<provider>\w+), batch (?P<batch>\d+), (?P<threads>\d+) threads\), "
    r"write (?P<write_s>[\d.]+) s, waiting for decode (?P<wait_s>[\d.]+) s"
)


def cohort_files(cohort: Path) -> list[Path]:
    import pandas as pd

    return [cohort / p for p in sorted(pd.read_csv(cohort / "train.csv")["path"])]


def bench_naive(checkpoint: Path, files: list[Path], device: str) -> dict:
    from naive import NaivePipeline

    naive = NaivePipeline(checkpoint, device=device)
    naive.predict(files[0])  # warm-up: first-call allocations, not per-image cost
    naive.reset_timers()
    start = time.perf_counter()
    for path in files:
        naive.predict(path)
    seconds = time.perf_counter() - start
    return {
        "images": len(files),
        "seconds": round(seconds, 2),
        "img_per_s": round(len(files) / seconds, 3),
        "decode_voi_resize_s": round(naive.decode_s, 2),
        "model_s": round(naive.model_s, 2),
        "decode_img_per_s": round(len(files) / naive.decode_s, 3),
        "model_img_per_s": round(len(files) / naive.model_s, 3),
        "device": naive.device,
    }


def bench_dens_infer(
    cohort: Path,
    onnx_path: Path,
    out: Path,
    device: str,
    workers: int | None,
    threads: int | None,
    batch_size: int | None,
) -> dict:
    """dens-infer as a user runs it (a fresh process, start-up included), timed from outside."""
    command = [
        sys.executable,
        "-c",
        "from dens.infer.cli import main; main()",
        str(cohort),
        "--out",
        str(out),
        "--model",
        str(onnx_path),
        "--device",
        device,
        "--overwrite",
        "--no-progress",
    ]
    for flag, value in (("--workers", workers), ("--threads", threads), ("--batch-size", batch_size)):
        if value:
            command += [flag, str(value)]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    match = SUMMARY.search(proc.stdout)
    if proc.returncode != 0 or not match:
        raise SystemExit(f"dens-infer failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    print(proc.stdout.splitlines()[0])
    m = match.groupdict()
    ok = int(m["ok"])
    return {
        "images": ok,
        "files": int(m["files"]),
        "seconds": round(seconds, 2),
        "img_per_s": round(ok / seconds, 3),
        "run_s": float(m["run_s"]),
        "in_process_img_per_s": round(ok / float(m["run_s"]), 3),
        "workers": int(m["workers"]),
        "threads": int(m["threads"]),
        "batch_size": int(m["batch"]),
        "provider": m["provider"],
        "decode_worker_s": float(m["decode_s"]),
        "model_s": float(m["model_s"]),
        "write_s": float(m["write_s"]),
        "wait_for_decode_s": float(m["wait_s"]),
    }


def bench_decode_pool(files: list[Path], size: int, workers: int) -> dict:
    from dens.engine import DecodePool

    cfg = PreprocessConfig(size=size)
    with DecodePool(workers, cfg, buffer=len(files)) as pool:
        start = time.perf_counter()
        first = None
        for _ in pool.map((str(p), "") for p in files):
            first = first or time.perf_counter()
        end = time.perf_counter()
    return {
        "workers": workers,
        "images": len(files),
        "seconds_with_startup": round(end - start, 2),
        "img_per_s_with_startup": round(len(files) / (end - start), 3),
        "img_per_s_after_first": round((len(files) - 1) / (end - first), 3) if end > first else None,
    }


def bench_decode_inline(files: list[Path], size: int) -> dict:
    from dens.route.preprocess import load

    cfg = PreprocessConfig(size=size)
    start = time.perf_counter()
    for path in files:
        load(path, cfg)
    seconds = time.perf_counter() - start
    return {
        "images": len(files),
        "seconds": round(seconds, 2),
        "ms_per_image": round(1000 * seconds / len(files), 1),
        "img_per_s": round(len(files) / seconds, 3),
    }


def model_stage(dens_infer: dict, alone: dict) -> dict:
    """How much of ONNX Runtime's img/s alone (same provider, threads, batch) the model stage keeps inside
    dens-infer, where decode workers share the machine with it (target on CPU: at least 0.8)."""
    if dens_infer["model_s"] < 1.0:  # dens-infer prints tenths of a second: too short a run to tell
        return {"in_pipeline_img_per_s": None, "alone_img_per_s": alone["img_per_s"], "share": None}
    inside = dens_infer["images"] / dens_infer["model_s"]
    return {
        "in_pipeline_img_per_s": round(inside, 3),
        "alone_img_per_s": alone["img_per_s"],
        "share": round(inside / alone["img_per_s"], 3),
    }


def end_to_end_parser(doc: str) -> argparse.ArgumentParser:
    """The options every end-to-end benchmark takes: the cohort, the model, the device."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--cohort",
        type=Path,
        default=DEFAULT_COHORT,
        help="a full-size dens-synth cohort; made there first when absent [%(default)s]",
    )
    parser.add_argument("--arch", default="resnet50", choices=["resnet50", "resnet18"])
    parser.add_argument("--size", type=int, default=512, help="canonical image size S")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    return parser


def main() -> None:
    parser = end_to_end_parser(__doc__)
    parser.add_argument("--workers", type=int, default=None, help="dens-infer decode workers [its default]")
    parser.add_argument("--threads", type=int, default=None, help="dens-infer ORT threads [its default]")
    parser.add_argument("--batch-size", type=int, default=None, help="dens-infer batch size [its default]")
    parser.add_argument("--model-seconds", type=float, default=20.0, help="how long the model-only stage runs")
    parser.add_argument("--sweep", action="store_true", help="also run dens-infer at every (workers, threads) pair")
    parser.add_argument("--skip-naive", action="store_true", help="no naive reference")
    parser.add_argument(
        "--naive-files",
        type=int,
        default=None,
        help="the naive reference, and dens's decoding in one process, over the first N files only "
        "(img/s is per image; at about 1 img/s the naive would take minutes over a GPU-sized "
        "cohort) [all]",
    )
    args = parser.parse_args()
    load_before = os.getloadavg()  # the machine is shared: other jobs' load changes every figure
    cohort = ensure_cohort(args.cohort)
    files = cohort_files(cohort)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"{len(files)} images; exporting a random-init {args.arch} at S={args.size} ...", flush=True)
        checkpoint, onnx_path, _ = export_models(tmp, args.arch, args.size)
        naive_device = "cpu" if args.device == "cpu" else "auto"

        results: dict = {}
        d = results["dens_infer"] = bench_dens_infer(
            cohort, onnx_path, tmp / "preds.csv", args.device, args.workers, args.threads, args.batch_size
        )
        if not args.skip_naive:
            results["naive"] = bench_naive(checkpoint, files[: args.naive_files], naive_device)
            print(f"naive: {results['naive']}", flush=True)
            results["speedup"] = round(d["img_per_s"] / results["naive"]["img_per_s"], 2)
            # The naive figure leaves out its start-up (imports, loading the model); so does this one.
            results["speedup_in_process"] = round(d["in_process_img_per_s"] / results["naive"]["img_per_s"], 2)
        results["stages"] = {
            "decode_pool": bench_decode_pool(files, args.size, d["workers"]),
            "decode_one_process": bench_decode_inline(files[: args.naive_files], args.size),  # the naive's files
            "model_ort": bench_ort(onnx_path, args.device, d["batch_size"], d["threads"], args.model_seconds),
        }
        results["model_stage"] = model_stage(d, results["stages"]["model_ort"])
        print(f"stages: {results['stages']}\nmodel stage: {results['model_stage']}", flush=True)
        if args.sweep:
            pairs = [(w, t) for w in range(1, usable_cores() + 1) for t in range(1, usable_cores() + 1)]
            out = tmp / "preds.csv"
            results["sweep"] = [
                bench_dens_infer(cohort, onnx_path, out, args.device, w, t, args.batch_size) for w, t in pairs
            ]

    settings = {
        "arch": args.arch,
        "size": args.size,
        "device": args.device,
        "images": len(files),
        "cohort": shown(cohort),
        "workers": args.workers,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "model_seconds": args.model_seconds,
        "naive_files": args.naive_files,
    }
    out = write_result("pipeline", {"settings": settings, "results": results, "load_average_before": load_before})
    line = f"dens-infer {d['img_per_s']:.2f} img/s ({d['provider']}, {d['workers']} workers, {d['threads']} threads)"
    if "naive" in results:
        line += f", naive {results['naive']['img_per_s']:.2f} img/s: x{results['speedup']:.2f}"
    share = results["model_stage"]["share"]
    print(f"{line}; model stage keeps {f'{share:.0%}' if share else 'an unmeasured share'} of ORT alone")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
