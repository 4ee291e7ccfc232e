"""Inference: ``dens-infer STUDIES --out preds.csv`` (decode workers feeding one ONNX Runtime session).

Nothing heavy is imported here or in ``cli``: a spawned decode worker imports this package (and the
console script's module) before it starts, and should not pay for ONNX Runtime or pandas.
``run``, ``InferConfig``, ``InferError`` and ``Summary`` load from :mod:`dens.infer.runner` on first use.
"""

from __future__ import annotations

DEVICES = ("auto", "tensorrt", "cuda", "cpu")
# Exit status of dens-infer.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ERRORS, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

__all__ = ["DEVICES", "EXIT_ERRORS", "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "InferConfig",
           "InferError", "Summary", "run"]  # fmt: skip


def __getattr__(name: str):
    if name in ("InferConfig", "InferError", "Summary", "run"):
        from dens.infer import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'dens.infer' has no attribute {name!r}")
