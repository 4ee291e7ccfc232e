"""Full- vs reduced-resolution decode time per file, on a full-size synthetic cohort and real files.

    python bench/decode.py [--cohort DIR] [--real DIR] [--repeat 3] [--size 512]

The cohort defaults to the one `make bench` shares (.cache/bench-cohort, made by dens-synth when absent: all
four detector sizes, every transfer syntax dens-synth writes). For each file: the full-resolution decode
(level 0), the reduced decode at the level `dens.route.preprocess.load` picks, and `load` end to end with and
without reduction; the best of --repeat. Summaries per transfer syntax, per (size, syntax), and for the
target the issue sets, JPEG 2000 on full-size files: the median of per-file speed-ups and the throughput
ratio (summed full-decode time over summed reduced time, which is what img/s sees).
Writes bench/results/decode-<host>-<time>.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DEFAULT_COHORT, REAL_MAMMO, REAL_MAMMO_ENV, ensure_cohort, shown, write_result
from dens.route import dicom
from dens.route.errors import UnusableFile
from dens.route.preprocess import PreprocessConfig, load


def _best_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return min(times)


def bench_file(path: Path, cfg: PreprocessConfig, repeat: int) -> dict:
    """Time one file; a fresh DicomFile per call so no decoded array is reused between timings."""
    try:
        _, info = load(path, cfg)
    except UnusableFile as exc:
        return {"file": path.name, "status": exc.reason.value}
    level = info.reduce_level
    full_ms = _best_ms(lambda: dicom.read(path).decode(0), repeat)
    reduced_ms = _best_ms(lambda: dicom.read(path).decode(level), repeat)
    load_ms = _best_ms(lambda: load(path, cfg), repeat)
    load_full_ms = _best_ms(lambda: load(path, PreprocessConfig(size=cfg.size, reduce=False)), repeat)
    return {
        "file": path.name,
        "transfer_syntax": info.transfer_syntax,
        "shape": [info.rows, info.cols],
        "level": level,
        "route": info.decode_route,
        "full_decode_ms": round(full_ms, 1),
        "reduced_decode_ms": round(reduced_ms, 1),
        "decode_speedup": round(full_ms / reduced_ms, 2),
        "load_reduced_ms": round(load_ms, 1),
        "load_full_ms": round(load_full_ms, 1),
        "load_speedup": round(load_full_ms / load_ms, 2),
    }


def _stats(group: list[dict]) -> dict:
    full = sum(r["full_decode_ms"] for r in group)
    reduced = sum(r["reduced_decode_ms"] for r in group)
    return {
        "files": len(group),
        "levels": sorted({r["level"] for r in group}),
        "median_full_decode_ms": statistics.median(r["full_decode_ms"] for r in group),
        "median_reduced_decode_ms": statistics.median(r["reduced_decode_ms"] for r in group),
        "median_decode_speedup": statistics.median(r["decode_speedup"] for r in group),
        "throughput_speedup": round(full / reduced, 2),
        "median_load_speedup": statistics.median(r["load_speedup"] for r in group),
    }


def summarise(rows: list[dict]) -> dict:
    timed = [r for r in rows if "full_decode_ms" in r]
    by_syntax: dict[str, list[dict]] = {}
    by_size: dict[str, list[dict]] = {}
    for row in timed:
        by_syntax.setdefault(row["transfer_syntax"], []).append(row)
        by_size.setdefault(f"{row['shape'][0]}x{row['shape'][1]} {row['transfer_syntax']}", []).append(row)
    j2k = [r for r in timed if r["transfer_syntax"] in dicom.JPEG2000_SYNTAXES]
    return {
        "by_transfer_syntax": {ts: _stats(group) for ts, group in sorted(by_syntax.items())},
        "by_size_and_syntax": {key: _stats(group) for key, group in sorted(by_size.items())},
        "jpeg2000": _stats(j2k) if j2k else None,
    }


def per_group(files: list[Path], n: int) -> list[Path]:
    """The first ``n`` files of each (rows, columns, transfer syntax) group, from their headers (an unusable
    file is kept: bench_file records why)."""
    kept, seen = [], {}
    for path in files:
        try:
            f = dicom.read(path)
        except UnusableFile:
            kept.append(path)
            continue
        key = (*f.shape, f.transfer_syntax)
        seen[key] = seen.get(key, 0) + 1
        if seen[key] <= n:
            kept.append(path)
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--cohort",
        type=Path,
        default=DEFAULT_COHORT,
        help="a full-size dens-synth cohort; made there first when absent [%(default)s]",
    )
    parser.add_argument(
        "--real",
        type=Path,
        default=REAL_MAMMO,
        help=f"a folder of real mammograms [${REAL_MAMMO_ENV}]; synthetic files only without one",
    )
    parser.add_argument("--size", type=int, default=512, help="canonical image size S")
    parser.add_argument("--repeat", type=int, default=3, help="timings per file (the best is kept)")
    parser.add_argument(
        "--per-group",
        type=int,
        default=3,
        help="synthetic files timed per (size, transfer syntax), the first by name [%(default)s]",
    )
    args = parser.parse_args()
    cfg = PreprocessConfig(size=args.size)

    cohort = ensure_cohort(args.cohort)
    sets = {"synthetic_full": per_group(sorted(cohort.rglob("*.dcm")), args.per_group)}
    if args.real.is_dir():
        sets["real"] = sorted(p for p in args.real.rglob("*") if p.is_file() and p.suffix not in (".csv", ".md"))
    else:
        print(f"no real mammograms at {args.real} (set {REAL_MAMMO_ENV} to a folder of them): synthetic files only")
    results = {}
    for name, files in sets.items():
        rows = []
        for path in files:
            row = bench_file(path, cfg, args.repeat)
            rows.append(row)
            print(f"{name:15s} {row}", flush=True)
        results[name] = {"files": rows, **summarise(rows)}

    out = write_result(
        "decode",
        {
            "settings": {
                "size": args.size,
                "repeat": args.repeat,
                "cohort": shown(cohort),
                "per_group": args.per_group,
                "real": shown(args.real) if "real" in sets else None,
            },
            "results": results,
        },
    )
    for name, res in results.items():
        for key, s in [*res["by_size_and_syntax"].items(), ("all JPEG 2000", res["jpeg2000"])]:
            if s:
                print(
                    f"{name:15s} {key:40s} n={s['files']:2d} level {s['levels']} "
                    f"full {s['median_full_decode_ms']:7.1f} ms  reduced {s['median_reduced_decode_ms']:6.1f} ms  "
                    f"x{s['median_decode_speedup']:.1f} "
                    f"(throughput x{s['throughput_speedup']:.1f}, load x{s['median_load_speedup']:.1f})"
                )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
