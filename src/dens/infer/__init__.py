"""Inference: ``dens-infer STUDIES --out preds.csv`` (decode workers feeding one ONNX Runtime session).

The shape of every stage: :mod:`dens.infer.cli` (click) -> :class:`InferConfig` (:mod:`dens.infer.config`) ->
:func:`run` (:mod:`dens.infer.runner`). Nothing heavy is imported here: a spawned decode worker imports the
console script's module before it starts, and should not pay for ONNX Runtime or pandas. ``run``,
``InferError`` and ``Summary`` load from :mod:`dens.infer.runner` and :mod:`dens.infer.summary` on first use.
"""

from __future__ import annotations

from dens.infer.config import (
    DEVICES,
    EXIT_ERRORS,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_USAGE,
    InferConfig,
)

__all__ = [
    "DEVICES",
    "EXIT_ERRORS",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_TERMINATED",
    "EXIT_USAGE",
    "InferConfig",
    "InferError",
    "Summary",
    "run",
]


def __getattr__(name: str):
    if name in ("InferError", "Summary", "run"):
        import dens.infer.runner

        return getattr(dens.infer.runner, name)
    raise AttributeError(f"module 'dens.infer' has no attribute {name!r}")
