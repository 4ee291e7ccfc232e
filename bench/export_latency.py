"""What graph optimisation does for the exported model on ONNX Runtime's CPU provider.

    python bench/export_latency.py [--arch resnet50] [--size 512] [--batch-sizes 1,8] [--repeat 5] [--threads 1]

Exports one randomly initialised checkpoint (the weights do not change the cost) as it leaves torch's
exporter (BatchNorm already folded by its constant folding), after ORT's offline BASIC optimisation (what
`dens-export` saves), after offline EXTENDED (for comparison: CPU-specific fused ops) and as the fp16
variant. Each file is timed in a session with ORT's optimisations off (the graph as saved) and on (ORT's
default, ALL, which is what `dens-infer` gets): session creation, then the median and best of --repeat
runs per batch size after one warm-up, the sessions interleaved round by round (on a shared machine the
best is the steadier figure). Also records the fp16 variant's parity against fp32 PyTorch at
this size. Writes bench/results/export_latency-<host>-<time>.json.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result
from dens.artifact.metadata import INPUT
from dens.artifact.model import ARCHS, build_model, load_checkpoint, save_checkpoint
from dens.export.onnx import export_onnx
from dens.export.parity import check_parity
from dens.route.config import PreprocessConfig

LEVELS = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def make_session(path: Path, level: str, threads: int) -> tuple[ort.InferenceSession, float]:
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.intra_op_num_threads = threads
    t0 = time.perf_counter()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session, (time.perf_counter() - t0) * 1000


def time_sessions(
    sessions: dict[str, ort.InferenceSession], batch_sizes: list[int], size: int, repeat: int
) -> dict[str, dict[int, list[float]]]:
    """Milliseconds per run, sessions interleaved round by round so that a change in machine load (a shared
    machine) falls on every variant alike."""
    rng = np.random.default_rng(0)
    inputs = {b: rng.integers(0, 256, (b, 1, size, size), dtype=np.uint8) for b in batch_sizes}
    times: dict[str, dict[int, list[float]]] = {name: {b: [] for b in batch_sizes} for name in sessions}
    for round_ in range(repeat + 1):  # round 0 is the warm-up (first-run allocations), not recorded
        for b, x in inputs.items():
            for name, session in sessions.items():
                t = time.perf_counter()
                session.run(None, {INPUT: x})
                if round_:
                    times[name][b].append((time.perf_counter() - t) * 1000)
        print(f"round {round_}/{repeat}", flush=True)
    return times


def graph_facts(path: Path) -> dict:
    model = onnx.load(str(path))
    ops = collections.Counter(f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in model.graph.node)
    return {
        "nodes": len(model.graph.node),
        "ops": dict(sorted(ops.items())),
        "mib": round(path.stat().st_size / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50", choices=list(ARCHS))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="ORT intra-op threads (1: how dens-infer runs at 512, one session per worker; and a "
        "1-thread run suffers least from other load on a shared machine)",
    )
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        checkpoint = tmp / "best.pt"
        save_checkpoint(checkpoint, build_model(args.arch), PreprocessConfig(size=args.size))
        files = {
            "exported": export_onnx(checkpoint, tmp / "exported.onnx", optimize=False),
            "basic": export_onnx(checkpoint, tmp / "basic.onnx", optimize=True),
            "fp16": export_onnx(checkpoint, tmp / "fp16.onnx", optimize=True, fp16=True),
        }
        options = ort.SessionOptions()  # offline EXTENDED, for comparison only: dens-export never saves it
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(tmp / "extended.onnx")
        ort.InferenceSession(str(files["exported"]), options, providers=["CPUExecutionProvider"])
        files["extended"] = tmp / "extended.onnx"

        sessions, created, variants = {}, {}, {}
        for name, path in files.items():
            variants[name] = {"graph": graph_facts(path)}
            for level in ["all"] if name == "fp16" else ["disabled", "all"]:
                sessions[f"{name}/{level}"], created[f"{name}/{level}"] = make_session(path, level, args.threads)
        times = time_sessions(sessions, batch_sizes, args.size, args.repeat)
        for key, per_batch in times.items():
            name, level = key.split("/")
            cell = {"session_create_ms": round(created[key], 1)}
            for b, ms in per_batch.items():
                cell[f"batch{b}_ms_median"] = round(statistics.median(ms), 1)
                cell[f"batch{b}_ms_best"] = round(min(ms), 1)
                cell[f"batch{b}_img_per_s_best"] = round(b * 1000 / min(ms), 2)
            variants[name][f"session_{level}"] = cell
        del sessions
        parity = check_parity(files["fp16"], load_checkpoint(checkpoint), batch_sizes=tuple(batch_sizes))
        fp16_parity = {
            k: parity[k]
            for k in (
                "passed",
                "max_abs_prob_diff",
                "max_abs_logit_diff",
                "logit_rel_diff",
                "argmax_agreement",
                "thresholds",
            )
        }

    payload = {
        "arch": args.arch,
        "size": args.size,
        "batch_sizes": batch_sizes,
        "repeat": args.repeat,
        "provider": "CPUExecutionProvider",
        "intra_op_threads": args.threads,
        "weights": "random init",
        "variants": variants,
        "fp16_parity_vs_fp32_torch": fp16_parity,
    }
    out = write_result("export_latency", payload)
    for name, v in variants.items():
        for level in ("disabled", "all"):
            if f"session_{level}" in v:
                s = v[f"session_{level}"]
                cells = "  ".join(
                    f"b{b} median {s[f'batch{b}_ms_median']:.0f} best {s[f'batch{b}_ms_best']:.0f} ms"
                    for b in batch_sizes
                )
                print(f"{name:9s} session {level:8s} create {s['session_create_ms']:6.0f} ms  {cells}")
    print(f"fp16 parity: {fp16_parity}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
