"""Export a dens checkpoint to an ONNX graph that carries its own configuration.

The graph takes ``image``: ``uint8 [N, 1, S, S]`` (N dynamic) and gives ``probs`` (softmax of logits over the
stored temperature) and ``logits``, both ``float32 [N, classes]``. The cast, scaling and normalisation are
the first ops of the graph because they are in ``DensityNet.forward``. The file's ``metadata_props`` key
``dens`` holds JSON (classes, PreprocessConfig, temperature, model args, training summary, the checkpoint's
sha256 ...) and its signature (digests of the graph and of that JSON), so ``dens-infer`` needs nothing but the
file and knows when it was edited.

Exporter: torch's legacy TorchScript exporter (``dynamo=False``). The dynamo exporter needs ``onnxscript``,
which is not a dependency, and for a plain CNN the legacy one gives a clean graph: BatchNorm folded into the
convolutions, standard ops only, a symbolic batch axis.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import dens
from dens.artifact.metadata import INPUT, LOGITS, METADATA_FORMAT, PROBS, file_sha256, write_metadata
from dens.artifact.model import Checkpoint, load_checkpoint
from dens.export.config import DEFAULT_OPSET, OPSETS

BATCH_AXIS = "N"


class Fp16ConversionError(ValueError):
    """The graph holds something the float16 converter refuses to guess at (an op it does not know)."""


class _Exported(nn.Module):
    """DensityNet plus its calibrated head: uint8 image -> (probs, logits)."""

    def __init__(self, net: nn.Module, temperature: float):
        super().__init__()
        self.net = net
        self.temperature = float(temperature)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(image)
        return torch.softmax(logits / self.temperature, dim=1), logits


def fp16_path(out_path: str | os.PathLike) -> Path:
    """Where the fp16 variant of ``out_path`` goes: ``model.onnx`` -> ``model.fp16.onnx``."""
    out_path = Path(out_path)
    return out_path.with_name(f"{out_path.stem}.fp16{out_path.suffix or '.onnx'}")


def export_onnx(
    checkpoint_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    optimize: bool = True,
    checkpoint: Checkpoint | None = None,
) -> Path:
    """Export the checkpoint at ``checkpoint_path`` to ``out_path`` (written atomically) and return it.

    ``fp16``: weights and activations of the backbone in float16 (for GPU providers), with the uint8 input
    and the float32 ``probs``/``logits`` outputs unchanged; the softmax stays in float32. ``optimize``: ORT's
    provider-independent BASIC graph optimisation, saved into the file. The graph passes
    ``onnx.checker.check_model(full_check=True)``. ``checkpoint``: the already-loaded checkpoint, to save
    reading it again (it must be the file at ``checkpoint_path``).
    """
    if opset not in OPSETS:
        raise ValueError(f"opset {opset} is not supported: choose {OPSETS.start}..{OPSETS.stop - 1}")
    checkpoint_path, out_path = Path(checkpoint_path).resolve(), Path(out_path)
    ckpt = checkpoint or load_checkpoint(checkpoint_path)
    shape = ckpt.preprocess.shape
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".export-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        _torch_export(_Exported(ckpt.model.float().eval(), ckpt.temperature), raw, shape, opset)
        if optimize:
            raw = _ort_optimize(raw, Path(tmp) / "optimized.onnx")
        model = onnx.load(raw)
        _prune_opset_imports(model)
        if fp16:
            model = to_fp16(model, keep_fp32_after=LOGITS)
        meta = _metadata(ckpt, checkpoint_path, opset, "fp16" if fp16 else "fp32")
        model.doc_string = f"dens {meta['arch']} breast-density classifier ({meta['precision']}); see metadata 'dens'"
        write_metadata(model, meta)  # signed: the graph is final here
        staged = Path(tmp) / "model.onnx"
        onnx.save(model, staged)
        onnx.checker.check_model(str(staged), full_check=True)
        os.replace(staged, out_path)
    return out_path


def _torch_export(module: nn.Module, path: Path, shape: tuple[int, int], opset: int) -> None:
    example = torch.zeros(2, 1, *shape, dtype=torch.uint8)  # batch 2: no size-1 specialisation to trace
    with warnings.catch_warnings(), torch.no_grad():
        # The legacy exporter is chosen on purpose (module docstring); its deprecation notice is not news.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        axes = {name: {0: BATCH_AXIS} for name in (INPUT, PROBS, LOGITS)}
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            do_constant_folding=True,
            input_names=[INPUT],
            output_names=[PROBS, LOGITS],
            dynamic_axes=axes,
        )


def _ort_optimize(src: Path, dst: Path) -> Path:
    """``src`` after ORT's BASIC graph optimisation, written to ``dst``. BASIC only: its rewrites (constant
    folding, redundant-node removal, Conv+BN/Add/Mul fusion) keep standard ONNX ops, so the saved graph
    still runs on every provider; EXTENDED and above write contrib ops (FusedConv, NCHWc layouts) that tie
    the file to the provider it was optimised for."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    return dst


