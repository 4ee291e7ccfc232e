"""The naive reference pipeline bench/pipeline.py measures dens-infer against: what a first script does.

One process; pydicom decodes the full-resolution frame (``ds.pixel_array``); pydicom's Modality LUT and VOI
(window or VOI LUT) give the display values, inverted for MONOCHROME1 and min-max scaled to uint8; OpenCV
resizes the whole frame to S x S; PyTorch eager runs the checkpoint's model on it, batch 1. No crop, no
reduced-resolution decode, no worker processes, no batching: the costs dens-infer is built to avoid.
It is a speed reference, not a second preprocessing route: its images differ from dens.route.preprocess's.
"""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pydicom
import torch
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from dens.artifact.model import load_checkpoint


class NaivePipeline:
    """``predict(path) -> probabilities``; ``decode_s`` and ``model_s`` accumulate the two halves' time."""

    def __init__(self, checkpoint: str | Path, device: str = "auto"):
        ckpt = load_checkpoint(checkpoint)
        use_cuda = device != "cpu" and torch.cuda.is_available()
        self.device = "cuda" if use_cuda else "cpu"
        self.model = ckpt.model.to(self.device).eval()
        self.temperature = ckpt.temperature
        self.size = ckpt.preprocess.size
        self.reset_timers()

    def reset_timers(self) -> None:
        self.decode_s = self.model_s = 0.0

    def image(self, path: str | Path) -> np.ndarray:
        ds = pydicom.dcmread(path)
        pixels = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float32)
        lo, hi = float(pixels.min()), float(pixels.max())
        unit = (pixels - lo) / (hi - lo) if hi > lo else np.zeros_like(pixels)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            unit = 1.0 - unit
        return cv2.resize((unit * 255).astype(np.uint8), (self.size, self.size), interpolation=cv2.INTER_AREA)

    @torch.no_grad()
    def predict(self, path: str | Path) -> np.ndarray:
        t0 = time.perf_counter()
        image = self.image(path)
        t1 = time.perf_counter()
        x = torch.from_numpy(image)[None, None].to(self.device)
        probs = torch.softmax(self.model(x) / self.temperature, dim=1).cpu().numpy()[0]
        self.decode_s += t1 - t0
        self.model_s += time.perf_counter() - t1
        return probs
