"""Full- vs reduced-resolution decode time per file, on a full-size synthetic cohort and real files.

    python bench/decode.py [--cohort DIR] [--patients 3] [--real ../shared/data/real-mammo] [--repeat 3]

Without --cohort it makes a full-size synthetic cohort in a temporary folder (dens-synth). For each file:
the full-resolution decode (level 0), the reduced decode at the level `dens.preprocess.load` picks, and
`load` end to end. Writes bench/results/decode-<host>-<time>.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result
from dens import dicom
from dens.dicom import UnusableFile
from dens.preprocess import PreprocessConfig, load

REAL_DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-mammo"


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


def summarise(rows: list[dict]) -> dict:
    by_syntax: dict[str, list[dict]] = {}
    for row in rows:
        if "full_decode_ms" in row:
            by_syntax.setdefault(row["transfer_syntax"], []).append(row)
    return {
        ts: {
            "files": len(group),
            "median_full_decode_ms": statistics.median(r["full_decode_ms"] for r in group),
            "median_reduced_decode_ms": statistics.median(r["reduced_decode_ms"] for r in group),
            "median_decode_speedup": statistics.median(r["decode_speedup"] for r in group),
            "median_load_speedup": statistics.median(r["load_speedup"] for r in group),
        }
        for ts, group in sorted(by_syntax.items())
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohort", type=Path, help="a dens-synth cohort (default: make a full-size one)")
    parser.add_argument("--patients", type=int, default=3, help="patients in the generated cohort")
    parser.add_argument("--real", type=Path, default=REAL_DEFAULT, help="folder of real DICOM files")
    parser.add_argument("--size", type=int, default=512, help="canonical image size S")
    parser.add_argument("--repeat", type=int, default=3, help="timings per file (the best is kept)")
    args = parser.parse_args()
    cfg = PreprocessConfig(size=args.size)

    with tempfile.TemporaryDirectory() as tmp:
        cohort = args.cohort
        if cohort is None:
            from dens.synth import generate

            cohort = Path(tmp) / "cohort"
            print(f"making a full-size synthetic cohort of {args.patients} patients in {cohort} ...")
            generate(cohort, patients=args.patients, size="full", seed=7)
        sets = {"synthetic_full": sorted(cohort.rglob("*.dcm"))}
        if args.real.is_dir():
            sets["real"] = sorted(p for p in args.real.rglob("*") if p.is_file() and p.suffix not in (".csv", ".md"))
        results = {}
        for name, files in sets.items():
            rows = []
            for path in files:
                row = bench_file(path, cfg, args.repeat)
                rows.append(row)
                print(f"{name:15s} {row}")
            results[name] = {"files": rows, "by_transfer_syntax": summarise(rows)}

    out = write_result("decode", {"settings": {"size": args.size, "repeat": args.repeat,
                                               "patients": args.patients, "cohort": str(args.cohort or "generated")},
                                  "results": results})
    for name, res in results.items():
        for ts, s in res["by_transfer_syntax"].items():
            print(f"{name:15s} {ts:28s} n={s['files']:3d} full {s['median_full_decode_ms']:7.1f} ms  "
                  f"reduced {s['median_reduced_decode_ms']:6.1f} ms  x{s['median_decode_speedup']:.1f} "
                  f"(load x{s['median_load_speedup']:.1f})")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
