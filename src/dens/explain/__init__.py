"""Explaining the dense calls: Grad-CAM maps for the flagged images and the HTML review page.

``run_gradcam(preds_csv, out_dir, ...)`` is what ``dens-gradcam`` and ``dens-infer --gradcam`` call;
``GradCAM`` is the core, usable on any classifier with a convolutional layer.
"""

from dens.explain.gradcam import CamResult, GradCAM, assign_stems, resolve_layer, safe_stem
from dens.explain.run import GradcamError, GradcamSummary, run_gradcam
from dens.flags import Flag, parse_flag

__all__ = [
    "CamResult",
    "Flag",
    "GradCAM",
    "GradcamError",
    "GradcamSummary",
    "assign_stems",
    "parse_flag",
    "resolve_layer",
    "run_gradcam",
    "safe_stem",
]
