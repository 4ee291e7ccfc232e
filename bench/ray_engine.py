"""dens-infer's Ray engine against its local engine on the same files, Ray nodes added, and the driver's
memory on a manifest of a million paths.

    python bench/ray_engine.py [--patients 50] [--arch resnet18] [--size 256] [--rounds 2]
                               [--manifest-paths 1000000]

1. **Overhead**: dens-infer over a dens-synth cohort (``--patients`` x 4 views, small detector size, so that
   each run is long enough to count and short enough to repeat) with ``--engine local`` and ``--engine ray``
   (a local Ray that dens-infer starts itself), taking turns, ``--rounds`` times each; wall time of the whole
   command, start-up included, as a user sees it. The ratio ray/local is the engine's cost.
2. **Nodes**: a Ray head started with ``ray start --num-cpus 1`` on the loopback address, dens-infer joining it
   (``--ray-address``); then a second node of 1 CPU, and the same run again. On a 2-core machine the driver,
   the raylets and both nodes share the two cores: the figure says what Ray's scheduling gives, not what two
   machines would.
3. **Driver memory**: a Parquet manifest of ``--manifest-paths`` paths, the cohort's files followed by paths
   that do not exist (as an archive export names files since deleted), run with ``--engine ray``; the
   driver's peak RSS (VmHWM, read from /proc while it runs) beside the same for a manifest of 10,000 paths:
   flat, when the manifest is streamed rather than held.

Writes bench/results/ray_engine-<host>-<time>.json.
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

import pandas as pd

from common import REPO, export_models, write_result

DENS_INFER = [sys.executable, "-c", "from dens.infer.cli import main; main()"]
BIN = Path(sys.executable).parent
# Loopback only: no token between the nodes this benchmark starts (a real cluster keeps Ray's token auth on).
RAY_ENV = {**os.environ, "RAY_AUTH_MODE": "disabled"}


def _peak_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def dens_infer(studies: Path, model: Path, out: Path, *extra: str) -> dict:
    """One dens-infer run as a user starts it: wall seconds, rows, ok rows, and the driver's peak RSS."""
    command = [*DENS_INFER, str(studies), "--model", str(model), "--out", str(out), "--overwrite", "--no-progress"]
    start = time.perf_counter()
    proc = subprocess.Popen([*command, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=RAY_ENV)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, _peak_rss_mib(proc.pid) or 0.0)  # VmHWM only grows: the last reading is within 0.2 s
        time.sleep(0.2)
    seconds = time.perf_counter() - start
    stdout, stderr = proc.communicate()
    if proc.returncode not in (0, 3):  # 3: error rows (the manifest's missing paths)
        raise SystemExit(f"dens-infer {' '.join(extra)} failed ({proc.returncode}):\n{stdout}\n{stderr[-3000:]}")
    rows = pd.read_csv(out, usecols=["status"], dtype=str)
    ok = int((rows["status"] == "ok").sum())
    return {
        "seconds": round(seconds, 2),
        "files": len(rows),
        "ok": ok,
        "img_per_s": round(ok / seconds, 3),
        "files_per_s": round(len(rows) / seconds, 1),
        "driver_peak_rss_mib": round(peak, 1),
    }


def ray(*args: str) -> None:
    subprocess.run([str(BIN / "ray"), *args], check=True, capture_output=True, timeout=300, env=RAY_ENV)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=50, help="dens-synth patients (4 files each)")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--manifest-paths", type=int, default=1_000_000)
    parser.add_argument("--port", type=int, default=6479, help="the Ray head's port on 127.0.0.1")
    args = parser.parse_args()

    from dens.synth import generate

    cohort = REPO / ".cache" / f"ray-bench-cohort-{args.patients}"
    if not (cohort / "train.csv").is_file():
        generate(cohort, patients=args.patients, size="small", seed=5, overwrite=True, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _, model, _ = export_models(tmp, args.arch, args.size)
        out = tmp / "preds.csv"

        runs: dict[str, list[dict]] = {"local": [], "ray": []}
        for round_ in range(args.rounds):
            for engine in ("local", "ray") if round_ % 2 == 0 else ("ray", "local"):
                runs[engine].append(dens_infer(cohort, model, out, "--engine", engine))
                print(f"{engine:6s} {runs[engine][-1]}", flush=True)
        best = {engine: min(r["seconds"] for r in rs) for engine, rs in runs.items()}

        nodes = {}
        node = ["--node-ip-address=127.0.0.1", "--num-cpus=1"]
        address = f"127.0.0.1:{args.port}"
        try:
            ray("start", "--head", f"--port={args.port}", "--include-dashboard=false", *node)
            nodes["1 node x 1 CPU"] = dens_infer(cohort, model, out, "--engine", "ray", "--ray-address", address)
            print(f"1 node  {nodes['1 node x 1 CPU']}", flush=True)
            ray("start", f"--address={address}", *node)
            nodes["2 nodes x 1 CPU"] = dens_infer(cohort, model, out, "--engine", "ray", "--ray-address", address)
            print(f"2 nodes {nodes['2 nodes x 1 CPU']}", flush=True)
        finally:
            subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True, timeout=120, env=RAY_ENV)

        present = sorted(str(p) for p in cohort.rglob("*.dcm"))
        manifests = {}
        for count in (10_000, args.manifest_paths):
            manifest = tmp / f"manifest-{count}.parquet"
            missing = (f"/archive/gone/{i:07d}.dcm" for i in range(count - len(present)))
            pd.DataFrame({"path": [*present, *missing]}).to_parquet(manifest)
            manifests[count] = dens_infer(manifest, model, out, "--engine", "ray")
            print(f"manifest {count}: {manifests[count]}", flush=True)

    result = {
        "settings": {**vars(args), "cohort_files": runs["local"][0]["files"], "model": f"{args.arch} S={args.size}"},
        "results": {
            "runs": runs,
            "best_seconds": best,
            "overhead_ratio": round(best["ray"] / best["local"], 2),
            "nodes": nodes,
            "node_speedup": round(nodes["2 nodes x 1 CPU"]["img_per_s"] / nodes["1 node x 1 CPU"]["img_per_s"], 2),
            "manifest": {str(k): v for k, v in manifests.items()},
        },
    }
    path = write_result("ray_engine", result)
    print(f"ray/local {result['results']['overhead_ratio']}x; 2 nodes/1 node {result['results']['node_speedup']}x")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
