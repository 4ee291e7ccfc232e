"""The canonical image on real archives, before (route version 1) and after (version 2), in one run.

    python bench/canonical.py [--real DIR] [--sheets DIR] [--repeat 3]

For every real mammogram (DENS_REAL_MAMMO, see bench/common.py), per source (vendor or film): the breast's
fill of the canvas and the in-breast 2nd-98th percentile span and median grey (0-255) of the canonical image,
through version 1 (512 x 512, no harmonisation, the largest bright component) and version 2 (H x W canvas,
film labels cut off, each image's in-breast range stretched); version 3, the default, is measured on real
labelled images by bench/real_proxies.py and per file's cost by bench/route_cost.py. Both routes are measured
with one breast mask (version 2's, on the canonical image), so the figures differ only by what the route did.
Also: the crop boxes; the mean in-breast grey of synthetic fatty (A) and dense (D) phantoms of one machine,
with and without harmonisation (the guard that density is not flattened); the model's cost per image at both
canvases (FLOPs, and the best of --repeat forward passes on the CPU). Writes bench/results/canonical.json and
the contact sheets canonical-before.png / canonical-after.png (into --sheets, bench/results by default).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REAL_MAMMO, REAL_MAMMO_ENV, RESULTS, command, machine, shown
from dens.qc.sheet import contact_sheet
from dens.route import geometry, preprocess
from dens.route.config import PreprocessConfig

ROUTES = {"before": PreprocessConfig(version=1, size=512), "after": PreprocessConfig(version=2)}


def breast_stats(image: np.ndarray) -> dict:
    """Fill of the canvas and in-breast grey levels of a canonical uint8 image."""
    mask, _ = geometry.breast_mask(image.astype(np.float32) / 255.0)
    full = cv2.resize(mask.astype(np.uint8), (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST) > 0
    values = image[full]
    p2, p50, p98 = np.percentile(values, [2, 50, 98]) if values.size else (0.0, 0.0, 0.0)
    return {
        "fill": round(float(full.mean()), 3),
        "p2": round(float(p2), 1),
        "median": round(float(p50), 1),
        "p98": round(float(p98), 1),
        "span": round(float(p98 - p2), 1),
    }


def source_of(path: Path, info: preprocess.ImageInfo) -> str:
    maker = " ".join(part for part in (info.manufacturer, info.manufacturer_model) if part)
    return f"{path.parent.name} ({maker})" if maker else path.parent.name


def real_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() not in (".md", ".csv", ".txt"))


def measure_real(root: Path) -> tuple[list[dict], dict[str, list]]:
    rows, tiles = [], {name: [] for name in ROUTES}
    for path in real_files(root):
        row = {"file": str(path.relative_to(root))}
        for name, cfg in ROUTES.items():
            try:
                image, info = preprocess.load(path, cfg)
            except Exception as exc:  # a file this machine cannot decode is reported, not fatal
                row[name] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            row["source"] = source_of(path, info)
            row[name] = {**breast_stats(image), "crop_box": list(info.crop_box), "rows": info.rows, "cols": info.cols}
            s = row[name]
            tiles[name].append(
                (
                    image,
                    [
                        row["file"],
                        f"{row['source']}",
                        f"{info.laterality} {info.view}  crop y{s['crop_box'][:2]} x{s['crop_box'][2:]}",
                        f"fill {s['fill']:.0%}  median {s['median']:.0f}  p2-98 {s['p2']:.0f}-{s['p98']:.0f}",
                    ],
                )
            )
        rows.append(row)
    return rows, tiles


def per_source(rows: list[dict]) -> dict:
    out: dict[str, dict] = {}
    for source in sorted({r["source"] for r in rows if "source" in r}):
        mine = [r for r in rows if r.get("source") == source]
        out[source] = {"files": len(mine)}
        for name in ROUTES:
            ok = [r[name] for r in mine if "fill" in r[name]]
            out[source][name] = {
                key: round(statistics.median(s[key] for s in ok), 3 if key == "fill" else 1)
                for key in ("fill", "median", "span", "p2", "p98")
            }
    for name in ROUTES:
        ok = [r[name] for r in rows if "fill" in r.get(name, {})]
        out.setdefault("all", {"files": len(ok)})[name] = {"fill": round(statistics.median(s["fill"] for s in ok), 3)}
    return out


def phantoms() -> dict:
    """Mean in-breast grey of one machine's fatty (A) and dense (D) phantoms, with and without harmonisation."""
    from dens.synth.image import write_image
    from dens.synth.spec import MACHINES

    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for draw in range(4):
            for density, fraction in (("A", 0.08), ("D", 0.85)):
                spec = _phantom_spec(draw, density, fraction, MACHINES[0])
                write_image(tmp, spec)
                for name, cfg in ROUTES.items():
                    image, _ = preprocess.load(Path(tmp) / spec.path, dataclasses.replace(cfg, reduce=False))
                    mask, _ = geometry.breast_mask(image.astype(np.float32) / 255.0)
                    small = cv2.resize(image, (mask.shape[1], mask.shape[0]), interpolation=cv2.INTER_AREA)
                    out.setdefault(name, {}).setdefault(density, []).append(round(float(small[mask].mean()), 1))
    return {
        name: {**by, "median_gap_D_minus_A": round(statistics.median(np.subtract(by["D"], by["A"])), 1)}
        for name, by in out.items()
    }


