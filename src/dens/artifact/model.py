"""The density classifier (a 1-channel ResNet that takes uint8) and its checkpoint file.

The graph starts at the bytes: ``forward`` casts, scales and normalises, so PyTorch, ONNX and Grad-CAM
all feed the same ``uint8 [N, 1, S, S]`` batch and no caller can normalise differently. A checkpoint
carries the model's constructor args, the PreprocessConfig and the classes, so it describes itself.
Checkpoints and weight files are untrusted input: they are read with ``torch.load(weights_only=True)``
only, which refuses anything but tensors and plain data.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, ResNet50_Weights, resnet18, resnet50

from dens.artifact.metadata import ARCHS as ARCH_NAMES
from dens.artifact.metadata import file_sha256
from dens.files import atomic_write
from dens.labels import CLASSES, NUM_CLASSES
from dens.route.config import PreprocessConfig

FORMAT_VERSION = 1
# The ImageNet RGB mean/std averaged over the channels: the summed 1-channel conv1 sees grey input.
GREY_MEAN, GREY_STD = 0.449, 0.226
# Each architecture's random-init constructor and the torchvision weights whose file `weights="imagenet"`
# downloads, for the names dens.artifact.metadata lists (torch-free, for the commands' choice lists).
_TORCHVISION = {
    "resnet50": (resnet50, ResNet50_Weights.IMAGENET1K_V2),
    "resnet18": (resnet18, ResNet18_Weights.IMAGENET1K_V1),
}
ARCHS = {arch: _TORCHVISION[arch] for arch in ARCH_NAMES}
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel / DataParallel, torch.compile
_KEYS = ("format_version", "model_args", "state_dict", "preprocess", "classes", "temperature", "summary", "extra")


class CheckpointError(ValueError):
    """A checkpoint or weights file that cannot be used; the message names the file and what to do."""


class DensityNet(nn.Module):
    """uint8 ``[N, 1, S, S]`` (or float in 0..255) -> logits ``[N, num_classes]``; the ResNet is ``backbone``."""

    def __init__(
        self, arch: str = "resnet50", num_classes: int = NUM_CLASSES, mean: float = GREY_MEAN, std: float = GREY_STD
    ):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
        self.model_args = {"arch": arch, "num_classes": int(num_classes), "mean": float(mean), "std": float(std)}
        self.backbone = ARCHS[arch][0](weights=None)  # weights=None: torchvision never downloads
        self.backbone.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(self.backbone.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision
        self.backbone.fc = nn.Linear(self.backbone.fc.in_features, int(num_classes))
        # Buffers, not Python floats, so they appear as initialisers in the exported graph.
        self.register_buffer("mean", torch.tensor(float(mean)).view(1, 1, 1, 1))
        self.register_buffer("std", torch.tensor(float(std)).view(1, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() * (1.0 / 255.0)  # no dtype branch: the ONNX trace must hold the cast for uint8 input
        return self.backbone((x - self.mean) / self.std)


class WeightsUnavailable(FileNotFoundError):
    """Starting weights that can be neither found nor downloaded; the message says where and what to do."""


def hub_cache_path(url: str) -> Path:
    """Where torch.hub keeps the file downloaded from ``url``: ``$TORCH_HOME/hub/checkpoints/<file name>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def imagenet_weights_path(arch: str) -> Path:
    """Where ``weights="imagenet"`` keeps torchvision's file: the torch hub cache (TORCH_HOME moves it)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    return hub_cache_path(ARCHS[arch][1].url)


def fetch_weights(url: str, *, progress: bool = True) -> dict[str, torch.Tensor]:
    """The state dict at ``url``, downloaded once into the torch hub cache and read from there after.

    This is what torchvision's ``Weights.get_state_dict`` does (``torch.hub.load_state_dict_from_url``):
    a progress bar on stderr, the download written to a temporary file and moved into place only when the
    sha256 of its bytes starts with the hash in its file name (``name-<sha256 prefix>.pth``). A download
    that cannot happen, or a file that fails the check, raises :class:`WeightsUnavailable` naming the URL,
    the cache path, TORCH_HOME and the ``--weights PATH`` / ``--weights none`` alternatives.
    """
    path = hub_cache_path(url)
    try:
        state = torch.hub.load_state_dict_from_url(
            url, map_location="cpu", progress=progress, check_hash=True, weights_only=True
        )
    except Exception as exc:  # no network, a proxy, DNS, HTTP errors, a hash mismatch, an unreadable file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        cached = (
            f"the cached file {path} cannot be read; delete it to download it again"
            if path.is_file()
            else f"nothing was saved to {path}"
        )
        raise WeightsUnavailable(
            f"cannot get the starting weights from {url} ({type(exc).__name__}: {first}); {cached}. "
            f"The download goes to the torch hub cache {path.parent} (set TORCH_HOME to move it). On a machine "
            f"without network access: download that URL on another machine and copy the file to {path}, or pass "
            "--weights PATH to a local copy of it, or --weights none to train from random weights (then with "
            "a higher --lr, e.g. 1e-3)."
        ) from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{url} (cached as {path}) is not a state dict; delete the file and try again")
    return state


def build_model(
    arch: str = "resnet50",
    weights: str | os.PathLike | None = None,
    num_classes: int = NUM_CLASSES,
    *,
    mean: float = GREY_MEAN,
    std: float = GREY_STD,
    progress: bool = True,
) -> DensityNet:
    """A DensityNet with random (``None``/``"none"``), ImageNet (``"imagenet"``: torchvision's file for
    ``arch``, downloaded into the torch hub cache by :func:`fetch_weights` the first time, with a progress bar
    when ``progress``) or local-file (a path to a torchvision-style ResNet state dict) starting weights.

    A pretrained 3-channel conv1 is summed over RGB into the 1-channel stem; the pretrained fc is dropped.
    """
    net = DensityNet(arch, num_classes, mean, std)
    if weights is None or weights == "none":
        return net
    if weights == "imagenet":
        url = ARCHS[arch][1].url
        _load_backbone(net, fetch_weights(url, progress=progress), f"{url} (cached as {hub_cache_path(url)})")
        return net
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found (--weights takes 'imagenet', 'none' or a path)")
    _load_backbone(net, _read(path, "weights file"), str(path))
    return net


def _load_backbone(net: DensityNet, state: Any, name: str) -> None:
    """Load a torchvision-style state dict (or a checkpoint holding one), read from ``name``, into ``net``."""
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # a dens or trainer checkpoint
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{name} is not a state dict (a dict of name -> tensor)")
    state = strip_prefixes(state, (*_WRAPPER_PREFIXES, "backbone."))
    conv1 = state.get("conv1.weight")
    if conv1 is not None and conv1.ndim == 4 and conv1.shape[1] == 3:
        state["conv1.weight"] = conv1.sum(dim=1, keepdim=True)  # grey = R + G + B feeds all three filters
    # The class head is always new; a dens checkpoint's mean/std buffers belong to this model, not the file.
    state = {k: v for k, v in state.items() if not k.startswith("fc.") and k not in ("mean", "std")}
    arch = net.model_args["arch"]
    try:
        missing, unexpected = net.backbone.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches are raised even with strict=False
        raise CheckpointError(f"{name}: its weights do not fit a {arch}: {exc}") from exc
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise CheckpointError(
            f"{name} is not a torchvision {arch} state dict: {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]} (another arch?)"
        )


def strip_prefixes(state: dict[str, Any], prefixes: tuple[str, ...] = _WRAPPER_PREFIXES) -> dict[str, Any]:
    """``state`` with wrapper prefixes (``module.`` of DDP, ``_orig_mod.`` of torch.compile) removed from its keys."""
    out = {}
    for key, value in state.items():
        while key.startswith(prefixes):
            key = key[len(next(p for p in prefixes if key.startswith(p))) :]
        out[key] = value
    return out


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)


def _check_plain(value: Any, where: str) -> None:
    """Raise TypeError unless ``value`` is made of what ``torch.load(weights_only=True)`` accepts."""
    # Exact types: numpy scalars subclass float/int but are refused by weights_only loading.
    if isinstance(value, torch.Tensor) or type(value) in _PLAIN:
        return
    if type(value) in (dict, OrderedDict):
        for k, v in value.items():
            _check_plain(k, f"{where} key {k!r}")
            _check_plain(v, f"{where}[{k!r}]")
    elif type(value) in (list, tuple, set, torch.Size):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    else:
        raise TypeError(
            f"{where} is a {type(value).__module__}.{type(value).__qualname__}: a checkpoint holds only "
            "tensors and plain data (dict, list, tuple, str, int, float, bool, None) so that it loads "
            "with weights_only=True; convert it first (a numpy scalar: .item())"
        )


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    preprocess: PreprocessConfig,
    *,
    classes: tuple[str, ...] | list[str] = CLASSES,
    summary: dict | None = None,
    temperature: float = 1.0,
    extra: dict | None = None,
) -> str:
    """Write ``model`` (DDP / torch.compile wrappers removed) and what describes it to ``path``, atomically
    (a crash mid-write leaves the previous file). ``summary`` is JSON-able; ``extra`` is tensors and plain
    data (optimizer/scheduler/scaler state, epoch). Returns the file's sha256."""
    net = _unwrap(model)
    if not isinstance(getattr(net, "model_args", None), dict):
        raise TypeError(f"save_checkpoint needs a DensityNet (from build_model), got {type(net).__name__}")
    summary, extra = dict(summary or {}), dict(extra or {})
    json.dumps(summary)  # TypeError now, not a checkpoint the ONNX metadata cannot carry later
    _check_plain(summary, "summary")
    _check_plain(extra, "extra")
    classes = [str(c) for c in classes]
    if len(classes) != net.model_args["num_classes"]:
        raise ValueError(f"{len(classes)} classes for a model with {net.model_args['num_classes']} outputs")
    blob = {
        "format_version": FORMAT_VERSION,
        "model_args": dict(net.model_args),
        "state_dict": {k: v.detach().cpu() for k, v in strip_prefixes(model.state_dict()).items()},
        "preprocess": preprocess.to_dict(),
        "classes": classes,
        "temperature": float(temperature),
        "summary": summary,
        "extra": extra,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb", fsync=True) as f:
        torch.save(blob, f)
    return file_sha256(path)


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the rebuilt model (eval mode) and everything that travels with it."""

    model: DensityNet
    preprocess: PreprocessConfig
    classes: tuple[str, ...]
    temperature: float
    summary: dict
    extra: dict
    sha256: str
    path: Path


def _read(path: Path, what: str, map_location: Any = "cpu") -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # unpickling refusals, truncated or foreign files: all unusable the same way
        if _is_onnx(path):
            raise CheckpointError(
                f"{path} is an ONNX model (what dens-export writes), not a {what}: a checkpoint is the best.pt of a "
                "dens-train run (runs/<name>/best.pt; the ONNX file's metadata names the one it came from), and an "
                "ONNX file is what the scoring commands take (dens-infer --model, dens-eval MODEL)"
            ) from exc
        raise CheckpointError(
            f"{path}: cannot be read as a {what} ({_cause(exc)}). Files are loaded with "
            "torch.load(weights_only=True), which refuses anything but tensors and plain data; "
            "was it written by dens / torchvision, and is it complete?"
        ) from exc


def _cause(exc: Exception) -> str:
    """What a failed ``torch.load`` says is wrong with the file. For a refusal of the safe loader, its own
    finding only: PyTorch's advice to load the file with ``weights_only=False`` (which runs whatever code a
    pickle holds) is not for files dens reads, which are untrusted input."""
    text = str(exc).strip()
    if "Weights only load failed" in text:
        finding = text.partition("WeightsUnpickler error:")[2]
        finding = " ".join(finding.split("Please use")[0].split("Check the documentation")[0].split()).rstrip(". ")
        return f"PyTorch's safe loader refused it: {finding or 'it holds more than tensors and plain data'}"
    return text.splitlines()[0] if text else type(exc).__name__


def _is_onnx(path: Path) -> bool:
    """Whether ``path`` holds an ONNX model (a protobuf ModelProto: its first field, ir_version, then the
    producer's name), whatever it is named; a torch.save file is a zip archive or a pickle."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return False
    return path.suffix.lower() == ".onnx" or (len(head) > 3 and head[0] == 0x08 and head[1] < 0x80 and head[2] == 0x12)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors and plain data only) and rebuild its model."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    sha = file_sha256(path)
    blob = _read(path, "dens checkpoint", map_location)
    if not isinstance(blob, dict) or "format_version" not in blob:
        raise CheckpointError(
            f"{path} is not a dens checkpoint (no format_version); a bare state dict is a "
            "--weights file, not a checkpoint"
        )
    if blob["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {blob['format_version']!r}; this dens reads format "
            f"{FORMAT_VERSION} (a newer file needs a newer dens)"
        )
    missing = [k for k in _KEYS if k not in blob]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}: a truncated or hand-made checkpoint?")
    try:
        model = build_model(weights=None, **blob["model_args"])
        model.load_state_dict(strip_prefixes(blob["state_dict"]), strict=True)
        preprocess = PreprocessConfig.from_dict(blob["preprocess"])
        classes = tuple(str(c) for c in blob["classes"])
        if len(classes) != model.model_args["num_classes"]:
            raise ValueError(f"{len(classes)} classes for {model.model_args['num_classes']} outputs")
        temperature = float(blob["temperature"])
        if not temperature > 0:
            raise ValueError(f"temperature {temperature} is not positive")
        if not isinstance(blob["summary"], dict) or not isinstance(blob["extra"], dict):
            raise ValueError("summary and extra must be dicts")
    except (TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: inconsistent checkpoint: {exc}") from exc
    if isinstance(map_location, str | torch.device):
        model.to(map_location)
    return Checkpoint(model.eval(), preprocess, classes, temperature, blob["summary"], blob["extra"], sha, path)
