"""Grad-CAM over a preds.csv: find and check the model, re-load the flagged images through the one
preprocessing route, write a raw map and an overlay figure per image, thumbnails of the views the review page
shows, the ``gradcam`` column and the review page (``<name>.report.html`` beside ``<name>.csv``).

The map is computed in PyTorch on exactly the canonical image the ONNX model saw (``dens.route.preprocess.load``
with the preprocessing stored in the model's metadata), for the class preds.csv reports. The checkpoint must
be the one the ONNX file was exported from (sha256 in its metadata), and the ONNX file the one that wrote
preds.csv (``model_sha256``): otherwise the maps would explain a different model.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

import dens
from dens import counted, labels, runs
from dens.artifact import modelcard
from dens.engine import DecodePool
from dens.files import atomic_write
from dens.flags import parse_flag
from dens.gradcam.cam import GradCAM, assign_stems, safe_stem
from dens.gradcam.config import DEVICES, GradcamConfig, GradcamError
from dens.preds.cells import raw_path
from dens.review import display, study
from dens.review.report import write_report
from dens.review.views import ViewFiles, page_scale, view_label, write_view_files
from dens.route.config import PreprocessConfig

log = logging.getLogger(__name__)

GRADCAM, MODEL_SHA256 = labels.GRADCAM, labels.MODEL_SHA256


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when there is one; ``cuda`` without one falls back to CPU with a warning."""
    if device not in DEVICES and not device.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {device!r}")
    if device == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda" if device == "auto" else device)
    if device != "auto":
        log.warning("CUDA is not available here: Grad-CAM runs on the CPU")
    return torch.device("cpu")


def load_batches(
    items: Sequence[tuple[int, str]], cfg: PreprocessConfig, batch_size: int, workers: int
) -> Iterator[list[tuple[int, np.ndarray | str]]]:
    """Canonical images of ``(row, path)`` items through the decode engine, in batches of ``(row, image or
    the reason there is none)``. The engine's worker processes decode ahead of the model by about two
    batches, and a file that crashes or hangs a codec costs its own row only."""
    if not items:
        return
    rows = [row for row, _ in items]
    batch: list[tuple[int, np.ndarray | str]] = []
    with DecodePool(max(1, min(workers, len(items))), cfg, buffer=2 * batch_size) as pool:
        for decoded in pool.map((path, "") for _, path in items):
            batch.append((rows[decoded.index], decoded.image if decoded.status == "ok" else decoded.reason))
            if len(batch) == batch_size:
                yield batch
                batch = []
    if batch:
        yield batch


@dataclass(frozen=True)
class GradcamSummary:
    """What a run did, for the one-line summary."""

    rows: int
    flagged: int
    maps: int
    errors: int
    disagreements: int  # PyTorch's argmax differs from preds.csv's call (the map is for preds.csv's)
    seconds: float
    device: str

    def line(self) -> str:
        """What the run made, in words that stand beside dens-infer's own counts (``errors`` there are files
        that gave no call; here a map that could not be made is said to have failed, and why is logged)."""
        rate = self.maps / self.seconds if self.seconds > 0 else 0.0
        failed = f" ({counted(self.errors, 'map')} failed: the warnings above say why)" if self.errors else ""
        differ = (
            f"; PyTorch's call differs from preds.csv on {counted(self.disagreements, 'image')}"
            if self.disagreements
            else ""
        )
        return (
            f"Grad-CAM: {self.maps} of {counted(self.flagged, 'flagged image')} mapped{failed} among "
            f"{counted(self.rows, 'row')}{differ}, {rate:.2f} img/s on {self.device}"
        )


def run_gradcam(
    preds_csv: str | Path,
    out_dir: str | Path,
    *,
    model_path: str | Path | None = None,
    checkpoint: str | Path | None = None,
    **options,
) -> pd.DataFrame:
    """:func:`run` with the settings as keyword arguments (see :class:`GradcamConfig`), for library callers."""
    return run(GradcamConfig(Path(preds_csv), Path(out_dir), model=model_path, checkpoint=checkpoint, **options))