def _phantom_spec(draw: int, density: str, fraction: float, machine):
    from dens.synth.spec import ImageSpec

    return ImageSpec(
        key=(7, draw, 0),
        path=f"{draw}-{density}.dcm",
        patient_id=f"P{draw}",
        accession=f"A{draw:08d}",
        study_uid=f"1.2.3.{draw}",
        series_uid=f"1.2.3.{draw}.1",
        sop_uid=f"1.2.3.{draw}.1.{ord(density)}",
        laterality="L",
        view="CC",
        density=density,
        fraction=fraction,
        size=0.8,
        age=55,
        study_date="20240101",
        machine=machine,
        rows=machine.small[0],
        cols=machine.small[1],
        syntax="1.2.840.10008.1.2.1",
        photometric="MONOCHROME2",
        orientation_tag=True,
        laterality_tag=True,
    )


def model_cost(repeat: int) -> dict:
    """FLOPs per image (torch's counter) and the CPU cost at each route's canvas: torch eager at batch 1
    (best of ``repeat``), and ONNX Runtime as dens-infer runs it (the exported graph, dens-infer's CPU batch
    and threads), the two canvases taking turns for ``repeat`` rounds of a few seconds each, best round's
    milliseconds per image."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dens.artifact.model import ARCHS, build_model, save_checkpoint
    from dens.export.onnx import export_onnx
    from dens.scoring.runtime import open_runtime

    torch.set_num_threads(2)
    out: dict[str, dict] = {}
    for arch in ARCHS:
        net = build_model(arch).eval()
        runtimes = {}
        with tempfile.TemporaryDirectory() as tmp:
            for name, cfg in ROUTES.items():
                x = torch.zeros((1, 1, *cfg.shape), dtype=torch.uint8)
                with torch.inference_mode():
                    with FlopCounterMode(display=False) as counter:
                        net(x)
                    times = []
                    for _ in range(repeat):
                        t0 = time.perf_counter()
                        net(x)
                        times.append((time.perf_counter() - t0) * 1000)
                out.setdefault(arch, {})[name] = {
                    "canvas": f"{cfg.height}x{cfg.width}",
                    "gflops": round(counter.get_total_flops() / 1e9, 3),
                    "cpu_ms_best": round(min(times), 1),
                }
                save_checkpoint(Path(tmp) / f"{name}.pt", net, cfg)
                runtimes[name] = open_runtime(export_onnx(Path(tmp) / f"{name}.pt", Path(tmp) / f"{name}.onnx"), "cpu")
            ort_ms: dict[str, list[float]] = {name: [] for name in ROUTES}
            for _ in range(repeat):
                for name, runtime in runtimes.items():
                    batch = np.zeros((runtime.batch_size, 1, *ROUTES[name].shape), np.uint8)
                    runtime.predict(batch)  # warm
                    images, t0 = 0, time.perf_counter()
                    while time.perf_counter() - t0 < 3.0:
                        runtime.predict(batch)
                        images += len(batch)
                    ort_ms[name].append((time.perf_counter() - t0) * 1000 / images)
            for name, runtime in runtimes.items():
                out[arch][name]["ort_ms_per_image"] = round(min(ort_ms[name]), 1)
                out[arch][name]["ort_batch"] = runtime.batch_size
        out[arch]["gflops_ratio_after_over_before"] = round(
            out[arch]["after"]["gflops"] / out[arch]["before"]["gflops"], 3
        )
        out[arch]["ort_ratio_after_over_before"] = round(
            out[arch]["after"]["ort_ms_per_image"] / out[arch]["before"]["ort_ms_per_image"], 3
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", type=Path, default=REAL_MAMMO, help=f"real mammograms [${REAL_MAMMO_ENV}]")
    parser.add_argument("--sheets", type=Path, default=RESULTS, help="where the contact sheets go")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if not args.real.is_dir():
        sys.exit(f"no real mammograms at {shown(args.real)}: set {REAL_MAMMO_ENV} to a folder of them")
    rows, tiles = measure_real(args.real)
    args.sheets.mkdir(parents=True, exist_ok=True)
    sheets = {}
    for name, shown_tiles in tiles.items():
        sheets[name] = args.sheets / f"canonical-{name}.png"
        cv2.imwrite(
            str(sheets[name]), contact_sheet(shown_tiles, columns=5, tile_height=300), [cv2.IMWRITE_PNG_COMPRESSION, 9]
        )
    record = {
        "benchmark": "canonical",
        "machine": machine(),
        "command": command(),
        "settings": {
            "real": shown(args.real),
            "routes": {name: cfg.to_dict() for name, cfg in ROUTES.items()},
            "sheets": {name: shown(path) for name, path in sheets.items()},
        },
        "per_source": per_source(rows),
        "files": rows,
        "phantoms": phantoms(),
        "model_cost": model_cost(args.repeat),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "canonical.json"
    out.write_text(json.dumps(record, indent=2))
    print(json.dumps({"per_source": record["per_source"], "phantoms": record["phantoms"]}, indent=1))
    print(json.dumps(record["model_cost"], indent=1))
    print(f"wrote {shown(out)}, {', '.join(shown(p) for p in sheets.values())}")


if __name__ == "__main__":
    main()