def _prune_opset_imports(model: onnx.ModelProto) -> None:
    """Drop the opset imports no node uses: ORT writes every domain it knows, which some consumers reject."""
    used = {node.domain for node in model.graph.node} | {""}
    keep = [o for o in model.opset_import if o.domain in used or (o.domain == "ai.onnx" and "" in used)]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def _metadata(ckpt: Checkpoint, checkpoint_path: Path, opset: int, precision: str) -> dict[str, Any]:
    sha = ckpt.sha256 if Path(ckpt.path).resolve() == checkpoint_path else file_sha256(checkpoint_path)
    return {
        "format_version": METADATA_FORMAT,
        "classes": list(ckpt.classes),
        "preprocess": ckpt.preprocess.to_dict(),
        "temperature": float(ckpt.temperature),
        "arch": ckpt.model.model_args["arch"],
        "model_args": dict(ckpt.model.model_args),
        "summary": ckpt.summary,
        "checkpoint_path": str(checkpoint_path),
        "checkpoint_sha256": sha,
        "dens_version": dens.__version__,
        "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "opset": int(opset),
        "precision": precision,
        "input": INPUT,
        "outputs": [PROBS, LOGITS],
    }


# --- float16 -----------------------------------------------------------------------------------------

# Ops whose float inputs may all become float16 (the ONNX schema allows it and nothing must stay float32).
_FP16_OPS = {
    "Add",
    "AveragePool",
    "BatchNormalization",
    "Cast",
    "Constant",
    "Conv",
    "Div",
    "Flatten",
    "Gemm",
    "GlobalAveragePool",
    "Identity",
    "MatMul",
    "MaxPool",
    "Mul",
    "Relu",
    "Reshape",
    "Sub",
}


def to_fp16(model: onnx.ModelProto, *, keep_fp32_after: str = LOGITS) -> onnx.ModelProto:
    """A float16 copy of ``model``'s computation up to the tensor ``keep_fp32_after``; that tensor is cast back
    to float32, so what follows it (temperature and softmax) and every graph input and output keep their type.

    ``onnxconverter_common`` is not a dependency and onnx has no converter; this one covers the ops a ResNet
    export holds (``_FP16_OPS``) and refuses others rather than guessing.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    if keep_fp32_after not in producer:
        raise ValueError(f"no node produces {keep_fp32_after!r}")
    # The part to convert: every node the boundary tensor depends on.
    todo, upstream = [producer[keep_fp32_after]], set()
    while todo:
        node = todo.pop()
        if id(node) in upstream:
            continue
        upstream.add(id(node))
        todo.extend(producer[i] for i in node.input if i in producer)
    nodes = [n for n in graph.node if id(n) in upstream]
    unsupported = sorted({n.op_type for n in nodes} - _FP16_OPS)
    if unsupported:
        raise Fp16ConversionError(f"fp16 conversion does not handle the ops {', '.join(unsupported)}")

    inputs = {i for n in nodes for i in n.input}
    downstream_inputs = {i for n in graph.node if id(n) not in upstream for i in n.input}
    for init in graph.initializer:
        if init.name in inputs and init.data_type == TensorProto.FLOAT:
            if init.name in downstream_inputs:
                raise Fp16ConversionError(f"initializer {init.name} feeds both the float16 and the float32 part")
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    for node in nodes:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16), attr.t.name))

    boundary = producer[keep_fp32_after]
    half = f"{keep_fp32_after}_fp16"
    boundary.output[list(boundary.output).index(keep_fp32_after)] = half
    cast = helper.make_node("Cast", [half], [keep_fp32_after], name=f"{keep_fp32_after}_to_fp32", to=TensorProto.FLOAT)
    position = list(graph.node).index(boundary) + 1
    graph.node.insert(position, cast)
    del graph.value_info[:]  # stale float32 annotations; shape inference below writes the true ones
    return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
