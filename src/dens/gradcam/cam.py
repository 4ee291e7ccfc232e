"""Grad-CAM: the core (a context manager owning its hook), the file names it writes, and which rows get maps.

Pure computation, no files read: :mod:`dens.gradcam.runner` runs it over a preds.csv.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_LAYER = "backbone.layer4.-1"  # the last block of layer4, as `resolve_layer` spells it
MAX_STEM = 80


# --- the core -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CamResult:
    """Maps ``float32 [N, H, W]`` at the input size: ``maps`` each min-max scaled to [0, 1], ``raw`` the
    same maps before that scaling (ReLU'd, upsampled, in the model's own units, so maps of one model can share
    one scale); the class each map is for, and the logits."""

    maps: np.ndarray
    targets: np.ndarray
    logits: np.ndarray
    raw: np.ndarray


def resolve_layer(model: nn.Module, layer: nn.Module | str | None = None) -> nn.Module:
    """The target layer: a module, a dotted name (``backbone.layer4.2``; ``-1`` indexes a Sequential),
    or None for the last block of ``model.backbone.layer4``."""
    if isinstance(layer, nn.Module):
        return layer
    name = layer or DEFAULT_LAYER
    module: nn.Module = model
    for part in name.split("."):
        try:
            module = module[int(part)] if part.lstrip("-").isdigit() else getattr(module, part)
        except (AttributeError, IndexError, TypeError):
            near = [n for n, _ in model.named_modules() if n and n.count(".") <= 2][-8:]
            raise ValueError(
                f"no layer {name!r} in {type(model).__name__}; layers near the end: {', '.join(near)}"
            ) from None
        if not isinstance(module, nn.Module):
            raise ValueError(f"{name!r} is not a layer of {type(model).__name__}")
    return module


class GradCAM:
    """Grad-CAM (Selvaraju et al. 2017) on one layer of a classifier, hooks owned by a context manager::

        with GradCAM(model, "backbone.layer4.-1") as cam:
            result = cam(images)            # uint8 [N, 1, S, S]; one map per image, its predicted class
            result = cam(images, targets)   # or one chosen class per image

    Only the layers after the target build a graph, and nothing of it outlives a call, so memory stays
    flat over any number of batches. The model is put in eval mode.
    """

    def __init__(self, model: nn.Module, layer: nn.Module | str | None = None):
        self.model = model
        self.layer = resolve_layer(model, layer)
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._activation: torch.Tensor | None = None

    def __enter__(self) -> GradCAM:
        self._handle = self.layer.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove the hook (idempotent)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._activation = None

    def _hook(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        if not isinstance(output, torch.Tensor) or output.ndim != 4:
            raise TypeError(f"Grad-CAM needs a layer with a [N, C, H, W] output, got {type(output).__name__}")
        # A fresh leaf: the graph starts here, so the gradient exists even for frozen weights, and the layers
        # before this one (which touch no tensor that needs a gradient) build none.
        self._activation = output.detach().requires_grad_(True)
        return self._activation

    def __call__(self, images: torch.Tensor | np.ndarray, targets: Sequence[int] | None = None) -> CamResult:
        if self._handle is None:
            raise RuntimeError("GradCAM hooks are not registered: use it as `with GradCAM(model) as cam:`")
        device = next(self.model.parameters()).device
        x = torch.as_tensor(images).to(device)
        self.model.eval()
        # Only the activation needs a gradient: with the weights' flags off for this call, autograd records
        # the layers after the target and nothing else (restored below, as the caller had them).
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        try:
            for p in trainable:
                p.requires_grad_(False)
            with torch.enable_grad():
                logits = self.model(x)
                activation = self._activation
                if activation is None:
                    raise RuntimeError("the target layer did not run in the forward pass")
                if targets is None:
                    target = logits.detach().argmax(1)
                else:
                    target = torch.as_tensor(np.asarray(targets), dtype=torch.long, device=logits.device)
                    if target.shape != (len(x),):
                        raise ValueError(f"need one target per image ({len(x)}), got shape {tuple(target.shape)}")
                # Summing the per-image scores keeps images independent: d(sum)/dA_i = d(score_i)/dA_i.
                score = logits.gather(1, target[:, None]).sum()
                (grads,) = torch.autograd.grad(score, activation)
            with torch.no_grad():
                weights = grads.mean(dim=(2, 3), keepdim=True)
                cam = torch.relu((weights * activation.detach()).sum(dim=1, keepdim=True))
                # Bilinear from the feature map (e.g. 23x11) to the input: smooth, and never below zero.
                raw = F.interpolate(cam, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
            return CamResult(
                normalise(raw).float().cpu().numpy(),
                target.cpu().numpy(),
                logits.detach().float().cpu().numpy(),
                raw.float().cpu().numpy(),
            )
        finally:
            for p in trainable:
                p.requires_grad_(True)
            self._activation = None


def normalise(cam: torch.Tensor) -> torch.Tensor:
    """Per-map min-max to [0, 1]; a flat map (no positive evidence anywhere) stays all zero."""
    lo = cam.amin(dim=(-2, -1), keepdim=True)
    span = cam.amax(dim=(-2, -1), keepdim=True) - lo
    return torch.where(span > 1e-12, (cam - lo) / span.clamp_min(1e-12), torch.zeros_like(cam))


# --- file names from untrusted tags ---------------------------------------------------------------

_UNSAFE = re.compile(r"[^0-9A-Za-z._-]+")


def safe_stem(value: str, fallback: str) -> str:
    """A file-name stem from an untrusted tag value (SOPInstanceUID): only ``[0-9A-Za-z._-]``, no leading
    dot or dash, at most ``MAX_STEM`` characters; a hash of ``fallback`` (the path) when nothing is left."""
    stem = _UNSAFE.sub("_", str(value or ""))[:MAX_STEM].lstrip(".-").rstrip(".")
    if not stem.strip("._-"):
        stem = "f" + hashlib.sha256(str(fallback).encode()).hexdigest()[:20]
    return stem


def assign_stems(values: Sequence[str], fallbacks: Sequence[str]) -> list[str]:
    """One distinct stem per row (``safe_stem``, then ``-2``, ``-3``... on collisions, case-insensitively
    so that case-insensitive file systems do not merge two files)."""
    seen: set[str] = set()
    stems = []
    for value, fallback in zip(values, fallbacks, strict=True):
        base = stem = safe_stem(value, fallback)
        n = 1
        while stem.casefold() in seen:
            n += 1
            stem = f"{base}-{n}"
        seen.add(stem.casefold())
        stems.append(stem)
    return stems
