"""The scaling curve: dens-infer's end-to-end img/s against the number of decode workers, and what bounds
each point.

    python bench/scaling.py [--cohort DIR] [--arch resnet50] [--size 512] [--device auto] [--workers 1,2,4]
                            [--model-seconds 15]

Worker counts default to 1, 2, 4 ... up to the cores this process may use (and that count itself). At each
count: dens-infer end to end (a fresh process, as a user runs it, with its default ORT threads and batch),
and the decode pool alone with that many workers. Once: the model alone in ONNX Runtime at dens-infer's
threads and batch. Each point is labelled by what bounds it, from dens-infer's own accounting: ``decode``
when the main process spent at least a quarter of the run waiting for decoded images, ``model`` when the
model took at least 60% of it, otherwise ``hand-off`` (time going to batching, the pipes and writing rows).
Writes bench/results/scaling-<host>-<time>.json; bench/summarize.py draws it.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ensure_cohort, export_models, shown, up_to, write_result
from dens import usable_cores
from model_stage import bench_ort
from pipeline import bench_decode_pool, bench_dens_infer, cohort_files, end_to_end_parser

WAIT_BOUND, MODEL_BOUND = 0.25, 0.60


def bound(point: dict) -> str:
    """decode, model or hand-off, from the shares of dens-infer's run spent waiting and in the model."""
    run = point["run_s"] or 1.0
    if point["wait_for_decode_s"] / run >= WAIT_BOUND:
        return "decode"
    if point["model_s"] / run >= MODEL_BOUND:
        return "model"
    return "hand-off"


def main() -> None:
    parser = end_to_end_parser(__doc__)
    parser.add_argument("--workers", default=None, help="comma-separated worker counts [1, 2, 4 ... cores]")
    parser.add_argument("--model-seconds", type=float, default=15.0, help="how long the model-only run lasts")
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")] if args.workers else up_to(usable_cores())
    cohort = ensure_cohort(args.cohort)
    files = cohort_files(cohort)

    points = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _, onnx_path, _ = export_models(tmp, args.arch, args.size)
        for workers in counts:
            point = bench_dens_infer(cohort, onnx_path, tmp / "preds.csv", args.device, workers, None, None)
            point["decode_pool_img_per_s"] = bench_decode_pool(files, args.size, workers)["img_per_s_after_first"]
            point["bound"] = bound(point)
            print(
                f"{workers:3d} workers: {point['img_per_s']:8.2f} img/s end to end, decode alone "
                f"{point['decode_pool_img_per_s']} img/s, {point['bound']}-bound",
                flush=True,
            )
            points.append(point)
        last = points[-1]
        model = bench_ort(onnx_path, args.device, last["batch_size"], last["threads"], args.model_seconds)
    print(
        f"model alone: {model['img_per_s']} img/s ({model['provider']}, batch {model['batch']}, "
        f"{model['threads']} threads)"
    )
    path = write_result(
        "scaling",
        {
            "settings": {
                "arch": args.arch,
                "size": args.size,
                "device": args.device,
                "cohort": shown(cohort),
                "images": len(files),
                "worker_counts": counts,
                "wait_bound": WAIT_BOUND,
                "model_bound": MODEL_BOUND,
            },
            "model_alone": model,
            "points": points,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
