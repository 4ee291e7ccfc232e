"""dens-export: the checkpoint as an ONNX graph that carries its own configuration, proven against PyTorch.

``run``: :class:`ExportConfig` -> :func:`run` (export, then parity, per precision); ``onnx``:
:func:`export_onnx`; ``parity``: :func:`check_parity`; ``cli``: the command, which nothing here imports.
"""

from dens.artifact.metadata import OnnxMetadataError, read_metadata
from dens.export.onnx import export_onnx
from dens.export.parity import check_parity
from dens.export.runner import OPSETS, PRECISIONS, ExportConfig, parity_report_path, run

__all__ = [
    "OPSETS",
    "PRECISIONS",
    "ExportConfig",
    "OnnxMetadataError",
    "check_parity",
    "export_onnx",
    "parity_report_path",
    "read_metadata",
    "run",
]
