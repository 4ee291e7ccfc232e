"""dens-gradcam: Grad-CAM maps for the flagged images of a preds.csv, and the review page written with them.

``run(GradcamConfig(preds_csv, out_dir, ...))`` is what ``dens-gradcam`` and ``dens-infer --gradcam`` call
(``run_gradcam(preds_csv, out_dir, **settings)`` the same with keyword arguments);
``GradCAM`` is the core, usable on any classifier with a convolutional layer. The page itself is
:mod:`dens.review`'s.

Each name below is imported from its module when it is first used, so that importing the command's module
(``dens.gradcam.cli``, whose usage errors answer at once) does not import torch.
"""

import dens

_MODULE_OF = {
    "Flag": "dens.flags",
    "parse_flag": "dens.flags",
    "CamResult": "dens.gradcam.cam",
    "GradCAM": "dens.gradcam.cam",
    "assign_stems": "dens.gradcam.cam",
    "resolve_layer": "dens.gradcam.cam",
    "safe_stem": "dens.gradcam.cam",
    "GradcamConfig": "dens.gradcam.config",
    "GradcamError": "dens.gradcam.config",
    "GradcamSummary": "dens.gradcam.runner",
    "run": "dens.gradcam.runner",
    "run_gradcam": "dens.gradcam.runner",
}

__all__ = sorted(_MODULE_OF)

__getattr__ = dens.lazy_exports(__name__, _MODULE_OF)
