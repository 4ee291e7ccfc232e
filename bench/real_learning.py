"""Which canonical-image route lets a model learn density best on real labelled mammograms.

    DENS_REAL_LABELLED=/data/ddsm/labels.csv python bench/real_learning.py [--seeds 0,1,2,3,4]
        [--versions 1,2,3] [--epochs 15] [--size 192] [--height 256 --width 128] [--imagenet]
    python bench/real_learning.py --data A/labels.csv --data B/labels.csv

For each labelled set (DENS_REAL_LABELLED, several joined by os.pathsep, or --data, repeatable: a CSV of
path,density,patient_id[,laterality,view,...] with paths relative to its folder, what `dens-train --data`
reads), each seed and each route version (PreprocessConfig.version), a ResNet-18 is trained from random
weights by dens-train's own code (`dens.train.loop.run`), versions taking turns within a seed. One seed
gives every version the same patient-grouped split and the same initial weights, so versions differ only
by their canonical image. Version 1 has a square S x S canvas, the others H x W of about the same pixel
count. --imagenet adds the same runs from ImageNet weights (lr 1e-4) when torchvision's file is in the
torch hub cache (it is never downloaded here).

A small set's test split is a dozen images, and one split's kappa mostly noise: with --folds K (default 5)
each seed deals the patients into K folds stratified by density, and K runs each test on one fold, validate on
the next and train on the rest (the split given to dens-train as the CSV's split column). Every image is then
tested once per seed, and a seed's figures are those of its pooled out-of-fold calls (dens.figures, the code
dens-train's test section uses). --folds 0: dens-train's own 70/15/15 split, one run per seed.

Per set and version: image-level quadratic and linear kappa, accuracy and dense (C+D) ROC AUC, mean and sd
over seeds and each seed's value; the COLLAPSED runs (a class present in a run's test labels that it never
predicted), counted and never rerun; seconds per run (the first run of a version also decodes the images
into the cache, .cache/real-learning). The data never enters the results: a set is named by its folder's
name, its counts and the sha256 of its CSV. Writes bench/results/real_learning-<host>-<time>.json and
prints a markdown table.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, shown, write_result
from dens import labels
from dens.artifact.model import imagenet_weights_path
from dens.figures import evaluation
from dens.labels import CLASSES
from dens.manifest import read_manifest
from dens.route.config import VERSIONS
from dens.train.config import TrainConfig
from dens.train.loop import run

REAL_LABELLED_ENV = "DENS_REAL_LABELLED"
ARCH = "resnet18"
# Peak learning rates: random weights need a high one to move at all, pretrained ones a fine-tuning one.
STARTS = {"scratch": ("none", 1e-3), "imagenet": ("imagenet", 1e-4)}
FIGURES = {  # name in the results: (label in the table, where it is in the test split's image-level figures)
    "kappa_quadratic": ("quadratic kappa", ("kappa_quadratic",)),
    "kappa_linear": ("linear kappa", ("kappa_linear",)),
    "dense_auc": ("dense AUC", ("dense", "auc")),
    "accuracy": ("accuracy", ("accuracy",)),
}


def fail(message: str) -> None:
    """Stop with ``message`` and status 2: what the user gave cannot be run."""
    print(f"real_learning: {message}", file=sys.stderr)
    sys.exit(2)


def labelled_sets(given: list[str] | None) -> list[Path]:
    """The labels CSVs to train on: --data, else DENS_REAL_LABELLED; exits with status 2 when there is none
    or one is absent."""
    paths = given or [p for p in os.environ.get(REAL_LABELLED_ENV, "").split(os.pathsep) if p]
    if not paths:
        fail(
            f"no labelled set: set {REAL_LABELLED_ENV} to a labels.csv (path,density,patient_id; "
            f"several joined by '{os.pathsep}') or pass --data CSV"
        )
    # A folder is a labelled set (labels.csv, as bench/real_proxies.py reads it) or a dens-train folder.
    csvs = [_labels_csv(Path(p)) if Path(p).is_dir() else Path(p) for p in paths]
    for csv in csvs:
        if not csv.is_file():
            fail(f"{csv} does not exist: name a labels CSV (path,density,patient_id)")
    return csvs


def _labels_csv(folder: Path) -> Path:
    return folder / "labels.csv" if (folder / "labels.csv").is_file() else folder / "train.csv"


def describe_set(csv: Path) -> dict:
    """What the results say of a set: its folder's name, counts and the CSV's sha256, never a path."""
    try:
        frame, _ = read_manifest(csv)
    except ValueError as exc:
        fail(f"{exc}")
    counts = frame[labels.DENSITY].value_counts()
    return {
        "name": csv.parent.name,
        "images": len(frame),
        "patients": int(frame[labels.PATIENT_ID].nunique()),
        "classes": {c: int(counts.get(c, 0)) for c in CLASSES},
        "sha256": hashlib.sha256(csv.read_bytes()).hexdigest(),
    }


def canvas(version: int, args: argparse.Namespace) -> dict:
    """Version 1's square canvas, or the H x W one of the later routes (about the same pixel count)."""
    return {"size": args.size} if version == 1 else {"height": args.height, "width": args.width}


