"""int8 against fp32 on this CPU, in one run: the model stage, dens-infer end to end, and the dense-call
agreement of the two graphs on held-out images.

    python bench/int8.py [--cohort DIR] [--arch resnet50] [--size 512] [--batch-sizes 1,4,8,16] [--seconds 4]
                         [--rounds 3] [--demo DIR] [--real DIR]

Speed: a random-init ResNet-50 at S=512 (the cost depends on the weights of neither graph), exported by
dens-export's code and quantized by it (``u8s8``, the default, and ``s8s8``) on images of the full-size
synthetic cohort read through the decode engine. Each graph runs through ``dens.scoring.runtime`` (what
dens-infer runs) on the CPU provider with every core, at each batch size; the graphs take turns, round by
round, so a change of load falls on all of them, and each figure is the best round's. End to end: dens-infer
on the same cohort with the fp32 file and with the int8 file, twice each, taking turns.

Agreement: a random model's calls are near-ties that mean nothing, so these figures come from the demo
model (``make demo``'s recipe: resnet18 at S=128 trained for 6 epochs on a 100-patient synthetic cohort;
made in --demo on first use, 10-20 minutes on 2 cores). dens-export --int8 calibrates it on the first 300
images of its cohort and holds 60 of them out; the demo's separate 6-patient cohort and the real
mammograms (DENS_REAL_MAMMO, or --real) are unseen by calibration altogether.

The CPU's int8 instructions are recorded (AVX2, AVX512-VNNI, AVX-VNNI, AMX): they decide how fast each
format runs (on the 2-core EPYCs measured so far ``u8s8`` gave 1.6-2.1x fp32 with AVX2 only and 3.4-3.7x with
AVX512-VNNI; ``s8s8`` 1.1-1.3x on both).
Writes bench/results/int8-<host>-<time>.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DEFAULT_COHORT, REAL_MAMMO, REPO, ensure_cohort, export_models, shown, write_result
from dens import usable_cores
from pipeline import bench_dens_infer

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "amx_tile")
DEFAULT_DEMO = REPO / ".cache" / "int8-demo"  # git-ignored
# The Makefile's demo, step by step (its cohorts and its training run).
DEMO_STEPS = (
    ["dens-synth", "{demo}/cohort", "--patients", "100", "--size", "small", "--seed", "1", "--overwrite"],
    ["dens-synth", "{demo}/studies", "--patients", "6", "--size", "small", "--seed", "2", "--overwrite"],
    [
        "dens-train",
        "--data",
        "{demo}/cohort",
        "--out",
        "{demo}/runs/demo",
        "--arch",
        "resnet18",
        "--weights",
        "none",
        "--size",
        "128",
        "--epochs",
        "6",
        "--batch-size",
        "16",
        "--lr",
        "1e-3",
        "--cache",
        "{demo}/.cache",
        "--no-progress",
    ],
)


def cpu_flags() -> list[str]:
    """The int8-relevant instruction sets /proc/cpuinfo lists for this CPU."""
    try:
        flags = next(
            (
                line.split(":", 1)[1].split()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("flags")
            ),
            [],
        )
    except OSError:
        return []
    return [f for f in CPU_FLAGS if f in flags]


def ensure_demo(demo: Path) -> Path:
    """The demo checkpoint in ``demo``, trained by the Makefile's recipe unless it is there already."""
    checkpoint = demo / "runs" / "demo" / "best.pt"
    if checkpoint.is_file():
        return checkpoint
    print(f"training the demo model in {demo} (the Makefile's recipe; 10-20 minutes on 2 cores) ...", flush=True)
    bin_dir = Path(sys.executable).parent
    for step in DEMO_STEPS:
        command = [str(bin_dir / step[0]), *(s.format(demo=demo) for s in step[1:])]
        subprocess.run(command, check=True)
    return checkpoint


