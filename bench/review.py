"""What the review page costs: every view's thumbnail (decoded once more through the decode engine at the
display size, mirrored to PACS orientation, WebP) and a flagged view's overlay figure, per image and in
bytes, on the demo cohort (small dens-synth files) and on the real mammograms; with --screenshots, pictures
of the page itself.

For each image set and each model canvas (the default ResNet-50's 736x352, whose display image is its own
canvas, and a small model's 256x128, shown at 512x256) it records:
* the thumbnail pass: its wall seconds (the decode workers' start included), wall seconds per image once
  they are up, with the workers given, and the workers' own decode seconds per image;
* bytes per thumbnail (as embedded, before base64's 4/3);
* a flagged view's extra: milliseconds to render its overlay figure and thumbnail (a smooth map), and the
  bytes the page embeds for it (overlay thumbnail + full-size figure, WebP);
* the page bytes one four-view exam adds, without maps and with every view flagged (base64 included).

    python bench/review.py                       # the demo cohort (made in .cache/) and $DENS_REAL_MAMMO
    python bench/review.py --screenshots docs/review --demo-page PAGE --real-page PAGE
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cv2
import numpy as np

from common import REAL_MAMMO, REAL_MAMMO_ENV, REPO, shown, write_result
from dens.engine import DecodePool
from dens.review import display
from dens.review.views import view_label, write_view_files
from dens.route.config import PreprocessConfig

DEMO_COHORT = REPO / ".cache" / "review-demo-cohort"  # git-ignored
DEMO_SPEC = {"patients": 6, "size": "small", "seed": 2}  # as `make demo` makes its studies
ROW_HTML_BYTES = 3000  # an exam row's markup besides its images (identity, call, buttons), measured on the demo


def files_of(folder: Path) -> list[str]:
    """Every file under ``folder`` but text files (the labels' CSVs, notes): DICOM and DICOM-like alike."""
    return sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.suffix.lower() not in (".csv", ".md", ".txt"))


