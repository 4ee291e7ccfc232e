"""The contract an exported model carries: its ``dens`` metadata, its signature and the sha256 that names a file.

The signature is the metadata's ``signature`` entry: the sha256 of the graph (the serialized model without its
metadata) and of the metadata (its canonical JSON without the signature), recorded by dens-export. A file whose
graph or metadata was edited afterwards (a preprocess with crop off, another temperature, a changed weight) no
longer matches it, and :func:`read_metadata` refuses it. It is a check against edits, not a cryptographic
signature: whoever can write the file can sign it again, which ``dens-export --check-only`` catches by
comparing the metadata with the checkpoint.

torch-free (and onnx-free until a file is read), so that dens-infer's process and its decode workers check a
model without importing torch; dens-export writes what this module checks.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import dens
from dens.route.config import PreprocessConfig

METADATA_KEY = "dens"
METADATA_FORMAT = 1
SIGNATURE = "signature"  # the metadata's entry for the digests dens-export recorded: graph_sha256, metadata_sha256
# What a signature's mismatch is worded as.
_PARTS = {
    "graph": "graph (operations, weights)",
    "metadata": "metadata (preprocess, classes, temperature, ...)",
}
REEXPORT = "re-export it with `dens-export --onnx --checkpoint CHECKPOINT --out FILE`"
# The graph's tensors: uint8 images [N, 1, H, W] in (H x W: the preprocess canvas; a preprocess without a version,
# from before it existed, is version 1's square S x S route); calibrated probabilities and raw logits out.
INPUT, PROBS, LOGITS = "image", "probs", "logits"
# The architectures a dens model is built on (dens.artifact.model builds them; named here, torch-free, so that
# the commands' choice lists cost no torch import).
ARCHS = ("resnet50", "resnet18")
# What a graph computes in: fp32 (dens-export's reference), fp16 (GPU providers), int8 (CPUs; calibrated).
PRECISIONS = ("fp32", "fp16", "int8")
# An int8 graph's "int8" entry: how it was quantized and on what (dens.export.quantize writes it).
_INT8_REQUIRED = {"format": str, "calibration_images": int, "calibration_sha256": str, "source_sha256": str}
_REQUIRED = {
    "format_version": int,
    "classes": list,
    "preprocess": dict,
    "temperature": (int, float),
    "arch": str,
    "model_args": dict,
    "summary": dict,
    "checkpoint_sha256": str,
    "opset": int,
    "precision": str,
    "input": str,
    "outputs": list,
}


class OnnxMetadataError(ValueError):
    """An ONNX file without usable dens metadata; the message names the file and what to do."""


class ModelModifiedError(OnnxMetadataError):
    """An exported model whose graph or metadata is not what dens-export signed. ``parts``: what differs
    (``graph``, ``metadata``); ``metadata``: what the file says, for a caller told to go on regardless."""

    def __init__(self, message: str, metadata: dict[str, Any], parts: tuple[str, ...]):
        super().__init__(message)
        self.metadata = metadata
        self.parts = parts


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def variant_path(path: str | os.PathLike, precision: str) -> Path:
    """The file of ``precision`` beside the fp32 model ``path``: ``model.onnx`` -> ``model.int8.onnx`` (fp32: the
    model itself). A path that already names a variant gives its sibling: ``model.int8.onnx`` -> fp32
    ``model.onnx``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    path = Path(path)
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    base, _, tail = stem.rpartition(".")
    if base and tail in PRECISIONS:  # a variant: go through its fp32 name
        stem = base
    elif precision == "fp32":
        return path
    return path.with_name(stem + ("" if precision == "fp32" else f".{precision}") + (path.suffix or ".onnx"))


