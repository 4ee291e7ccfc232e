"""Explaining the dense calls: Grad-CAM maps for the flagged images and the HTML review page.

``run(GradcamConfig(preds_csv, out_dir, ...))`` is what ``dens-gradcam`` and ``dens-infer --gradcam`` call
(``run_gradcam(preds_csv, out_dir, **settings)`` the same with keyword arguments);
``GradCAM`` is the core, usable on any classifier with a convolutional layer.
"""

from dens.explain.gradcam import CamResult, GradCAM, assign_stems, resolve_layer, safe_stem
from dens.explain.runner import GradcamConfig, GradcamError, GradcamSummary, run, run_gradcam
from dens.flags import Flag, parse_flag

__all__ = [
    "CamResult",
    "Flag",
    "GradCAM",
    "GradcamConfig",
    "GradcamError",
    "GradcamSummary",
    "assign_stems",
    "parse_flag",
    "resolve_layer",
    "run",
    "run_gradcam",
    "safe_stem",
]