def shape(version: int, args: argparse.Namespace) -> str:
    side = canvas(version, args)
    return f"{side['size']}x{side['size']}" if "size" in side else f"{side['height']}x{side['width']}"


def patient_folds(csv: Path, folds: int, seed: int) -> pd.DataFrame:
    """The set's manifest with absolute paths and a ``fold`` per row: patients shuffled by ``seed`` within
    each density (a patient's most common one) and dealt into ``folds`` folds in turn."""
    frame, _ = read_manifest(csv.resolve())  # absolute paths: the fold's CSV lives elsewhere
    rng = np.random.default_rng(seed)
    per_patient = frame.groupby(labels.PATIENT_ID, sort=True)[labels.DENSITY].agg(lambda s: s.value_counts().idxmax())
    order = [p for c in CLASSES for p in rng.permutation(per_patient.index[per_patient == c].to_numpy())]
    fold_of = {p: i % folds for i, p in enumerate(order)}
    frame["fold"] = frame[labels.PATIENT_ID].map(fold_of)
    return frame


def fold_csv(frame: pd.DataFrame, fold: int, folds: int, path: Path) -> Path:
    """A CSV dens-train reads with its split: test is ``fold``, validation the next fold, train the rest."""
    split = np.where(frame["fold"] == fold, "test", np.where(frame["fold"] == (fold + 1) % folds, "val", "train"))
    keep = [c for c in frame.columns if c not in ("fold", "label", "split")]
    frame[keep].assign(split=split).to_csv(path, index=False)
    return path


def pooled_figures(predictions: pd.DataFrame) -> dict:
    """The image-level figures of pooled out-of-fold calls, through dens-train's own figure code."""
    probs = predictions[list(labels.PROB_COLUMNS)].to_numpy(np.float64)
    y = predictions[labels.DENSITY].map(CLASSES.index).to_numpy(np.int64)
    patient = pd.factorize(predictions[labels.PATIENT_ID])[0]
    return evaluation.figures(evaluation.Level(probs, y, patient))


def never_predicted(confusion: list[list[int]]) -> list[str]:
    """The classes present in the labels (rows) that no call (columns) names: a collapsed run."""
    present = [c for i, c in enumerate(CLASSES) if sum(confusion[i])]
    return [c for c in present if not sum(row[CLASSES.index(c)] for row in confusion)]


def train_once(csv: Path, version: int, seed: int, start: str, args: argparse.Namespace, out: Path) -> dict:
    """One dens-train run; its test figures, test calls, collapse verdict and seconds."""
    weights, lr = STARTS[start]
    cfg = TrainConfig(
        data=str(csv),
        out=str(out),
        arch=ARCH,
        weights=weights,
        preprocess_version=version,
        **canvas(version, args),
        epochs=args.epochs,
        batch_size=args.batch,
        lr=lr,
        seed=seed,
        bootstrap=args.bootstrap,
        cache=str(args.cache),
        device=args.device,
        progress=False,
    )
    began = time.perf_counter()
    result = run(cfg)
    seconds = time.perf_counter() - began
    test = result["test"]["image"]
    confusion = test["confusion"]  # rows: the truth, columns: the call
    never = never_predicted(confusion)
    return {
        "predictions": pd.read_csv(out / "test_predictions.csv", dtype={labels.PATIENT_ID: str}),
        "seed": seed,
        "version": version,
        "start": start,
        "seconds": round(seconds, 1),
        "device": result["config"]["resolved"]["device"],
        "decoded_now": result["data"]["decoded_now"],
        "unusable": result["data"]["unusable"],
        "test_images": result["data"]["test"]["images"],
        "test_patients": result["data"]["test"]["patients"],
        "best_epoch": result["best"]["epoch"],
        **{name: _number(_dig(test, keys)) for name, (_, keys) in FIGURES.items()},
        "confusion": confusion,
        "never_predicted": never,
        "collapsed": bool(never),
    }


