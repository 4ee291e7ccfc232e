"""Parity of an exported ONNX graph with the PyTorch checkpoint it came from.

ONNX Runtime runs the graph on random uint8 images and on real files preprocessed by the one route
(``dens.route.preprocess.load`` with the checkpoint's PreprocessConfig), at every requested batch size through
the same session; PyTorch (float32, CPU) gives the reference logits and probabilities are
``softmax(logits / temperature)`` computed here in float64, so a graph without the temperature fails.
Each image is run at every batch size, which also shows that the batch axis is truly dynamic and that
an image's result does not depend on its batch mates.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import dens
from dens import counted
from dens.artifact.metadata import INPUT, LOGITS, PROBS, ModelModifiedError, read_metadata
from dens.artifact.model import Checkpoint, file_sha256, load_checkpoint
from dens.engine import DecodePool, in_input_order
from dens.export.config import DEFAULT_BATCH_SIZES, DEFAULT_MAX_IMAGES
from dens.figures.metrics import softmax
from dens.route.config import PreprocessConfig
from dens.route.errors import Reason

RANDOM_IMAGES = 8  # random uint8 images; at least the largest batch size is used
# What the route says of a file that is no candidate image at all (a samples folder's notes, labels, readme):
# such files are ignored and named, not counted as unusable images.
NOT_IMAGES = (Reason.NOT_DICOM.value, Reason.EMPTY_FILE.value)
_NAMED = 5  # ignored files named in a summary; the rest counted


@dataclass(frozen=True)
class Thresholds:
    """What parity means. An argmax may differ only where PyTorch's top-two probabilities are within
    ``2 * prob_atol`` (a near-tie that the allowed difference can flip)."""

    prob_atol: float  # largest allowed |p_onnx - p_torch|
    logit_rtol: float  # largest allowed |l_onnx - l_torch| / max(1, largest |l_torch|)

    @property
    def decisive_margin(self) -> float:
        return 2 * self.prob_atol


# fp32: both runtimes compute in float32; measured differences are ~1e-6 (reduction order, kernel choice).
# fp16: weights and activations rounded to float16 (~3 significant digits) through ~50 layers, compared
# with float32 PyTorch.
THRESHOLDS = {"fp32": Thresholds(prob_atol=1e-4, logit_rtol=1e-4), "fp16": Thresholds(prob_atol=2e-2, logit_rtol=2e-2)}


@dataclass(frozen=True)
class ImageSet:
    """Real images through the preprocessing route, and what happened to every file."""

    source: str
    images: np.ndarray  # uint8 [N, 1, S, S]
    files: int  # files under the folder, ignored ones included
    used: list[str]
    skipped: dict[str, int]  # reason -> count, for candidate files that yield no image (UnusableFile)
    errors: dict[str, str]  # path -> message, for files that failed otherwise
    ignored: list[str] = field(default_factory=list)  # files read that are no image (NOT_IMAGES), relative

    @property
    def candidates(self) -> int:
        """The files under the folder that may be images: all but those found to be none."""
        return self.files - len(self.ignored)


def ignored_note(ignored: Sequence[str]) -> str:
    """What a summary says of the files a folder of images held that are no image ('' when none)."""
    if not ignored:
        return ""
    names = ", ".join(ignored[:_NAMED]) + (f" and {len(ignored) - _NAMED} more" if len(ignored) > _NAMED else "")
    return f"{counted(len(ignored), 'other file')} ignored, not DICOM nor an image: {names}"


def load_images(
    directory: str | os.PathLike,
    checkpoint: Checkpoint,
    *,
    max_images: int = DEFAULT_MAX_IMAGES,
    progress: bool = False,
) -> ImageSet:
    """The first ``max_images`` canonical images from the files under ``directory`` (recursively, sorted), made
    by the decode engine (``dens.route.preprocess.load`` with the checkpoint's PreprocessConfig, in worker
    processes), in that order; unusable files are counted, not fatal, and files that are no image at all (not
    DICOM, not named as a PNG/PGM/TIFF/JPEG image, or empty: notes, labels, a readme) are ignored and named."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"image folder {directory} not found (--images takes a folder of DICOM/PNG files)")
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    bar = tqdm(total=len(files), desc="parity: images", unit="file", disable=not progress, leave=False)
    workers = max(1, min(dens.usable_cores(), len(files)))
    # The images taken are the first max_images usable files in sorted order (int8 calibration hashes that
    # list), whichever file the engine finishes first.
    done, usable = [], 0
    with DecodePool(workers, checkpoint.preprocess, buffer=2 * workers) as pool:
        for decoded in in_input_order(pool.map((str(path), "") for path in files)):
            bar.update()
            done.append(decoded)
            usable += decoded.status == "ok"
            if usable >= max_images:
                break
    bar.close()
    images, used, skipped, errors, ignored = [], [], Counter(), {}, []
    for decoded in done:
        if decoded.status == "ok":
            images.append(decoded.image[None])
            used.append(decoded.path)
        elif decoded.code in NOT_IMAGES:
            ignored.append(Path(decoded.path).relative_to(directory).as_posix())
        elif Reason(decoded.code).is_verdict:  # the file's own verdict: counted by reason
            skipped[decoded.code] += 1
        else:  # the route failed on it (a codec crash, a bug): one bad file must not stop the check
            errors[decoded.path] = decoded.reason
    array = np.stack(images) if images else np.zeros((0, 1, *checkpoint.preprocess.shape), np.uint8)
    return ImageSet(str(directory), array, len(files), used, dict(skipped), errors, ignored)


