"""EvalConfig -> :func:`run`: score a model on a labelled set and write the figures dens-train's test
section writes, through the same code (:mod:`dens.figures`).

The labelled set is what dens-train's ``--data`` takes (:func:`dens.manifest.read_manifest`), or a run's
``split.csv`` narrowed to one split (``split``). Every file goes through the decode engine with the model's
own ``PreprocessConfig``, so the model sees what dens-infer would give it; a file that yields no image is
listed in ``unusable.csv`` with its reason and counted, never fatal. Breasts and exams are formed from the
CSV's identity, else the file's header, as dens-train forms them (:func:`dens.manifest.with_identity`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

import dens
from dens import labels, manifest
from dens.engine import DecodePool
from dens.eval import summary
from dens.eval.scorer import SUFFIXES, Scorer, open_model
from dens.figures import evaluation, metrics, plots
from dens.files import atomic_write
from dens.route import families
from dens.scoring import TORCH_DEVICES as DEVICES

log = logging.getLogger(__name__)

SPLIT = "split"  # the column of dens-train's split.csv that --split reads
OUTPUTS = ("metrics.json", "summary.md", "unusable.csv")


@dataclass(frozen=True)
class EvalConfig:
    """One dens-eval run. ``model``: an ``.onnx`` from dens-export or a dens-train ``.pt``; ``data``: a
    labelled folder or CSV; ``out``: the folder for the figures. ``split``: score only the rows whose
    ``split`` column holds this value (dens-train's split.csv); None: every row. ``bootstrap``: patient
    draws for the 95% intervals (0: none); ``seed``: theirs. ``device`` applies to a checkpoint;
    ``workers``: decode processes [min(4, cores)]. ``overwrite``: replace an earlier dens-eval output in
    ``out``."""

    model: Path
    data: Path
    out: Path
    split: str | None = None
    bootstrap: int = evaluation.RESAMPLES
    seed: int = 0
    batch_size: int = 16
    workers: int | None = None
    device: str = "auto"
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if Path(self.model).suffix.lower() not in SUFFIXES:
            raise ValueError(f"model {self.model}: give an .onnx (dens-export) or a .pt (dens-train) file")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.bootstrap < 0 or self.batch_size < 1 or (self.workers is not None and self.workers < 1):
            raise ValueError("bootstrap must be >= 0, batch_size and workers >= 1")
        if self.split == "":
            raise ValueError("split must name a value of the split column (e.g. test), or be left out")


@dataclass
class EvalResult:
    """What a run wrote (``out``) and found: metrics.json's content, images scored and left out."""

    out: Path
    metrics: dict
    images: int
    unusable: int
    seconds: float

    def line(self) -> str:
        """The one-line summary: images, unusable, the image-level quadratic kappa with its interval, AUC."""
        image = self.metrics["figures"]["image"]
        kappa = metrics.fmt(image["kappa_quadratic"])
        low, high = image.get("ci", {}).get("kappa_quadratic", (None, None))
        if low is not None and high is not None:
            kappa += f" [{low:.3f}, {high:.3f}]"
        rate = self.images / max(self.seconds, 1e-9)
        return (
            f"dens-eval: {self.images} images ({self.unusable} unusable) in {self.seconds:.1f} s ({rate:.1f} img/s); "
            f"image level: quadratic kappa {kappa} (95% CI), dense AUC {metrics.fmt(image['dense'].get('auc'))}; "
            f"figures in {self.out}"
        )


def run(cfg: EvalConfig) -> EvalResult:
    """Score ``cfg.model`` on ``cfg.data`` and write metrics.json, summary.md, unusable.csv and the PNGs
    into ``cfg.out``. ValueError (naming the file and the fix) for a set that cannot be scored: no labels,
    no row left, no usable image, an unusable model, or an earlier output in the way."""
    started = time.perf_counter()
    out = Path(cfg.out)
    _check_out(out, cfg.overwrite)
    frame, info = manifest.read_manifest(cfg.data)
    frame = _only_split(frame, cfg.split, info["csv"])
    model = open_model(cfg.model, cfg.device)
    logits, decoded = score(frame[labels.PATH].tolist(), model, cfg.workers, cfg.batch_size, cfg.progress)

    frame = manifest.with_identity(frame, [d["info"] for d in decoded])
    frame[labels.REASON] = [d["reason"] for d in decoded]
    frame["detail"] = [d["detail"] for d in decoded]
    frame[labels.HARMONISATION] = [d["info"].get(labels.HARMONISATION, "") for d in decoded]
    ok = (frame[labels.REASON] == "").to_numpy()
    unusable = frame.loc[~ok, [labels.PATH, labels.REASON, "detail"]]
    if not ok.any():
        if (unusable[labels.REASON] == manifest.MISSING_FILE).all():
            raise ValueError(manifest.nothing_found(Path(info["csv"]), frame[labels.PATH].tolist()))
        reasons = ", ".join(f"{k}: {v}" for k, v in unusable[labels.REASON].value_counts().items())
        raise ValueError(f"{info['csv']}: none of its {len(frame)} files gave an image ({reasons})")
    images, logits = frame[ok].reset_index(drop=True), logits[ok]
    y = images[manifest.LABEL].to_numpy()
    t = model.temperature
    if len(unusable):
        reasons = ", ".join(f"{k}: {v}" for k, v in unusable[labels.REASON].value_counts().items())
        log.warning("%d of %d images are unusable and left out (%s)", len(unusable), len(frame), reasons)

    info.update(
        split=cfg.split,
        unusable=len(unusable),
        unusable_reasons=unusable[labels.REASON].value_counts().to_dict(),
        **manifest.counts(images),
        groups=manifest.group_counts(images),
    )
    report = evaluation.report(images, logits, y, t, resamples=cfg.bootstrap, seed=cfg.seed)
    result = metrics.jsonable(
        {
            "dens_version": dens.__version__,
            "model": model.describe(),
            "data": info,
            "warnings": _class_warnings(info["classes"]) + _family_warnings(images),
            "figures": report,
            "calibration": metrics.calibration(logits, y, t),
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "metrics.json", json.dumps(result, indent=1))
    _write(out / "unusable.csv", unusable.to_csv(index=False))
    plots.split_pngs(out, result["figures"], images, logits, y, t, name=cfg.split or "eval")
    _write(out / "summary.md", summary.markdown(result))
    return EvalResult(out, result, len(images), len(unusable), time.perf_counter() - started)


def score(
    paths: Sequence[str], model: Scorer, workers: int | None, batch_size: int, progress: bool
) -> tuple[np.ndarray, list[dict]]:
    """Logits ``[len(paths), K]`` (NaN where a file gave no image) and, per path, ``{"info", "reason",
    "detail"}``: the file's header identity and why it gave no image ('' when it did). Files decode on the
    decode engine with the model's own PreprocessConfig, batches go to the model as they fill."""
    logits = np.full((len(paths), len(model.classes)), np.nan, np.float32)
    outcome = [{"info": {}, "reason": "", "detail": ""} for _ in paths]
    present = []
    for i, path in enumerate(paths):
        if os.path.isfile(path):
            present.append(i)
        else:
            outcome[i].update(reason=manifest.MISSING_FILE, detail="file not found or not readable")
    bar = tqdm(total=len(paths), unit="img", desc="dens-eval", disable=not progress)
    bar.update(len(paths) - len(present))
    if present:
        workers = max(1, min(workers or min(4, dens.usable_cores()), len(present)))
        batch: list[np.ndarray] = []
        where: list[int] = []

        def flush() -> None:
            logits[where] = model.logits(np.stack(batch)[:, None])
            batch.clear()
            where.clear()

        with DecodePool(workers, model.preprocess, buffer=2 * batch_size) as pool:
            for decoded in pool.map((paths[i], "") for i in present):
                row = present[decoded.index]
                outcome[row]["info"] = decoded.info or {}
                if decoded.status == "ok":
                    batch.append(decoded.image)
                    where.append(row)
                    if len(batch) == batch_size:
                        flush()
                else:
                    outcome[row].update(reason=decoded.code, detail=decoded.detail)
                bar.update()
        if batch:
            flush()
    bar.close()
    return logits, outcome


def _only_split(frame: pd.DataFrame, split: str | None, csv: str) -> pd.DataFrame:
    if split is None:
        return frame
    if SPLIT not in frame.columns:
        raise ValueError(f"--split {split}: {csv} has no '{SPLIT}' column (dens-train's split.csv has one)")
    values = frame[SPLIT].str.strip()
    if not (values == split).any():
        found = ", ".join(sorted(set(values) - {""})) or "none"
        raise ValueError(f"--split {split}: no row of {csv} is in it (its splits: {found}); nothing to score")
    return frame[values == split].reset_index(drop=True)


def _class_warnings(classes: dict[str, int]) -> list[str]:
    return [
        f"class {c} has no usable image: the figures say nothing about how {c} is called"
        for c, n in classes.items()
        if not n
    ]


def _family_warnings(images: pd.DataFrame) -> list[str]:
    unseen = int((images[labels.HARMONISATION] == families.FALLBACK).sum())
    if not unseen:
        return []
    return [families.unseen_warning(unseen, len(images), "these figures describe the model on machines it never saw")]


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: name a folder for the figures")
    if not overwrite and any((out / name).exists() for name in OUTPUTS):
        raise ValueError(
            f"{out} already holds dens-eval output; pass --overwrite to replace it, or choose another --out"
        )


def _write(path: Path, text: str) -> None:
    with atomic_write(path) as fh:
        fh.write(text.encode())