def run(cfg: GradcamConfig) -> pd.DataFrame:
    """Grad-CAM for the flagged rows of ``cfg.preds``: per image the raw map ``.npy`` and an overlay figure
    under ``cfg.out``, preds.csv's ``gradcam`` column rewritten (atomically), the review page beside it.

    Two passes through the decode engine: the flagged images at the model's own input (the maps, and the
    page's largest map value, which gives every overlay one scale), then the images the page shows at the
    display size (:func:`dens.review.display.display_config`; the model's own canvas where that is already
    512-1024 pixels tall), each decoded once there for its thumbnail and, when flagged, its overlay. Where the
    display canvas is the model's own, a flagged image is not decoded again: the first pass keeps it. For the
    page, each overlay is drawn on the map's own scale too (its toggle), and each exam's study date and age are
    read from one of its headers (:mod:`dens.review.study`).

    Returns the updated table (strings, as read); ``table.attrs`` holds ``summary`` (:class:`GradcamSummary`)
    and ``report`` (its path). Raises :class:`GradcamError` for what a user must fix (wrong model, missing
    checkpoint, bad preds.csv).
    """
    flag, layer, batch_size, workers = cfg.flag, cfg.layer, cfg.batch_size, cfg.workers
    thumbnails, report, progress = cfg.thumbnails, cfg.report, cfg.progress
    model_path, checkpoint = cfg.model, cfg.checkpoint
    started = time.perf_counter()
    preds_csv, out_dir = Path(cfg.preds), Path(cfg.out)
    preds = read_preds(preds_csv)
    selected = parse_flag(flag).select(preds).to_numpy()
    # Names of this preds.csv's own: two runs sharing one Grad-CAM folder never overwrite each other's maps.
    tag = run_tag(preds_csv)
    stems = [f"{tag}_{stem}" for stem in assign_stems(preds[labels.SOP_UID].tolist(), preds[labels.PATH].tolist())]
    resolved = resolve_model(
        preds, preds_csv, model_path=model_path, checkpoint=checkpoint, need_weights=bool(selected.any())
    )
    workers = workers or min(4, dens.usable_cores())
    dev = pick_device(cfg.device)
    out_dir.mkdir(parents=True, exist_ok=True)

    def items(rows) -> list[tuple[int, str]]:
        return [(int(i), resolve_input(preds.at[i, labels.PATH], preds_csv)) for i in rows]

    view_cfg = display.display_config(resolved.preprocess)
    # Where the display canvas is the model's own (the default 736x352), the flagged images the maps were
    # computed on are kept, lossless, for the pictures: no file is decoded twice.
    scratch = tempfile.TemporaryDirectory(prefix="dens-review-")
    keep = Path(scratch.name) if view_cfg == resolved.preprocess else None
    peaks: dict[int, float] = {}  # row -> its map's largest raw value
    errors = disagreements = 0
    if selected.any():
        model = resolved.model.to(dev).eval()
        bar = tqdm(total=int(selected.sum()), desc="grad-cam", unit="img", disable=not progress)
        with GradCAM(model, layer) as cam:
            for batch in load_batches(items(np.flatnonzero(selected)), resolved.preprocess, batch_size, workers):
                good = [(row, image) for row, image in batch if isinstance(image, np.ndarray)]
                errors += _log_failures(batch, preds, "grad-cam")
                if good:
                    targets = [resolved.class_index(preds.at[row, labels.DENSITY]) for row, _ in good]
                    result = cam(np.stack([image for _, image in good])[:, None], targets)
                    disagreements += int((result.logits.argmax(1) != result.targets).sum())
                    for (row, image), raw in zip(good, result.raw, strict=True):
                        stored = raw.astype(np.float16)  # half the disk; the scale is taken from what is stored
                        np.save(out_dir / f"{stems[row]}.npy", stored)
                        peaks[row] = float(stored.max())
                        if keep is not None:
                            cv2.imwrite(str(keep / f"{row}.png"), image)
                bar.update(len(batch))
        bar.close()
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    page_max = max(peaks.values(), default=0.0)
    wanted = sorted(set(peaks) | set(_thumbnail_rows(preds, selected, thumbnails) if report else ()))
    kept = {row: keep / f"{row}.png" for row in peaks} if keep is not None else {}
    views: dict[int, ViewFiles] = {}
    bar = tqdm(total=len(wanted), desc="review images", unit="img", disable=not progress or not wanted)
    decoded = load_batches(items([r for r in wanted if r not in kept]), view_cfg, batch_size, workers)
    for batch in itertools.chain(_reread(kept, batch_size), decoded):
        errors += _log_failures([b for b in batch if b[0] in peaks], preds, "overlay")
        _log_failures([b for b in batch if b[0] not in peaks], preds, "thumbnail")
        for row, image in batch:
            if not isinstance(image, np.ndarray):
                continue
            record = preds.loc[row].to_dict()
            shown = display.as_displayed(image, record.get(labels.LATERALITY, ""), view_cfg)
            cam = own = None
            if row in peaks:
                raw = np.load(out_dir / f"{stems[row]}.npy").astype(np.float32)
                raw = display.as_displayed(raw, record.get(labels.LATERALITY, ""), view_cfg)
                cam = raw / page_max if page_max > 0 else np.zeros_like(raw)
                if report:  # the page's other scale: the map on its own (1 = its largest value)
                    own_cam = raw / peaks[row] if peaks[row] > 0 else np.zeros_like(raw)
                    own = (own_cam, view_label(record, own_peak=peaks[row]))
            views[row] = write_view_files(
                out_dir, stems[row], shown, cam, view_label(record), view_cfg.version, thumbnail=report, own=own
            )
        bar.update(len(batch))
    bar.close()
    scratch.cleanup()
    overlays = {row: files.overlay for row, files in views.items() if files.overlay}

    def relative(path: Path) -> str:
        return Path(os.path.relpath(path.resolve(), preds_csv.parent.resolve())).as_posix()

    preds[GRADCAM] = [relative(overlays[i]) if i in overlays else "" for i in range(len(preds))]
    write_preds(preds, preds_csv)
    if report:
        preds.attrs["report"] = write_report(
            preds,
            preds_csv,
            {row: files.thumbnail for row, files in views.items() if files.thumbnail},
            overlays=overlays,
            overlay_thumbs={row: files.overlay_thumbnail for row, files in views.items() if files.overlay_thumbnail},
            own_overlays={row: files.own_overlay for row, files in views.items() if files.own_overlay},
            own_overlay_thumbs={
                row: files.own_overlay_thumbnail for row, files in views.items() if files.own_overlay_thumbnail
            },
            exam_calls=_exam_calls(preds_csv),
            card=modelcard.of(resolved.metadata.get("summary")),
            scale=page_scale(page_max, len(peaks)),
            studies=study.exam_facts(preds.to_dict("index"), lambda cell: resolve_input(cell, preds_csv)),
        )
    preds.attrs["summary"] = GradcamSummary(
        len(preds), int(selected.sum()), len(overlays), errors, disagreements, time.perf_counter() - started, str(dev)
    )
    return preds


