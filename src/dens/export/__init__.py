"""dens-export: the checkpoint as an ONNX graph that carries its own configuration, proven against PyTorch.

``config``: :class:`ExportConfig` and its choices; ``runner``: :func:`run` (export, then parity, per precision);
``onnx``: :func:`export_onnx`; ``parity``: :func:`check_parity`; ``cli``: the command, which nothing here
imports.

Each name below is imported from its module when it is first used, so that importing the command's module
(``dens.export.cli``, whose usage errors answer at once) does not import torch.
"""

import dens

_MODULE_OF = {
    "OPSETS": "dens.export.config",
    "PRECISIONS": "dens.export.config",
    "ExportConfig": "dens.export.config",
    "OnnxMetadataError": "dens.artifact.metadata",
    "read_metadata": "dens.artifact.metadata",
    "check_parity": "dens.export.parity",
    "export_onnx": "dens.export.onnx",
    "parity_report_path": "dens.export.runner",
    "run": "dens.export.runner",
}

__all__ = sorted(_MODULE_OF)

__getattr__ = dens.lazy_exports(__name__, _MODULE_OF)
