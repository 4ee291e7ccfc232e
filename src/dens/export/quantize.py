"""int8: the exported fp32 graph quantized statically by ONNX Runtime, and its parity judged on decisions.

Calibration images come through the one preprocessing route (:func:`dens.export.parity.load_images`, i.e.
the decode engine running ``dens.route.preprocess.load``), so the ranges ONNX Runtime measures are those of the
images dens-infer will feed. Part of them is held out: the int8 graph is compared with the fp32 graph on
images its ranges were not measured on.

Quantization: QDQ, weights int8 per output channel, activations int8 (``s8s8``) or uint8 (``u8s8``),
MinMax ranges. ``u8s8`` is the multiply-add x86 CPUs do natively (AVX2's VPMADDUBSW, AVX512-VNNI's
VPDPBUSD), and ONNX Runtime's kernels make it the fast one on x86: measured 3.4-3.7x the fp32 graph on an
AVX512-VNNI CPU and 1.6-2.1x on an AVX2-only one, where ``s8s8`` gave 1.1-1.3x on both (bench/int8.py).
VPMADDUBSW adds pairs of products into 16 bits, which can saturate; ``u8s8`` therefore quantizes weights to
7 bits (``reduce_range``), as ONNX Runtime advises for CPUs without VNNI.

The classifier layer giving ``logits``, the temperature and the softmax stay in float32, as do the graph's
input (uint8) and outputs.
Parity is about decisions, not 1e-4: on the held-out images, the share of images whose class (argmax) and
whose dense call (C/D against A/B) the two graphs agree on, the mean and largest |Δp|, and Cohen's kappa
between the two graphs' classes; thresholds in :class:`Int8Thresholds`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from dens import counted, labels
from dens.artifact.metadata import (
    INPUT,
    LOGITS,
    PROBS,
    ModelModifiedError,
    file_sha256,
    read_metadata,
    variant_path,
    write_metadata,
)
from dens.export.config import DEFAULT_INT8_FORMAT, INT8_FORMATS
from dens.export.parity import ImageSet, check_interface, ignored_note
from dens.route.config import PreprocessConfig

log = logging.getLogger(__name__)

HELD_OUT_FRACTION = 0.2
MIN_HELD_OUT = 40  # held out even when 20% is fewer (where there are twice as many images)
CALIBRATION_BATCH = 8


@dataclass(frozen=True)
class Int8Thresholds:
    """What int8 parity with the fp32 graph means, on held-out images."""

    argmax_agreement: float = 0.97  # share of images with the same class
    dense_agreement: float = 0.99  # share of images with the same dense call (C/D against A/B)
    mean_abs_prob_diff: float = 0.02  # mean over images and classes of |p_int8 - p_fp32|


def int8_path(out_path: str | os.PathLike) -> Path:
    """Where the int8 variant of ``out_path`` goes: ``model.onnx`` -> ``model.int8.onnx``."""
    return variant_path(out_path, "int8")


@dataclass(frozen=True)
class CalibrationSplit:
    """The images a calibration folder gave, split into those ONNX Runtime measures ranges on and those the
    parity check compares the graphs on."""

    source: str
    calibration: np.ndarray  # uint8 [N, 1, S, S]
    held_out: np.ndarray
    calibration_files: list[str]  # relative to source
    held_out_files: list[str]

    @property
    def calibration_sha256(self) -> str:
        """sha256 of the calibration file list (paths relative to the folder, one per line)."""
        return hashlib.sha256("\n".join(self.calibration_files).encode()).hexdigest()


def split_calibration(images: ImageSet) -> CalibrationSplit:
    """Hold out :data:`HELD_OUT_FRACTION` of ``images`` (at least :data:`MIN_HELD_OUT` when there are twice
    as many, at least one), spread evenly over the folder's sorted order so that both parts span it."""
    n = len(images.images)
    if n < 2:
        raise ValueError(
            f"{images.source}: {n} usable image(s) among {counted(images.candidates, 'candidate file')}"
            + (f" ({ignored_note(images.ignored)})" if images.ignored else "")
            + "; int8 calibration needs at least 2 (some to calibrate on, some held out for parity): pass a folder "
            "of mammograms to --calibrate"
        )
    held = max(1, round(HELD_OUT_FRACTION * n), min(MIN_HELD_OUT, n // 2))
    held_idx = set(np.round(np.linspace(0, n - 1, held)).astype(int).tolist())
    keep = [i for i in range(n) if i not in held_idx]
    held_sorted = sorted(held_idx)
    root = Path(images.source)
    rel = [os.path.relpath(p, root) for p in images.used]
    return CalibrationSplit(
        images.source,
        images.images[keep],
        images.images[held_sorted],
        [rel[i] for i in keep],
        [rel[i] for i in held_sorted],
    )


class _Reader:
    """ONNX Runtime's CalibrationDataReader over uint8 images, in batches."""

    def __init__(self, images: np.ndarray, batch: int = CALIBRATION_BATCH):
        self._batches = iter([images[i : i + batch] for i in range(0, len(images), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT: batch}

    def __iter__(self):  # CalibrationDataReader's protocol
        return self

    def __next__(self):
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


def quantize_int8(
    fp32_path: str | os.PathLike,
    out_path: str | os.PathLike,
    split: CalibrationSplit,
    *,
    int8_format: str = DEFAULT_INT8_FORMAT,
) -> Path:
    """Quantize the dens fp32 graph at ``fp32_path`` with ranges measured on ``split.calibration``; write it
    (atomically) to ``out_path`` with the fp32 file's metadata plus precision ``int8`` and an ``int8`` entry
    (format, calibration set size and file-list hash, held-out size, the fp32 file's sha256), signed for its own
    graph."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if int8_format not in INT8_FORMATS:
        raise ValueError(f"int8 format must be one of {', '.join(INT8_FORMATS)}, got {int8_format!r}")
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    meta = read_metadata(fp32_path)
    if meta["precision"] != "fp32":
        raise ValueError(f"{fp32_path} is a {meta['precision']} graph: int8 is quantized from the fp32 one")
    if not len(split.calibration):
        raise ValueError(f"{split.source}: no calibration images")
    u8 = int8_format == "u8s8"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".int8-") as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        # Shape inference first: the quantizer needs every tensor's type and shape to place Q/DQ pairs.
        quant_pre_process(str(fp32_path), str(prepared), skip_optimization=True, skip_symbolic_shape=True)
        with _root_log_level(logging.WARNING):
            quantize_static(
                str(prepared),
                str(quantized),
                _Reader(split.calibration),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=u8,
                activation_type=QuantType.QUInt8 if u8 else QuantType.QInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=_head_nodes(onnx.load(str(prepared))),
                calibrate_method=CalibrationMethod.MinMax,
                calibration_providers=["CPUExecutionProvider"],
            )
        model = onnx.load(str(quantized))
        meta = {
            **meta,
            "precision": "int8",
            "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "int8": {
                "format": int8_format,
                "activations": "uint8" if u8 else "int8",
                "weights": "int8 per channel" + (" (7-bit range)" if u8 else ""),
                "quant_format": "QDQ",
                "calibration_method": "MinMax",
                "calibration_images": len(split.calibration),
                "calibration_sha256": split.calibration_sha256,
                "held_out_images": len(split.held_out),
                "source_sha256": file_sha256(fp32_path),
            },
        }
        model.doc_string = f"dens {meta['arch']} breast-density classifier (int8); see metadata 'dens'"
        write_metadata(model, meta)  # signed anew: the fp32 file's signature is of another graph
        staged = Path(tmp) / "model.onnx"
        onnx.save(model, str(staged))
        onnx.checker.check_model(str(staged), full_check=True)
        os.replace(staged, out_path)
    return out_path


@contextlib.contextmanager
def _root_log_level(level: int):
    """The quantizer logs a line per tensor through the root logger at INFO; hold the root at ``level`` while
    it runs, then put it back."""
    root = logging.getLogger()
    before = root.level
    root.setLevel(max(before, level))
    try:
        yield
    finally:
        root.setLevel(before)


def _head_nodes(model: onnx.ModelProto) -> list[str]:
    """The classifier layer that gives ``logits`` and the nodes after it (temperature, softmax): kept in
    float32, so that no logit is clipped to the range calibration saw or rounded to 256 levels. The layer
    is a few thousand multiply-adds of the billions before it."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    names = [node.name for node in model.graph.node if LOGITS in node.output]
    todo = [LOGITS]
    while todo:
        for node in consumers.get(todo.pop(), []):
            if node.name not in names:
                names.append(node.name)
                todo.extend(node.output)
    return names


def cohen_kappa(a: np.ndarray, b: np.ndarray, num_classes: int) -> float | None:
    """Cohen's kappa (unweighted) between two series of class indices; None when there are none. When both
    series hold one class only, the chance agreement is 1 and kappa is 1.0 if they agree everywhere."""
    if not len(a):
        return None
    table = np.zeros((num_classes, num_classes))
    np.add.at(table, (a, b), 1)
    table /= table.sum()
    observed = np.trace(table)
    expected = float(table.sum(1) @ table.sum(0))
    if expected >= 1.0:
        return 1.0 if observed >= 1.0 else 0.0
    return float((observed - expected) / (1.0 - expected))


def _verified(path: Path, failures: list[str]) -> dict[str, Any]:
    """The metadata of ``path``; a signature it does not match is one of ``failures``, not the end of the check."""
    try:
        return read_metadata(path)
    except ModelModifiedError as exc:
        failures.append(str(exc))
        return exc.metadata


def _run(session, images: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate(
        [session.run([PROBS], {INPUT: images[i : i + batch]})[0] for i in range(0, len(images), batch)]
    )


def check_int8_parity(
    int8_path: str | os.PathLike,
    fp32_path: str | os.PathLike,
    split: CalibrationSplit,
    *,
    limits: Int8Thresholds = Int8Thresholds(),
    batch_size: int = 4,
) -> dict[str, Any]:
    """Compare the int8 graph with the fp32 graph it came from on ``split.held_out``, both in ONNX
    Runtime on the CPU; returns the report (``report["passed"]``, ``["failures"]``)."""
    import onnxruntime as ort

    start = time.perf_counter()
    int8_path, fp32_path = Path(int8_path), Path(fp32_path)
    modified: list[str] = []  # failures too, but the graphs are still compared
    meta, source = (_verified(p, modified) for p in (int8_path, fp32_path))
    failures = []
    classes = list(meta["classes"])
    if meta["precision"] != "int8" or not isinstance(meta.get("int8"), dict):
        failures.append(f"{int8_path} is not an int8 graph (precision {meta['precision']!r})")
    quant = meta.get("int8") or {}
    if quant.get("source_sha256") != file_sha256(fp32_path):
        failures.append(f"{int8_path} was not quantized from {fp32_path} (its fp32 sha256 differs): re-export it")
    if quant.get("calibration_sha256") not in (None, split.calibration_sha256):
        failures.append(
            f"{int8_path} was calibrated on another file list than {split.source} gives now, so the held-out "
            "images may overlap its calibration set: pass the --calibrate folder and --calibration-images it "
            "was made with"
        )
    if not len(split.held_out):
        failures.append(f"no held-out images from {split.source}")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sessions = {}
    for name, path in (("fp32", fp32_path), ("int8", int8_path)):
        try:
            sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT's own exception types: a graph that does not load fails parity, loudly
            failures.append(f"ONNX Runtime cannot load {path}: {type(exc).__name__}: {exc}")
    if "int8" in sessions:
        failures += check_interface(
            sessions["int8"], PreprocessConfig.from_dict(meta["preprocess"]).shape, len(classes)
        )
    figures: dict[str, Any] = {}
    if not failures and len(split.held_out):
        ref = _run(sessions["fp32"], split.held_out, batch_size)
        got = _run(sessions["int8"], split.held_out, batch_size)
        figures = decision_agreement(ref, got, classes)
        if not figures["finite"]:
            failures.append("the int8 graph gives non-finite probabilities")
        if not figures["argmax_agreement"] >= limits.argmax_agreement:
            failures.append(f"argmax agreement {figures['argmax_agreement']:.1%} < {limits.argmax_agreement:.0%}")
        if not figures["dense_agreement"] >= limits.dense_agreement:
            failures.append(f"dense-call agreement {figures['dense_agreement']:.1%} < {limits.dense_agreement:.0%}")
        if not figures["mean_abs_prob_diff"] <= limits.mean_abs_prob_diff:
            failures.append(f"mean |Δp| {figures['mean_abs_prob_diff']:.3g} > {limits.mean_abs_prob_diff:g}")
    failures = modified + failures
    return {
        "passed": not failures,
        "failures": failures,
        "onnx_path": str(int8_path.resolve()),
        "onnx_sha256": file_sha256(int8_path),
        "precision": meta["precision"],
        "opset": meta["opset"],
        "int8": quant,
        "reference_path": str(fp32_path.resolve()),
        "reference_sha256": file_sha256(fp32_path),
        "reference": f"the {source['precision']} graph in ONNX Runtime (CPU), itself checked against PyTorch",
        "checkpoint_sha256": meta["checkpoint_sha256"],
        "thresholds": dataclasses.asdict(limits),
        "criteria": "pass when, on the held-out images, the share of images with the same class (argmax) >= "
        "argmax_agreement, the share with the same dense call (C/D against A/B) >= dense_agreement, and the "
        "mean |p_int8 - p_fp32| over images and classes <= mean_abs_prob_diff, with finite outputs; max |Δp| "
        "and Cohen's kappa are reported, not thresholded (kappa is undefined-prone on one-class sets)",
        "held_out": {"source": split.source, "count": len(split.held_out), "files": split.held_out_files},
        "calibration_files": split.calibration_files,
        "batch_size": batch_size,
        **figures,
        "checked_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - start, 2),
    }


def decision_agreement(reference: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """How far ``probs`` [N, C] agree with ``reference`` [N, C] on the decisions dens makes from them."""
    dense = np.array([c in labels.DENSE_CLASSES for c in classes])
    ref_call, call = reference.argmax(1), probs.argmax(1)
    diff = np.abs(probs.astype(np.float64) - reference)
    return {
        "images": len(reference),
        "argmax_agreement": float((ref_call == call).mean()),
        "dense_agreement": float((dense[ref_call] == dense[call]).mean()),
        "argmax_disagreements": int((ref_call != call).sum()),
        "dense_disagreements": int((dense[ref_call] != dense[call]).sum()),
        "kappa": cohen_kappa(ref_call, call, len(classes)),
        "max_abs_prob_diff": float(diff.max()),
        "mean_abs_prob_diff": float(diff.mean()),
        "finite": bool(np.isfinite(probs).all()),
        "reference_classes": {c: int((ref_call == i).sum()) for i, c in enumerate(classes)},
    }