def run_tag(preds_csv: str | Path) -> str:
    """What this preds.csv's maps and thumbnails are named after: its stem and a digest of its full path
    (``preds-1a2b3c4d``), the same on every run over it, distinct between preds files."""
    path = Path(preds_csv).resolve()
    return f"{safe_stem(path.stem, str(path))}-{hashlib.sha256(os.fsencode(path)).hexdigest()[:8]}"


def _reread(kept: dict[int, Path], batch_size: int) -> Iterator[list[tuple[int, np.ndarray | str]]]:
    """The images pass one kept (row -> PNG), in batches as :func:`load_batches` gives them."""
    rows = sorted(kept)
    for start in range(0, len(rows), batch_size):
        batch: list[tuple[int, np.ndarray | str]] = []
        for row in rows[start : start + batch_size]:
            image = cv2.imread(str(kept[row]), cv2.IMREAD_UNCHANGED)
            batch.append((row, image if image is not None else "its decoded image could not be read back"))
        yield batch


def _log_failures(batch: list[tuple[int, np.ndarray | str]], preds: pd.DataFrame, what: str) -> int:
    failed = [(row, why) for row, why in batch if not isinstance(why, np.ndarray)]
    for row, why in failed:
        log.warning("%s: %s: %s", what, preds.at[row, labels.PATH], why)
    return len(failed)


def _thumbnail_rows(preds: pd.DataFrame, selected: np.ndarray, thumbnails: str) -> list[int]:
    from dens.exams import exam_key

    if thumbnails == "none":
        return []
    records = preds.to_dict("index")
    ok = [i for i, r in records.items() if r[labels.STATUS] == "ok"]
    if thumbnails == "all":
        return ok
    flagged_exams = {exam_key(records[i]) for i in np.flatnonzero(selected)}
    return [i for i in ok if exam_key(records[i]) in flagged_exams]


def _exam_calls(preds_csv: Path) -> pd.DataFrame | None:
    """preds.exam.csv beside preds.csv (written by dens-infer), when there is one; the page calls the exams
    it lacks from preds.csv by the same rule (:mod:`dens.exams`)."""
    from dens.exams import aggregate_paths

    path = aggregate_paths(preds_csv)[1]
    return pd.read_csv(path, dtype=str, keep_default_na=False) if path.is_file() else None


@dataclass(frozen=True)
class ResolvedModel:
    """The ONNX file that wrote preds.csv, its metadata, and (when maps are needed) its PyTorch twin."""

    onnx_path: Path
    metadata: dict
    preprocess: PreprocessConfig
    classes: tuple[str, ...]
    model: nn.Module | None
    checkpoint_path: Path | None

    def class_index(self, density: str) -> int:
        key = str(density).strip().upper()
        if key not in self.classes:
            raise GradcamError(f"preds.csv has density {density!r}, which the model's classes {self.classes} lack")
        return self.classes.index(key)