def model_stage(graphs: dict[str, Path], batches: list[int], seconds: float, rounds: int) -> list[dict]:
    """img/s of each graph at each batch size through dens.scoring.runtime, every core, graphs taking turns."""
    import numpy as np

    from dens.scoring.runtime import open_runtime

    threads = usable_cores()
    runtimes = {name: open_runtime(path, "cpu", threads=threads) for name, path in graphs.items()}
    size = next(iter(runtimes.values())).preprocess.size
    best: dict[tuple[str, int], float] = {}
    for r in range(rounds):
        for batch in batches:
            x = np.random.default_rng(batch).integers(0, 256, (batch, 1, size, size), dtype=np.uint8)
            for name, rt in runtimes.items():
                rt.predict(x)  # warm-up: first-call allocations at this shape
                images, start = 0, time.perf_counter()
                while images < 2 * batch or time.perf_counter() - start < seconds:
                    rt.predict(x)
                    images += batch
                rate = images / (time.perf_counter() - start)
                best[name, batch] = max(best.get((name, batch), 0.0), rate)
                print(f"round {r + 1}/{rounds}: {name} batch {batch}: {rate:.2f} img/s", flush=True)
    rows = []
    for batch in batches:
        for name in graphs:
            row = {"graph": name, "batch": batch, "threads": threads, "img_per_s": round(best[name, batch], 3)}
            if name != "fp32":
                row["speedup"] = round(best[name, batch] / best["fp32", batch], 2)
            rows.append(row)
    return rows


