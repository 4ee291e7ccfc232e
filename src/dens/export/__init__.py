"""dens-export: the checkpoint as an ONNX graph that carries its own configuration, proven against PyTorch.

``onnx``: :func:`export_onnx`, :func:`read_metadata`; ``parity``: :func:`check_parity`; ``cli``: the command.
"""

from dens.export.onnx import export_onnx
from dens.export.parity import check_parity
from dens.metadata import OnnxMetadataError, read_metadata

__all__ = ["OnnxMetadataError", "check_parity", "export_onnx", "read_metadata"]