def resolve_model(
    preds: pd.DataFrame,
    preds_csv: Path,
    *,
    model_path: str | Path | None = None,
    checkpoint: str | Path | None = None,
    need_weights: bool = True,
) -> ResolvedModel:
    """Find and check the model behind preds.csv: the ONNX file must be the one that wrote it (sha256 =
    ``model_sha256``), and the checkpoint the one the ONNX file was exported from (its metadata's sha256)."""
    from dens.artifact.metadata import OnnxMetadataError, file_sha256, read_metadata
    from dens.artifact.model import CheckpointError, load_checkpoint

    try:
        onnx_path = Path(model_path) if model_path else runs.latest_file("model.onnx")
    except FileNotFoundError as exc:
        raise GradcamError(f"{exc} (--model)") from exc
    if not onnx_path.is_file():
        raise GradcamError(f"model {onnx_path} not found: name the ONNX file that wrote {preds_csv} with --model")
    wanted = sorted({s for s in preds.loc[preds[labels.STATUS] == "ok", MODEL_SHA256] if s})
    if len(wanted) > 1:
        raise GradcamError(
            f"{preds_csv} mixes rows from {len(wanted)} models ({', '.join(w[:12] for w in wanted)}); "
            "run dens-gradcam on the rows of one model"
        )
    sha = file_sha256(onnx_path)
    if wanted and sha != wanted[0]:
        raise GradcamError(
            f"{onnx_path} (sha256 {sha[:12]}) is not the model that wrote {preds_csv} "
            f"(model_sha256 {wanted[0][:12]}): pass that model with --model"
        )
    try:
        meta = read_metadata(onnx_path)  # checked there: classes, preprocess, checkpoint_sha256, ...
    except OnnxMetadataError as exc:
        raise GradcamError(str(exc)) from exc
    cfg = PreprocessConfig.from_dict(meta["preprocess"])
    classes = tuple(meta["classes"])
    if not need_weights:
        return ResolvedModel(onnx_path, meta, cfg, classes, None, None)

    ckpt_path = _find_checkpoint(checkpoint, meta, onnx_path)
    try:
        ckpt = load_checkpoint(ckpt_path)
    except (CheckpointError, OSError) as exc:
        raise GradcamError(str(exc)) from exc
    if ckpt.sha256 != meta["checkpoint_sha256"]:
        raise GradcamError(
            f"checkpoint {ckpt_path} (sha256 {ckpt.sha256[:12]}) is not the one {onnx_path} was "
            f"exported from (sha256 {meta['checkpoint_sha256'][:12]}): pass that one with "
            "--checkpoint"
        )
    return ResolvedModel(onnx_path, meta, cfg, classes, ckpt.model, ckpt_path)


def _find_checkpoint(checkpoint: str | Path | None, meta: dict, onnx_path: Path) -> Path:
    if checkpoint:
        if not Path(checkpoint).is_file():
            raise GradcamError(f"checkpoint {checkpoint} not found")
        return Path(checkpoint)
    named = meta.get("checkpoint_path") or ""
    # The metadata records the path as exported; try it as written, then beside the ONNX file.
    for candidate in (Path(named), onnx_path.parent / named, onnx_path.parent / Path(named).name):
        if named and candidate.is_file():
            return candidate
    raise GradcamError(
        f"the checkpoint {named or '(none named)'} that {onnx_path} was exported from is not found "
        "(as written, or beside the ONNX file): pass it with --checkpoint"
    )


def read_preds(preds_csv: Path) -> pd.DataFrame:
    """preds.csv as strings, exactly as written (UIDs stay text, empty cells stay empty)."""
    if not preds_csv.is_file():
        raise GradcamError(f"{preds_csv} not found: run `dens-infer` first, or name the right preds.csv")
    preds = pd.read_csv(preds_csv, dtype=str, keep_default_na=False)
    missing = [c for c in (labels.PATH, labels.STATUS, labels.SOP_UID, labels.DENSITY, MODEL_SHA256) if c not in preds]
    if missing:
        raise GradcamError(f"{preds_csv} lacks the column(s) {', '.join(missing)}: is it a dens-infer preds.csv?")
    return preds


def write_preds(preds: pd.DataFrame, preds_csv: Path) -> None:
    """Rewrite preds.csv atomically (a reader never sees half a file)."""
    with atomic_write(preds_csv, "w", encoding="utf-8", newline="") as f:
        preds.to_csv(f, index=False, lineterminator="\n")  # as dens-infer writes it


def resolve_input(cell: str, preds_csv: Path) -> str:
    """The file a preds.csv ``path`` cell names: the cell's escapes and formula guard undone
    (:func:`dens.preds.cells.raw_path`), then the path as written when it exists (absolute or from the working
    directory), else relative to preds.csv's folder."""
    path = raw_path(cell)
    if Path(path).is_absolute() or Path(path).exists():
        return path
    beside = preds_csv.parent / path
    return str(beside) if beside.exists() else path