def smooth_map(shape: tuple[int, int], seed: int) -> np.ndarray:
    """A map like Grad-CAM's: a coarse random field upsampled, on the page's [0, 1] scale."""
    coarse = np.random.default_rng(seed).random((max(2, shape[0] // 32), max(2, shape[1] // 32))).astype(np.float32)
    return cv2.resize(coarse, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)


def measure(files: list[str], canvas: tuple[int, int], workers: int) -> dict:
    model_cfg = PreprocessConfig(height=canvas[0], width=canvas[1])
    view_cfg = display.display_config(model_cfg)
    thumbs, cam_thumbs, figures, render_ms, worker_s = [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        started = time.perf_counter()
        kept, arrivals = [], []
        with DecodePool(workers, view_cfg, buffer=8) as pool:
            for decoded in pool.map((path, "") for path in files):
                if decoded.status != "ok":
                    continue
                arrivals.append(time.perf_counter())
                worker_s.append(decoded.seconds)
                image = display.as_displayed(decoded.image, decoded.info["laterality"], view_cfg)
                files_ = write_view_files(out, f"t{decoded.index}", image, None, [], view_cfg.version)
                thumbs.append(files_.thumbnail.stat().st_size)
                kept.append((decoded.index, image, decoded.info))
                arrivals[-1] = time.perf_counter()  # its thumbnail written
        thumb_seconds = time.perf_counter() - started
        for index, image, info in kept:  # a flagged view's extra work, after its decode
            t0 = time.perf_counter()
            record = {"laterality": info["laterality"], "view": info["view"], "density": "C", "p_C": "0.7"}
            record["p_dense"] = "0.8"
            cam = smooth_map(model_cfg.shape, index)
            files_ = write_view_files(out, f"c{index}", image, cam, view_label(record), view_cfg.version)
            embedded = display.encode(cv2.imread(str(files_.overlay)), display.FIGURE_QUALITY)
            render_ms.append((time.perf_counter() - t0) * 1000)
            cam_thumbs.append(files_.overlay_thumbnail.stat().st_size)
            figures.append(len(embedded))
    n = len(kept)
    mean_thumb = statistics.fmean(thumbs) if thumbs else 0.0
    mean_flagged = statistics.fmean(cam_thumbs) + statistics.fmean(figures) if n else 0.0
    return {
        "canvas": f"{canvas[0]}x{canvas[1]}",
        "display": f"{view_cfg.height}x{view_cfg.width}",
        "files": len(files),
        "images": n,
        "workers": workers,
        "thumbnail_pass_seconds": round(thumb_seconds, 2),
        "pool_start_seconds": round(arrivals[0] - started, 2) if n else None,
        # Between the first thumbnail and the last: the rate once the decode workers are up.
        "thumbnail_seconds_per_image": round((arrivals[-1] - arrivals[0]) / (n - 1), 4) if n > 1 else None,
        "decode_worker_seconds_per_image": round(statistics.fmean(worker_s), 4) if n else None,
        "thumbnail_bytes_mean": round(mean_thumb),
        "thumbnail_bytes_max": max(thumbs, default=0),
        "flagged_render_ms_per_image": round(statistics.fmean(render_ms), 1) if n else None,
        "flagged_embedded_bytes_mean": round(mean_flagged),
        "page_bytes_per_exam_no_maps": round(4 * mean_thumb * 4 / 3 + ROW_HTML_BYTES),
        "page_bytes_per_exam_all_flagged": round(4 * (mean_thumb + mean_flagged) * 4 / 3 + ROW_HTML_BYTES),
    }


def demo_cohort() -> Path:
    if not (DEMO_COHORT / "train.csv").is_file():
        from dens.synth import generate

        generate(DEMO_COHORT, overwrite=True, progress=False, **DEMO_SPEC)
    return DEMO_COHORT


def screenshots(out: Path, pages: dict[str, Path]) -> list[str]:
    """PNGs of each page: the top (header, conventions, first rows), a flagged view's full-size figure and,
    on the demo, verdicts being marked."""
    sys.path.insert(0, str(REPO / "tests"))
    from chromium import Browser  # the tests' DevTools driver: the Debian chromium, nothing downloaded

    out.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as profile:
        for name, page in pages.items():
            with Browser(Path(profile) / name, size=(1600, 1300)) as browser:
                browser.open(page.resolve().as_uri())
                time.sleep(1)  # lazy images in view decode
                written.append(str(browser.screenshot(out / f"{name}.png")))
                browser.click("img.cam")
                time.sleep(0.5)
                written.append(str(browser.screenshot(out / f"{name}-figure.png")))
                if name == "demo":  # verdicts in progress: one agreed, one given another category, a filter on
                    browser.click("#full")
                    browser.click('#exams tbody tr:nth-child(1) button[data-verdict="agree"]')
                    browser.click('#exams tbody tr:nth-child(2) button[data-category="B"]')
                    browser.click('button[data-filter="dense"]')
                    browser.evaluate("window.scrollTo(0, document.querySelector('.bar').offsetTop - 10)")
                    time.sleep(0.5)
                    written.append(str(browser.screenshot(out / f"{name}-verdicts.png")))
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohort", type=Path, default=None, help="image set [default: a `make demo`-like cohort]")
    parser.add_argument("--real", type=Path, default=REAL_MAMMO, help=f"real mammograms [${REAL_MAMMO_ENV}]")
    parser.add_argument("--canvas", default="736x352,256x128", help="model canvases HxW, comma-separated")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--screenshots", type=Path, default=None, help="write the pages' screenshots here")
    parser.add_argument("--demo-page", type=Path, default=None, help="a demo run's review page (screenshots)")
    parser.add_argument("--real-page", type=Path, default=None, help="the real samples' review page (screenshots)")
    args = parser.parse_args(argv)

    if args.screenshots:
        pages = {k: v for k, v in (("demo", args.demo_page), ("real", args.real_page)) if v is not None}
        for path in screenshots(args.screenshots, pages):
            print(f"wrote {shown(path)}")
        return

    sets = {"demo": args.cohort or demo_cohort()}
    if args.real.is_dir():
        sets["real"] = args.real
    else:
        print(f"no real mammograms at {shown(args.real)} (set {REAL_MAMMO_ENV}): the demo cohort only")
    canvases = [tuple(int(v) for v in c.split("x")) for c in args.canvas.split(",")]
    results = []
    for name, folder in sets.items():
        files = files_of(folder)
        for canvas in canvases:
            row = {"set": name, "folder": shown(folder), **measure(files, canvas, args.workers)}
            print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
            results.append(row)
    print(f"wrote {shown(write_result('review', {'results': results}))}")


if __name__ == "__main__":
    main()