def check_parity(
    onnx_path: str | os.PathLike,
    checkpoint: str | os.PathLike | Checkpoint,
    *,
    images: str | os.PathLike | ImageSet | None = None,
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
    atol: float | None = None,
    logit_rtol: float | None = None,
    max_images: int = DEFAULT_MAX_IMAGES,
    providers: tuple[str, ...] = ("CPUExecutionProvider",),
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Compare ONNX Runtime with PyTorch, and the model's signature and metadata with the checkpoint
    (:func:`check_metadata`); returns the parity report (``report["passed"]``, ``["failures"]``).

    ``images``: a folder of files (or an already loaded :class:`ImageSet`) for the real-image check.
    ``atol`` / ``logit_rtol`` override the thresholds of the model's precision (:data:`THRESHOLDS`).
    """
    import onnxruntime as ort

    start = time.perf_counter()
    onnx_path = Path(onnx_path)
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    meta, failures = check_metadata(onnx_path, ckpt)
    base = THRESHOLDS.get(meta["precision"], THRESHOLDS["fp16"])
    limits = Thresholds(base.prob_atol if atol is None else atol, base.logit_rtol if logit_rtol is None else logit_rtol)
    batch_sizes = tuple(sorted({int(b) for b in batch_sizes}))
    if not batch_sizes or batch_sizes[0] < 1:
        raise ValueError(f"batch sizes must be positive integers, got {batch_sizes}")

    try:
        session = ort.InferenceSession(str(onnx_path), providers=list(providers))
    except Exception as exc:  # ORT's own exception types; a graph that does not load fails parity, loudly
        session, interface = None, [f"ONNX Runtime cannot load the graph: {type(exc).__name__}: {exc}"]
    else:
        interface = check_interface(session, ckpt.preprocess.shape, len(ckpt.classes))
    failures += interface
    if meta["checkpoint_sha256"] != ckpt.sha256:
        failures.append(
            f"the model was exported from checkpoint sha256 {meta['checkpoint_sha256'][:12]}, not from "
            f"{ckpt.path} (sha256 {ckpt.sha256[:12]})"
        )
    rng = np.random.default_rng(seed)
    sets = {
        "random": rng.integers(0, 256, (max(RANDOM_IMAGES, batch_sizes[-1]), 1, *ckpt.preprocess.shape), dtype=np.uint8)
    }
    image_report = None
    if images is not None:
        image_set = (
            images
            if isinstance(images, ImageSet)
            else load_images(images, ckpt, max_images=max_images, progress=progress)
        )
        image_report = {k: v for k, v in dataclasses.asdict(image_set).items() if k != "images"}
        if len(image_set.images):
            sets["images"] = image_set.images
        else:
            note = ignored_note(image_set.ignored)
            failures.append(
                f"no usable image among the {counted(image_set.candidates, 'candidate file')} under "
                f"{image_set.source}" + (f"; {note}" if note else "")
            )

    results = {}
    if not interface:  # a graph with the wrong inputs or outputs cannot be run against the reference
        for name, batch in sets.items():
            results[name] = _compare_set(session, ckpt, batch, batch_sizes, limits, progress=progress, name=name)
            failures += [f"{name}: {f}" for f in results[name].pop("failures")]
    if image_report is not None:
        results["images"] = {**image_report, **results.get("images", {})}

    overall = _overall(results)
    return {
        "passed": not failures,
        "failures": failures,
        "onnx_path": str(onnx_path.resolve()),
        "onnx_sha256": file_sha256(onnx_path),
        "precision": meta["precision"],
        "opset": meta["opset"],
        "checkpoint_path": str(Path(ckpt.path).resolve()),
        "checkpoint_sha256": ckpt.sha256,
        "providers": session.get_providers() if session else [],
        "thresholds": {**dataclasses.asdict(limits), "decisive_margin": limits.decisive_margin},
        "criteria": "pass when, at every batch size, max |p_onnx - p_torch| <= prob_atol, max |l_onnx - l_torch| / "
        "max(1, max |l_torch|) <= logit_rtol, and the argmax agrees on every decisive image (PyTorch's "
        "top-two probabilities more than decisive_margin apart), with finite outputs; p_torch = "
        "softmax(l_torch / T) in float64; and the graph's interface and source checkpoint are the expected "
        "ones",
        "reference": "PyTorch float32 on CPU",
        "temperature": ckpt.temperature,
        "batch_sizes": list(batch_sizes),
        **overall,
        **results,
        "checked_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - start, 2),
    }


def check_metadata(onnx_path: str | os.PathLike, ckpt: Checkpoint) -> tuple[dict[str, Any], list[str]]:
    """The model's metadata, and what is wrong with it: a signature it does not match (the file was edited after
    export), a preprocess, classes or temperature other than the checkpoint's (what the graph is run with, which
    the comparison with PyTorch, run with the checkpoint's, cannot see)."""
    try:
        meta, failures = read_metadata(onnx_path), []
    except ModelModifiedError as exc:
        meta, failures = exc.metadata, [str(exc)]
    said = {"classes": list(meta["classes"]), "temperature": float(meta["temperature"])}
    expected = {"classes": list(ckpt.classes), "temperature": float(ckpt.temperature)}
    failures += [
        f"its metadata's {key} {said[key]!r} is not the checkpoint's {expected[key]!r}; re-export it"
        for key in said
        if said[key] != expected[key]
    ]
    # Each side through JSON (tuples as lists), as the metadata holds it.
    ours = json.loads(json.dumps(PreprocessConfig.from_dict(meta["preprocess"]).to_dict()))
    theirs = json.loads(json.dumps(ckpt.preprocess.to_dict()))
    differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    if differ:
        shown = "; ".join(f"{k}={ours.get(k)!r} (checkpoint: {theirs.get(k)!r})" for k in differ)
        failures.append(f"its metadata's preprocess is not the checkpoint's: {shown}; re-export it")
    return meta, failures