def _dig(record: dict, keys: tuple[str, ...]):
    for key in keys:
        record = record[key]
    return record


def _number(value) -> float | None:
    """A figure, rounded; None where it is undefined (e.g. a kappa over one class)."""
    return round(float(value), 4) if value is not None and math.isfinite(float(value)) else None


def by_seed(runs: list[dict], seed: int, start: str, version: int) -> dict:
    """One seed's figures for one version: its one run's, or (folds) its pooled out-of-fold calls' figures."""
    mine = [r for r in runs if (r["seed"], r["start"], r["version"]) == (seed, start, version)]
    done = [r for r in mine if "error" not in r]
    record = {"seed": seed, "start": start, "version": version, "runs": len(done), "failed": len(mine) - len(done)}
    record["collapsed"] = sum(r["collapsed"] for r in done)
    record["seconds"] = round(sum(r["seconds"] for r in done), 1)
    if not done:
        return {**record, **dict.fromkeys(FIGURES)}
    pooled = pooled_figures(pd.concat([r["predictions"] for r in done], ignore_index=True))
    record.update({name: _number(_dig(pooled, keys)) for name, (_, keys) in FIGURES.items()})
    record["confusion"] = pooled["confusion"]
    record["never_predicted"] = never_predicted(pooled["confusion"])
    return record


def summarise(runs: list[dict]) -> dict:
    """Mean, sd and per-seed values of every figure over a version's seeds (:func:`by_seed`), its runs,
    collapsed and failed runs, and seconds per run."""
    out: dict = {key: sum(r[key] for r in runs) for key in ("runs", "collapsed", "failed")}
    for name in FIGURES:
        values = [r[name] for r in runs if r[name] is not None]
        out[name] = {
            "mean": round(statistics.fmean(values), 4) if values else None,
            "sd": round(statistics.stdev(values), 4) if len(values) > 1 else None,
            "per_seed": {r["seed"]: r[name] for r in runs},
        }
    out["seconds_per_run"] = round(sum(r["seconds"] for r in runs) / out["runs"], 1) if out["runs"] else None
    return out