def read_metadata(onnx_path: str | os.PathLike) -> dict[str, Any]:
    """The ``dens`` metadata of an exported model, parsed, checked and verified against its signature (raises
    :class:`OnnxMetadataError`; :class:`ModelModifiedError` when the graph or the metadata was edited after
    export). A model without a signature (exported by an older dens) is read as it is: the caller says so."""
    path = Path(onnx_path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {path} not found")
    import onnx  # here: inference reads metadata from its ORT session and never needs the onnx package

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # a protobuf decode error says little; what matters is the file is not ONNX
        raise OnnxMetadataError(f"{path} is not a readable ONNX file ({type(exc).__name__}: {exc})") from exc
    meta = parse_metadata({p.key: p.value for p in model.metadata_props}.get(METADATA_KEY), path)
    parts = signature_differences(model, meta)
    if parts:
        what = " and its ".join(_PARTS[p] for p in parts)
        raise ModelModifiedError(
            f"{path} was modified after dens-export wrote it: its {what} {'do' if len(parts) > 1 else 'does'} not "
            f"match the digest dens-export recorded in its '{SIGNATURE}', so it would not call images as the "
            f"exported model does; {REEXPORT}",
            meta,
            tuple(parts),
        )
    return meta


def graph_sha256(model: Any) -> str:
    """sha256 of ``model`` (an ``onnx.ModelProto``) serialized without its metadata_props: the graph, its weights,
    opsets and header, everything ONNX Runtime runs. The proto is put back as it was."""
    props = [(p.key, p.value) for p in model.metadata_props]
    del model.metadata_props[:]
    try:
        data = model.SerializeToString(deterministic=True)
    finally:
        for key, value in props:
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
    return hashlib.sha256(data).hexdigest()


def metadata_sha256(meta: dict[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces, ASCII) of ``meta`` without its signature."""
    body = {k: v for k, v in meta.items() if k != SIGNATURE}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_metadata(model: Any, meta: dict[str, Any]) -> dict[str, Any]:
    """Sign ``meta`` for ``model`` (an ``onnx.ModelProto`` whose graph is final) and make it the model's only
    metadata entry; returns the signed metadata. dens-export's fp32, fp16 and int8 files are all written so."""
    meta = {k: v for k, v in meta.items() if k != SIGNATURE}
    del model.metadata_props[:]  # before the graph digest, which never covers them
    signed = {**meta, SIGNATURE: {"graph_sha256": graph_sha256(model), "metadata_sha256": metadata_sha256(meta)}}
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(signed, sort_keys=True)
    return signed


def signature_differences(model: Any, meta: dict[str, Any]) -> list[str] | None:
    """What of ``model`` and its parsed ``meta`` does not match the signature in ``meta``: [] when all does,
    ``graph`` and/or ``metadata`` when not, None when the model has no signature (an older dens wrote it)."""
    signature = meta.get(SIGNATURE)
    if signature is None:
        return None
    if not isinstance(signature, dict) or not all(
        isinstance(signature.get(k), str) for k in ("graph_sha256", "metadata_sha256")
    ):
        return ["graph", "metadata"]  # a signature that cannot be read verifies neither
    parts = [] if signature["graph_sha256"] == graph_sha256(model) else ["graph"]
    return parts + ([] if signature["metadata_sha256"] == metadata_sha256(meta) else ["metadata"])


def parse_metadata(text: str | None, where: str | os.PathLike) -> dict[str, Any]:
    """Parse and check the ``dens`` metadata value ``text`` (None: absent) of the model at ``where``. For a
    caller that already holds it, e.g. from ``InferenceSession.get_modelmeta().custom_metadata_map``."""
    hint = REEXPORT
    if text is None:
        raise OnnxMetadataError(f"{where} has no '{METADATA_KEY}' metadata: it was not written by dens-export; {hint}")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise OnnxMetadataError(f"{where}: its '{METADATA_KEY}' metadata is not valid JSON ({exc}); {hint}") from exc
    if not isinstance(meta, dict):
        raise OnnxMetadataError(f"{where}: its '{METADATA_KEY}' metadata is not a JSON object; {hint}")
    if meta.get("format_version") != METADATA_FORMAT:
        raise OnnxMetadataError(
            f"{where} has dens metadata format {meta.get('format_version')!r}; this dens "
            f"{dens.__version__} reads format {METADATA_FORMAT} (a newer file needs a newer dens)"
        )
    bad = [k for k, t in _REQUIRED.items() if not isinstance(meta.get(k), t) or isinstance(meta.get(k), bool)]
    if bad:
        raise OnnxMetadataError(f"{where}: its dens metadata lacks or mistypes {', '.join(bad)}; {hint}")
    try:
        PreprocessConfig.from_dict(meta["preprocess"])
    except (TypeError, ValueError) as exc:
        raise OnnxMetadataError(f"{where}: its dens metadata has an unusable preprocess ({exc}); {hint}") from exc
    if not meta["classes"] or not all(isinstance(c, str) for c in meta["classes"]) or not meta["temperature"] > 0:
        raise OnnxMetadataError(f"{where}: its dens metadata has empty classes or a non-positive temperature; {hint}")
    if meta["precision"] not in PRECISIONS:
        raise OnnxMetadataError(
            f"{where}: its dens metadata names precision {meta['precision']!r}; this dens {dens.__version__} knows "
            f"{', '.join(PRECISIONS)}"
        )
    int8 = meta.get("int8")
    if meta["precision"] == "int8" and (
        not isinstance(int8, dict) or any(not isinstance(int8.get(k), t) for k, t in _INT8_REQUIRED.items())
    ):
        raise OnnxMetadataError(
            f"{where}: an int8 graph whose dens metadata lacks its calibration record ({', '.join(_INT8_REQUIRED)}); "
            "re-export it with `dens-export --onnx --int8 --calibrate DIR`"
        )
    return meta
