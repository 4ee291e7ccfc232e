"""What the route costs per full-size file, version by version: ``dens.route.preprocess.load`` on every real DICOM
sample (DENS_REAL_MAMMO, see bench/common.py), in one process, the versions taking turns file by file and
round by round, the best of --repeat rounds per file and version (a shared machine's load only ever adds).

    python bench/route_cost.py [--repeat 5]

Writes bench/results/route_cost-<host>-<time>.json: per file and version the best milliseconds, and per version
the median over files and its ratio to version 1's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REAL_MAMMO, REAL_MAMMO_ENV, shown, write_result
from dens.route import families, preprocess
from dens.route.config import PreprocessConfig

ROUTES = {
    "1": PreprocessConfig(version=1),
    "2": PreprocessConfig(version=2),
    # Fitted, as a trained model's config is: the table lookup is part of the cost.
    "3": PreprocessConfig(version=3, families=((families.POOLED, 0.1, 0.8),)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="rounds; the best of them counts")
    args = parser.parse_args()
    if not REAL_MAMMO.is_dir():
        sys.exit(f"no real mammograms at {shown(REAL_MAMMO)}: set {REAL_MAMMO_ENV} to a folder of them")
    files = sorted(p for p in REAL_MAMMO.rglob("*") if p.is_file() and p.suffix.lower() not in (".csv", ".md"))
    best: dict[str, dict[str, float]] = {p.name: {} for p in files}
    for _ in range(args.repeat):
        for path in files:
            for version, cfg in ROUTES.items():
                t0 = time.perf_counter()
                try:
                    preprocess.load(path, cfg)
                except preprocess.UnusableFile:
                    break
                ms = (time.perf_counter() - t0) * 1000
                best[path.name][version] = min(ms, best[path.name].get(version, ms))
    best = {name: {v: round(ms, 1) for v, ms in by.items()} for name, by in best.items() if by}
    medians = {v: statistics.median(by[v] for by in best.values()) for v in ROUTES}
    summary = {v: {"median_ms": round(ms, 1), "vs_version_1": round(ms / medians["1"], 3)} for v, ms in medians.items()}
    for name, by in best.items():
        print(name, "  ".join(f"v{v} {ms:7.1f} ms" for v, ms in by.items()))
    print("median:", "  ".join(f"v{v} {s['median_ms']} ms ({s['vs_version_1']}x v1)" for v, s in summary.items()))
    write_result("route_cost", {"files": len(best), "repeat": args.repeat, "per_file_ms": best, "median": summary})


if __name__ == "__main__":
    main()
