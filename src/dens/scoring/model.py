"""The exported model a scoring stage runs, found, read and checked once.

dens-infer (either engine), dens-serve and dens-qc score with an ONNX file that dens-export wrote. This module
finds it (the path given, else the newest run's ``model.onnx``; a PyTorch checkpoint is refused with what to
do), reads its metadata and hashes it once, verifies its signature (a file edited after export is refused),
checks that it calls the classes dens writes, says what its model card says against it once, and refuses to
append its rows to a preds.csv of another model. ONNX Runtime is not imported here: the Ray engine's driver
reads a model without opening a session.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dens import labels, runs
from dens.artifact import modelcard
from dens.artifact.metadata import (
    REEXPORT,
    SIGNATURE,
    ModelModifiedError,
    OnnxMetadataError,
    file_sha256,
    read_metadata,
    variant_path,
)
from dens.preds.columns import preprocess_cell
from dens.route.config import PreprocessConfig

log = logging.getLogger(__name__)

# The first bytes of a PyTorch checkpoint: a zip archive (torch.save), or a pickle (the legacy format).
CHECKPOINT_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x04", b"\x80\x05")


class ModelError(ValueError):
    """The model cannot be used (missing, a checkpoint, not a dens model, other classes, rows of another
    model); the message names the file and what to do."""


def resolve_model(model: str | os.PathLike | None, stage: str = "dens-infer") -> Path:
    """``model`` when given, else the newest run's model.onnx; raises ModelError saying how to make one, and
    for a PyTorch checkpoint how to export it."""
    if model is None:
        try:
            return runs.latest_file("model.onnx")
        except FileNotFoundError as exc:
            raise ModelError(f"{exc} (--model PATH)") from exc
    model = Path(model)
    if not model.is_file():
        raise ModelError(f"model {model} not found: export one with `dens-export --onnx`, or pass --model PATH")
    with open(model, "rb") as f:
        head = f.read(4)
    if head.startswith(CHECKPOINT_MAGIC):
        raise ModelError(
            f"{model} is a PyTorch checkpoint (such as dens-train's best.pt), not an ONNX model: {stage} runs the "
            f"exported model; make it with `dens-export --onnx --checkpoint {model} --out model.onnx`, then pass "
            "--model model.onnx"
        )
    return model


def model_for_precision(model_path: str | os.PathLike, precision: str) -> Path:
    """The ``precision`` variant dens-export wrote beside ``model_path`` (``model.onnx`` + int8 ->
    ``model.int8.onnx``); raises ModelError, saying how to make it, when it is not there."""
    path = variant_path(model_path, precision)
    if not path.is_file():
        make = {"int8": " --int8 --calibrate DIR", "fp16": " --fp16"}.get(precision, "")
        raise ModelError(
            f"--precision {precision}: {path} not found beside {model_path}; make it with `dens-export --onnx{make} "
            f"--out {variant_path(model_path, 'fp32')}`, or pass the file with --model"
        )
    return path


@dataclass(frozen=True)
class ModelFile:
    """An exported dens model as read from its file: its path, its ``dens`` metadata and its sha256."""

    path: Path
    metadata: dict[str, Any]
    sha256: str

    @classmethod
    def read(
        cls,
        model: str | os.PathLike | None,
        stage: str = "dens-infer",
        *,
        precision: str | None = None,
        allow_modified: bool = False,
    ) -> ModelFile:
        """Find (:func:`resolve_model`), read, verify against its signature and check the model; ModelError says
        what is wrong. A model edited after export is refused, or with ``allow_modified`` (dens-infer's and
        dens-serve's ``--allow-modified-model``) scored with a loud warning; one without a signature (an older
        dens exported it) is scored with a warning that it cannot be verified. ``precision``: the variant
        dens-export wrote beside the model (:func:`model_for_precision`) rather than the model itself."""
        path = resolve_model(model, stage)
        if precision is not None:
            path = model_for_precision(path, precision)
        try:
            metadata = read_metadata(path)
        except ModelModifiedError as exc:
            if not allow_modified:
                raise ModelError(
                    f"{exc} (dens-infer and dens-serve score it anyway with --allow-modified-model)"
                ) from exc
            log.warning("%s: WARNING: %s; scoring it anyway, as --allow-modified-model asks", stage, exc)
            metadata = exc.metadata
        except (OnnxMetadataError, OSError) as exc:
            raise ModelError(str(exc)) from exc
        else:
            if SIGNATURE not in metadata:
                log.warning(
                    "%s: warning: %s has no signature (dens %s exported it, before models were signed), so an edit "
                    "of its graph or metadata cannot be detected; %s to sign it",
                    stage,
                    path,
                    metadata.get("dens_version", "?"),
                    REEXPORT,
                )
        found = cls(path, metadata, file_sha256(path))
        if found.classes != labels.CLASSES:
            raise ModelError(f"{path} predicts classes {found.classes}; {stage} writes {labels.CLASSES}")
        return found

    @functools.cached_property
    def preprocess(self) -> PreprocessConfig:
        """The route its images are made by, as its metadata says (parsed once)."""
        return PreprocessConfig.from_dict(self.metadata["preprocess"])

    @functools.cached_property
    def classes(self) -> tuple[str, ...]:
        return tuple(str(c) for c in self.metadata["classes"])

    @property
    def precision(self) -> str:
        """What the graph computes in: fp32, fp16 or int8."""
        return str(self.metadata.get("precision", "fp32"))

    @functools.cached_property
    def preprocess_cell(self) -> str:
        """The ``preprocess`` cell of its rows."""
        return preprocess_cell(self.preprocess)

    def warn_caveats(self, stage: str) -> None:
        """Log, in one line, what the model's card says against trusting it (before any call is made)."""
        caveats = modelcard.caveats(self.metadata.get("summary"))
        if caveats:
            log.warning("%s: warning: %s: %s (see its model card)", stage, self.path.name, "; ".join(caveats))

    def check_rows(self, models: set[str], preds: Path, remedy: str) -> None:
        """Refuse to append to ``preds`` when it holds rows of another model (``models``: their sha256s);
        ``remedy`` says what to do instead."""
        others = models - {self.sha256}
        if others:
            raise ModelError(
                f"{preds} holds rows of another model (sha256 {', '.join(s[:12] for s in sorted(others))}), not "
                f"{self.path} ({self.sha256[:12]}): {remedy}"
            )