def check_interface(session, shape: tuple[int, int], num_classes: int) -> list[str]:
    """The graph's inputs and outputs against the contract: image uint8 [N,1,H,W] (``shape``: the preprocess
    canvas, H x W); probs, logits float [N,C]."""
    failures = []
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if [i.name for i in inputs] != [INPUT] or inputs[0].type != "tensor(uint8)":
        failures.append(f"inputs are {[(i.name, i.type) for i in inputs]}, expected one '{INPUT}' of uint8")
    elif isinstance(inputs[0].shape[0], int) or list(inputs[0].shape[1:]) != [1, *shape]:
        failures.append(f"input shape {inputs[0].shape}, expected [N, 1, {shape[0]}, {shape[1]}] with a symbolic N")
    names = [o.name for o in outputs]
    if names != [PROBS, LOGITS] or any(o.type != "tensor(float)" for o in outputs):
        failures.append(f"outputs are {[(o.name, o.type) for o in outputs]}, expected float '{PROBS}', '{LOGITS}'")
    elif any(o.shape[-1] != num_classes for o in outputs):
        failures.append(f"outputs have shapes {[o.shape for o in outputs]}, expected [N, {num_classes}]")
    return failures


def _reference(ckpt: Checkpoint, batch: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    model = ckpt.model.float().eval()
    with torch.no_grad():
        logits = np.concatenate(
            [model(torch.from_numpy(batch[i : i + chunk])).numpy() for i in range(0, len(batch), chunk)]
        )
    return softmax(logits, ckpt.temperature), logits


def _compare_set(
    session,
    ckpt: Checkpoint,
    batch: np.ndarray,
    batch_sizes: tuple[int, ...],
    limits: Thresholds,
    *,
    progress: bool,
    name: str,
) -> dict[str, Any]:
    ref_probs, ref_logits = _reference(ckpt, batch, batch_sizes[-1])
    top2 = np.sort(ref_probs, axis=1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > limits.decisive_margin
    logit_scale = max(1.0, float(np.abs(ref_logits).max()))
    by_size, failures = {}, []
    steps = sum(-(-len(batch) // b) for b in batch_sizes)
    bar = tqdm(total=steps, desc=f"parity: {name}", unit="batch", disable=not progress, leave=False)
    for b in batch_sizes:
        outs = []
        try:
            for i in range(0, len(batch), b):
                outs.append(session.run([PROBS, LOGITS], {INPUT: batch[i : i + b]}))
                bar.update()
        except Exception as exc:  # e.g. a batch axis that is not dynamic after all
            by_size[str(b)] = {"error": f"{type(exc).__name__}: {exc}"}
            failures.append(f"batch {b}: ONNX Runtime failed: {by_size[str(b)]['error']}")
            continue
        probs = np.concatenate([o[0] for o in outs])
        logits = np.concatenate([o[1] for o in outs])
        agree = probs.argmax(1) == ref_probs.argmax(1)
        stats = {
            "max_abs_prob_diff": float(np.abs(probs - ref_probs).max()),
            "max_abs_logit_diff": float(np.abs(logits - ref_logits).max()),
            "logit_rel_diff": float(np.abs(logits - ref_logits).max() / logit_scale),
            "argmax_agreement": float(agree.mean()),
            "argmax_agreement_decisive": float(agree[decisive].mean()) if decisive.any() else None,
            "finite": bool(np.isfinite(probs).all() and np.isfinite(logits).all()),
        }
        by_size[str(b)] = stats
        where = f"batch {b}"
        if not stats["finite"]:
            failures.append(f"{where}: non-finite outputs")
        if not stats["max_abs_prob_diff"] <= limits.prob_atol:
            failures.append(f"{where}: max |Δp| {stats['max_abs_prob_diff']:.3g} > {limits.prob_atol:g}")
        if not stats["logit_rel_diff"] <= limits.logit_rtol:
            failures.append(f"{where}: relative logit difference {stats['logit_rel_diff']:.3g} > {limits.logit_rtol:g}")
        if not agree[decisive].all():
            failures.append(
                f"{where}: argmax differs on {int((~agree[decisive]).sum())} of {int(decisive.sum())} decisive images"
            )
    bar.close()
    ran = [s for s in by_size.values() if "error" not in s]
    worst = {
        k: max((s[k] for s in ran), default=None)  # None: no batch size ran at all
        for k in ("max_abs_prob_diff", "max_abs_logit_diff", "logit_rel_diff")
    }
    return {
        "count": len(batch),
        "decisive": int(decisive.sum()),
        **worst,
        "argmax_agreement": min((s["argmax_agreement"] for s in ran), default=None),
        "by_batch_size": by_size,
        "failures": failures,
    }


def _overall(results: dict[str, dict]) -> dict[str, Any]:
    """The headline figures over every image set and batch size."""
    runs = [r for r in results.values() if r.get("max_abs_prob_diff") is not None]
    if not runs:
        return {"images_compared": 0}
    return {
        "images_compared": sum(r["count"] for r in runs),
        "max_abs_prob_diff": max(r["max_abs_prob_diff"] for r in runs),
        "max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in runs),
        "logit_rel_diff": max(r["logit_rel_diff"] for r in runs),
        "argmax_agreement": min(r["argmax_agreement"] for r in runs),
    }
