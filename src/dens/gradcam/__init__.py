"""dens-gradcam: Grad-CAM maps for the flagged images of a preds.csv, and the review page written with them.

``run(GradcamConfig(preds_csv, out_dir, ...))`` is what ``dens-gradcam`` and ``dens-infer --gradcam`` call
(``run_gradcam(preds_csv, out_dir, **settings)`` the same with keyword arguments);
``GradCAM`` is the core, usable on any classifier with a convolutional layer. The page itself is
:mod:`dens.review`'s.
"""

from dens.flags import Flag, parse_flag
from dens.gradcam.cam import CamResult, GradCAM, assign_stems, resolve_layer, safe_stem
from dens.gradcam.runner import GradcamConfig, GradcamError, GradcamSummary, run, run_gradcam

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