def agreement(checkpoint: Path, demo: Path, real: Path | None, work: Path, int8_format: str) -> dict:
    """dens-export --int8 on the demo model (held-out figures from its parity report), then the two graphs'
    agreement on the demo's unseen cohort and on the real mammograms."""
    import onnxruntime as ort

    from dens.artifact.metadata import INPUT, PROBS
    from dens.artifact.model import load_checkpoint
    from dens.export import ExportConfig, run
    from dens.export.parity import load_images
    from dens.export.quantize import decision_agreement

    out = work / int8_format / "model.onnx"
    cfg = ExportConfig(
        checkpoint=checkpoint, out=out, int8=True, calibrate=demo / "cohort", int8_format=int8_format, progress=False
    )
    start = time.perf_counter()
    result = run(cfg)
    seconds = time.perf_counter() - start
    report = next(m["report"] for m in result["models"] if m["precision"] == "int8")
    keys = ("images", "argmax_agreement", "dense_agreement", "dense_disagreements", "kappa")
    figures = {
        "model": "the demo model: resnet18, S=128, 6 epochs on the 100-patient synthetic cohort",
        "format": int8_format,
        "export_seconds": round(seconds, 1),
        "calibration_images": report["int8"]["calibration_images"],
        "parity_passed": report["passed"],
        "held_out": {
            **{k: report.get(k) for k in keys},
            "mean_abs_prob_diff": report.get("mean_abs_prob_diff"),
            "max_abs_prob_diff": report.get("max_abs_prob_diff"),
        },
    }
    ckpt = load_checkpoint(checkpoint)
    sessions = {
        p: ort.InferenceSession(str(f), providers=["CPUExecutionProvider"])
        for p, f in (("fp32", out), ("int8", out.with_name("model.int8.onnx")))
    }
    sets = {"unseen_synthetic": demo / "studies"}
    if real is not None:
        sets["real"] = real
    for name, folder in sets.items():
        images = load_images(folder, ckpt, max_images=10_000).images
        if not len(images):
            figures[name] = {"images": 0}
            continue
        probs = {p: s.run([PROBS], {INPUT: images})[0] for p, s in sessions.items()}
        found = decision_agreement(probs["fp32"], probs["int8"], list(ckpt.classes))
        figures[name] = {k: found[k] for k in (*keys, "mean_abs_prob_diff", "max_abs_prob_diff", "reference_classes")}
        figures[name]["source"] = shown(folder)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohort", type=Path, default=DEFAULT_COHORT, help="full-size cohort for speed [%(default)s]")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch-sizes", default="1,4,8,16")
    parser.add_argument("--seconds", type=float, default=4.0, help="per graph, batch size and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calibration-images", type=int, default=40, help="speed graphs: images from --cohort")
    parser.add_argument("--demo", type=Path, default=DEFAULT_DEMO, help="the demo model's folder [%(default)s]")
    parser.add_argument("--real", type=Path, default=REAL_MAMMO, help="real mammograms [DENS_REAL_MAMMO]")
    parser.add_argument("--skip-agreement", action="store_true")
    args = parser.parse_args()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    load_before = os.getloadavg()
    flags = cpu_flags()
    print(f"CPU int8 instructions: {', '.join(flags) or 'none listed'}", flush=True)
    cohort = ensure_cohort(args.cohort)
    results: dict = {"cpu_flags": flags, "vnni": any("vnni" in f or f.startswith("amx") for f in flags)}

    from dens.artifact.model import load_checkpoint
    from dens.export.parity import load_images
    from dens.export.quantize import INT8_FORMATS, quantize_int8, split_calibration

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"exporting a random-init {args.arch} at S={args.size} and quantizing it ...", flush=True)
        checkpoint, fp32, _ = export_models(tmp, args.arch, args.size)
        split = split_calibration(load_images(cohort, load_checkpoint(checkpoint), max_images=args.calibration_images))
        graphs = {"fp32": fp32}
        for fmt in INT8_FORMATS:
            t0 = time.perf_counter()
            graphs[f"int8 {fmt}"] = quantize_int8(fp32, tmp / f"model.{fmt}.int8.onnx", split, int8_format=fmt)
            print(f"quantized ({fmt}) in {time.perf_counter() - t0:.0f} s", flush=True)
        results["model_stage"] = model_stage(graphs, batches, args.seconds, args.rounds)

        runs: dict[str, list[dict]] = {"fp32": [], "int8": []}
        for _ in range(2):
            for name, path in (("fp32", fp32), ("int8", graphs["int8 u8s8"])):
                runs[name].append(bench_dens_infer(cohort, path, tmp / f"{name}.csv", "cpu", None, None, None))
        best = {name: max(r, key=lambda d: d["img_per_s"]) for name, r in runs.items()}
        results["end_to_end"] = {
            "images": best["fp32"]["images"],
            "fp32": best["fp32"],
            "int8": best["int8"],
            "all_runs_img_per_s": {name: [d["img_per_s"] for d in r] for name, r in runs.items()},
            "speedup": round(best["int8"]["img_per_s"] / best["fp32"]["img_per_s"], 2),
            "speedup_in_process": round(best["int8"]["in_process_img_per_s"] / best["fp32"]["in_process_img_per_s"], 2),
        }
        print(f"end to end: {results['end_to_end']['all_runs_img_per_s']}", flush=True)

        if not args.skip_agreement:
            real = args.real if args.real.is_dir() else None
            demo = ensure_demo(args.demo)
            results["agreement"] = {fmt: agreement(demo, args.demo, real, tmp / "demo", fmt) for fmt in INT8_FORMATS}

    settings = {
        "arch": args.arch,
        "size": args.size,
        "batch_sizes": batches,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "cohort": shown(cohort),
        "calibration_images": args.calibration_images,
        "demo": shown(args.demo),
        "real": shown(args.real) if args.real.is_dir() else None,
        "provider": "CPUExecutionProvider",
    }
    out = write_result("int8", {"settings": settings, "results": results, "load_average_before": load_before})
    stage = {(r["graph"], r["batch"]): r for r in results["model_stage"]}
    for b in batches:
        print(
            f"batch {b}: fp32 {stage['fp32', b]['img_per_s']:.2f} img/s, "
            + ", ".join(
                f"{g} {stage[g, b]['img_per_s']:.2f} (x{stage[g, b]['speedup']})" for g in graphs if g != "fp32"
            )
        )
    e2e = results["end_to_end"]
    fp32_rate, int8_rate = e2e["fp32"]["img_per_s"], e2e["int8"]["img_per_s"]
    print(f"end to end: fp32 {fp32_rate:.2f}, int8 {int8_rate:.2f} img/s (x{e2e['speedup']})")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
