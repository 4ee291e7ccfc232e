"""Does the canonical image keep density? Two proxies for density on the model's input, on real labelled
mammograms, for every preprocessing version side by side.

Proxies, on each canonical image's breast (the route's own mask, found again on the canonical image): the
in-breast median grey, and the fraction of the breast brighter than a fixed grey, 170 of 255 after VOI. Their
rank correlation (Spearman) with the density label (A-D as 0-3), per labelled set. Version 3's family grey
maps are fitted on the set's own images, as dens-train fits them on its training images; its fixed grey is
170 carried through the image's family line (one grey per family: what a model can learn), where versions 1
and 2 compare every canvas with 170 itself (version 2's per-image stretch moves what 170 means image by image,
which is the loss this measures). ``fraction_canvas`` is version 3's fraction above 170 on the canvas, for the
record: a common line moves a fixed threshold along the grey scale, not the density signal. A version that
removes density from the input lowers these; tests/test_real_density.py fails when version 3 falls below
version 1 on any set.

The sets: labelled folders (``labels.csv`` with path, density, patient_id; paths relative to it), named by
``DENS_REAL_LABELLED`` (folders or labels.csv files, separated by ``os.pathsep``); results name a set by its
folder's name only. Run: ``DENS_REAL_LABELLED=DIR python bench/real_proxies.py [--sheets]`` -> bench/results/
(``--sheets``: version 3's canonical images of every labelled image, a contact sheet per class).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from dens import labels
from dens.route import families, geometry, preprocess
from dens.route.config import PreprocessConfig

ENV = "DENS_REAL_LABELLED"
THRESHOLD = 170  # the fixed grey of the fraction proxy
ROUTES = {1: PreprocessConfig(version=1), 2: PreprocessConfig(version=2), 3: PreprocessConfig(version=3)}


def labelled_sets(default: Path | None = None) -> list[Path]:
    """The labels.csv of each set: ``$DENS_REAL_LABELLED``'s, else ``default``'s (those that exist)."""
    names = [p for p in os.environ.get(ENV, "").split(os.pathsep) if p] or ([str(default)] if default else [])
    sets = [Path(n) / "labels.csv" if Path(n).is_dir() else Path(n) for n in names]
    return [s for s in sets if s.is_file()]


def in_breast(image: np.ndarray) -> np.ndarray:
    """The greys of the breast on a canonical image (the route's mask, found on the image itself)."""
    mask, _ = geometry.breast_mask(image.astype(np.float32) / 255.0)
    full = cv2.resize(mask.astype(np.uint8), image.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
    return image[full]


def proxies(image: np.ndarray, threshold: int = THRESHOLD) -> tuple[float, float, float]:
    """(in-breast median grey, fraction of the breast above ``threshold``, fraction above :data:`THRESHOLD`)."""
    grey = in_breast(image)
    return float(np.median(grey)), float((grey > threshold).mean()), float((grey > THRESHOLD).mean())


def canonical_images(csv: Path, version: int) -> list[tuple[np.ndarray, int]]:
    """Every labelled image of ``csv`` through ``version``'s route (version 3 fitted on these images), each with
    the grey :data:`THRESHOLD` becomes on it."""
    frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    loaded = [preprocess.load(csv.parent / p, ROUTES[version]) for p in frame[labels.PATH]]
    if version < 3:
        return [(image, THRESHOLD) for image, _ in loaded]
    fitted = families.fit((info.family, info.breast_levels) for _, info in loaded)
    tables = [families.lookup(fitted, info.family)[0] for _, info in loaded]
    return [(table[image], int(table[THRESHOLD])) for (image, _), table in zip(loaded, tables, strict=True)]


def measure(csv: Path, versions: tuple[int, ...] = (1, 2, 3)) -> dict:
    """Per version: each proxy's Spearman correlation with the density, and the class medians of each proxy."""
    frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    y = pd.Series([labels.CLASSES.index(d.strip().upper()) for d in frame[labels.DENSITY]], dtype=float)
    result = {
        "set": csv.parent.name,
        "labels_sha256": hashlib.sha256(csv.read_bytes()).hexdigest(),
        "images": len(frame),
        "patients": int(frame[labels.PATIENT_ID].nunique()) if labels.PATIENT_ID in frame else None,
        "classes": {c: int((frame[labels.DENSITY] == c).sum()) for c in labels.CLASSES},
        "versions": {},
    }
    for version in versions:
        images = canonical_images(csv, version)
        values = pd.DataFrame([proxies(*i) for i in images], columns=["median", "fraction", "fraction_canvas"])
        result["versions"][str(version)] = {
            name: {
                "spearman": round(float(values[name].corr(y, method="spearman")), 4),
                "class_medians": {
                    c: round(float(values[name][y == k].median()), 4)
                    for k, c in enumerate(labels.CLASSES)
                    if (y == k).any()
                },
            }
            for name in ("median", "fraction", "fraction_canvas")
        }
    return result


def sheets(csv: Path, version: int = 3, per_class: int = 0, tile_height: int = 160) -> dict[str, np.ndarray]:
    """A contact sheet per density class of ``version``'s canonical images (all of a class, or ``per_class``),
    each captioned with its file's name: what the model sees of every labelled film."""
    from dens.qc.sheet import contact_sheet

    frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    images = canonical_images(csv, version)
    out = {}
    for c in labels.CLASSES:
        rows = [i for i, d in enumerate(frame[labels.DENSITY]) if d == c][: per_class or None]
        if rows:
            tiles = [(images[i][0], [Path(frame[labels.PATH][i]).name]) for i in rows]
            out[c] = contact_sheet(tiles, columns=16, tile_height=tile_height)
    return out


def table(results: list[dict]) -> str:
    versions = sorted({v for r in results for v in r["versions"]})
    lines = [
        "| set | images | proxy | " + " | ".join(f"version {v}" for v in versions) + " |",
        "|---|---|---|" + "---|" * len(versions),
    ]
    for r in results:
        for proxy in ("median", "fraction"):
            cells = [f"{r['versions'][v][proxy]['spearman']:.3f}" for v in versions]
            lines.append(f"| {r['set']} | {r['images']} | {proxy} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    import common  # bench/common.py: the machine and the results folder

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sheets", action="store_true", help="also write version 3's contact sheets by class")
    parser.add_argument("--per-class", type=int, default=0, help="images per class on a sheet [all]")
    args = parser.parse_args()
    sets = labelled_sets()
    if not sets:
        sys.exit(f"real_proxies: no labelled set: set {ENV} to folders holding labels.csv (os.pathsep between)")
    results = [measure(csv) for csv in sets]
    for csv in sets if args.sheets else ():
        for density, sheet in sheets(csv, per_class=args.per_class).items():
            path = common.RESULTS / f"real-sheet-{csv.parent.name}-v3-{density}.png"
            cv2.imwrite(str(path), sheet)
            print(f"{common.shown(path)}: class {density}")
    print(table(results))
    common.write_result("real_proxies", {"sets": results, "threshold": THRESHOLD})


if __name__ == "__main__":
    main()
