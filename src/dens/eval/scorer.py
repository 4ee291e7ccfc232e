"""The model dens-eval scores with: an exported ONNX file (ONNX Runtime, CPU) or a dens-train checkpoint
(PyTorch, CPU or CUDA). Either way the model says how its images are made (its own ``PreprocessConfig``,
passed on unchanged), its classes and its temperature, and turns a ``uint8 [N, 1, H, W]`` batch into
logits; the figures apply the temperature, as dens-train's test section does."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dens.artifact.metadata import INPUT, LOGITS
from dens.labels import CLASSES
from dens.route.config import PreprocessConfig

SUFFIXES = (".onnx", ".pt")


@dataclass
class Scorer:
    """A loaded model: where it came from (``kind``: 'onnx' or 'checkpoint'), what it needs and
    :meth:`logits`."""

    path: Path
    kind: str
    sha256: str
    preprocess: PreprocessConfig
    classes: tuple[str, ...]
    temperature: float
    device: str
    _run: Any  # uint8 [N, 1, H, W] -> float32 logits [N, K]

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Raw logits (before the temperature) of a uint8 ``[N, 1, H, W]`` batch, float32 ``[N, K]``."""
        return np.asarray(self._run(batch), np.float32)

    def describe(self) -> dict:
        """What metrics.json says about the model."""
        return {
            "path": str(self.path),
            "kind": self.kind,
            "sha256": self.sha256,
            "classes": list(self.classes),
            "temperature": self.temperature,
            "device": self.device,
            "canvas": list(self.preprocess.shape),  # height, width
            "preprocess": self.preprocess.to_dict(),
        }


def open_model(path: str | Path, device: str = "auto") -> Scorer:
    """The model at ``path`` (``.onnx`` or ``.pt``); ValueError naming the file when it cannot be used.
    ``device`` applies to a checkpoint; an ONNX model runs on ONNX Runtime's CPU provider."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"model {path} not found: give an ONNX file from dens-export or a dens-train .pt")
    if path.suffix.lower() == ".onnx":
        scorer = _onnx(path)
    elif path.suffix.lower() == ".pt":
        scorer = _checkpoint(path, device)
    else:
        raise ValueError(f"model {path}: not an .onnx (dens-export) or .pt (dens-train) file")
    if tuple(scorer.classes) != CLASSES:
        raise ValueError(
            f"model {path} calls {', '.join(scorer.classes)}; dens-eval's figures are for the BI-RADS classes "
            f"{', '.join(CLASSES)}"
        )
    return scorer


def _onnx(path: Path) -> Scorer:
    import onnxruntime as ort

    from dens.scoring.model import ModelFile

    model = ModelFile.read(path, "dens-eval")  # metadata, classes and sha256, as every scoring stage reads them
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT's own exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: ONNX Runtime cannot open it ({first})") from exc
    preprocess = model.preprocess  # every field the model carries
    shape = next((i.shape for i in session.get_inputs() if i.name == INPUT), None)
    if shape is None or list(shape[1:]) != [1, *preprocess.shape]:
        raise ValueError(
            f"{path}: input '{INPUT}' is {shape}, not [N, 1, {preprocess.height}, {preprocess.width}] as its "
            "metadata's preprocess says; re-export it with dens-export"
        )
    if LOGITS not in {o.name for o in session.get_outputs()}:
        raise ValueError(f"{path}: no '{LOGITS}' output; re-export it with dens-export")

    def run(batch: np.ndarray) -> np.ndarray:
        return session.run([LOGITS], {INPUT: batch})[0]

    temperature = float(model.metadata["temperature"])
    return Scorer(path, "onnx", model.sha256, preprocess, model.classes, temperature, "cpu", run)


def _checkpoint(path: Path, device: str) -> Scorer:
    import torch

    from dens.artifact.model import load_checkpoint

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    ckpt = load_checkpoint(path, map_location=device)  # CheckpointError (a ValueError) names the file
    net = ckpt.model.eval()

    @torch.no_grad()
    def run(batch: np.ndarray) -> np.ndarray:
        return net(torch.from_numpy(batch).to(device)).float().cpu().numpy()  # fp32: the model dens-export ships

    return Scorer(path, "checkpoint", ckpt.sha256, ckpt.preprocess, tuple(ckpt.classes), ckpt.temperature, device, run)