def table(sets: list[dict], versions: list[int], args: argparse.Namespace) -> str:
    """Per set and start, versions as columns: mean +- sd over seeds, collapsed (and failed) runs, seconds."""

    def cell(summary: dict, name: str) -> str:
        mean, sd = summary[name]["mean"], summary[name]["sd"]
        return "n/a" if mean is None else f"{mean:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")

    def row(label: str, values) -> str:
        return f"| {label} | " + " | ".join(map(str, values)) + " |"

    lines = []
    for s in sets:
        classes = ", ".join(f"{c} {n}" for c, n in s["classes"].items())
        for start, by_version in s["results"].items():
            cols = [by_version[str(v)] for v in versions]
            lines += [
                f"### {s['name']}: {s['images']} images, {s['patients']} patients ({classes}); {ARCH} from "
                f"{start}, {args.epochs} epochs, seeds {args.seeds}"
                + (f", {args.folds}-fold cross-validation by patient (pooled out-of-fold calls)" if args.folds else ""),
                "",
                row("test, image level", [f"v{v} ({shape(v, args)})" for v in versions]),
                "|---|" + "---:|" * len(versions),
            ]
            lines += [row(label, [cell(c, name) for c in cols]) for name, (label, _) in FIGURES.items()]
            lines.append(row("collapsed runs", [f"{c['collapsed']} of {c['runs']}" for c in cols]))
            if any(c["failed"] for c in cols):
                lines.append(row("failed runs", [c["failed"] for c in cols]))
            lines += [row("seconds per run", [c["seconds_per_run"] for c in cols]), ""]
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", action="append", help=f"a labels CSV (repeatable); overrides {REAL_LABELLED_ENV}")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="each seed: one split and one initialisation")
    parser.add_argument("--versions", default=",".join(map(str, VERSIONS)), help="PreprocessConfig versions")
    parser.add_argument("--folds", type=int, default=5, help="patient folds per seed (0: one 70/15/15 split)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=192, help="version 1's square canvas S x S")
    parser.add_argument("--height", type=int, default=256, help="the H x W canvas of versions 2 and later")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--bootstrap", type=int, default=0, help="draws for the test intervals (0: none)")
    parser.add_argument("--imagenet", action="store_true", help="also start from ImageNet weights, if cached")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--cache", type=Path, default=REPO / ".cache" / "real-learning", help="decoded images")
    parser.add_argument("--keep", type=Path, help="keep every run's directory under this folder [deleted]")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    seeds, versions = _ints(args.seeds), _ints(args.versions)
    unknown = [v for v in versions if v not in VERSIONS]
    if unknown or not seeds or not versions:
        fail(f"versions must be among {VERSIONS} (this dens), and seeds not empty")
    if args.folds and args.folds < 3:
        fail("--folds needs 3 or more (one to test, one to validate, the rest to train), or 0")
    if len(seeds) < 3:
        print(f"note: {len(seeds)} seed(s); an sd over fewer than 3 says little", flush=True)
    starts = ["scratch"]
    imagenet = imagenet_weights_path(ARCH)
    if args.imagenet and imagenet.is_file():
        starts.append("imagenet")
    elif args.imagenet:
        print(f"note: --imagenet skipped: {imagenet.name} is not in the torch hub cache", flush=True)
    csvs = labelled_sets(args.data)
    sets = [describe_set(csv) for csv in csvs]
    names = [s["name"] for s in sets]
    for i, s in enumerate(sets):  # two sets in folders of one name: number them
        s["name"] += f" ({i + 1})" if names.count(s["name"]) > 1 else ""

    folds = max(1, args.folds)
    plan = [
        (i, seed, start, v, k)
        for i in range(len(sets))
        for seed in seeds
        for start in starts
        for k in range(folds)
        for v in versions
    ]
    runs: list[list[dict]] = [[] for _ in sets]
    with tempfile.TemporaryDirectory(prefix="real-learning-") as tmp:
        for i, seed, start, version, k in tqdm(plan, desc="runs", unit="run"):
            out = (args.keep or Path(tmp)) / f"set{i}-seed{seed}-{start}-v{version}-fold{k}"
            data = csvs[i]
            if args.folds:
                data = fold_csv(patient_folds(csvs[i], folds, seed), k, folds, Path(tmp) / f"set{i}-{seed}-{k}.csv")
            try:
                r = train_once(data, version, seed, start, args, out)
            except Exception as exc:  # one failed run is reported, and the others still run
                # Only the exception's type goes into the results: its message may name a file of the set.
                runs[i].append({"seed": seed, "version": version, "start": start, "error": type(exc).__name__})
                tqdm.write(f"{sets[i]['name']} seed {seed} {start} v{version}: FAILED: {type(exc).__name__}: {exc}")
                continue
            runs[i].append({**r, "fold": k if args.folds else None})
            tqdm.write(
                f"{sets[i]['name']} seed {seed} fold {k} {start} v{version}: kappa {r['kappa_quadratic']}, "
                f"dense AUC {r['dense_auc']}, acc {r['accuracy']}"
                f"{', COLLAPSED (never ' + ','.join(r['never_predicted']) + ')' if r['collapsed'] else ''}; "
                f"{r['seconds']} s on {r['device']}"
            )
    for s, mine in zip(sets, runs, strict=True):
        per_seed = [by_seed(mine, seed, start, v) for seed in seeds for start in starts for v in versions]
        s["results"] = {
            start: {
                str(v): summarise([r for r in per_seed if (r["start"], r["version"]) == (start, v)]) for v in versions
            }
            for start in starts
        }
        s["runs"] = [{k: v for k, v in r.items() if k != "predictions"} for r in mine]

    settings = {
        "arch": ARCH,
        "starts": {start: {"weights": STARTS[start][0], "lr": STARTS[start][1]} for start in starts},
        "imagenet": "asked" if args.imagenet else "not asked",
        "seeds": seeds,
        "folds": args.folds,
        "versions": versions,
        "canvas": {str(v): canvas(v, args) for v in versions},
        "epochs": args.epochs,
        "batch_size": args.batch,
        "bootstrap": args.bootstrap,
        "device": args.device,
        "cache": shown(args.cache),
    }
    if args.imagenet and "imagenet" not in starts:
        settings["imagenet"] = f"skipped: {imagenet.name} not in the torch hub cache"
    path = write_result("real_learning", {"settings": settings, "sets": sets})
    print(table(sets, versions, args))
    print(f"wrote {shown(path)}")


if __name__ == "__main__":
    main()
