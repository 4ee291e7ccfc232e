"""dens-export: the checkpoint as an ONNX graph that carries its own configuration, proven against PyTorch.

``onnx``: :func:`export_onnx`, :func:`read_metadata`; ``parity``: :func:`check_parity`; ``cli``: the command.
"""

from dens.export.onnx import OnnxMetadataError, export_onnx, read_metadata
from dens.export.parity import check_parity

__all__ = ["OnnxMetadataError", "check_parity", "export_onnx", "read_metadata"]
