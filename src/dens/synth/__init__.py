"""Synthetic screening cohort: real DICOM files plus an RSNA-style ``train.csv``, so every stage runs with no data.

An image shows a breast against the chest wall, a skin line, a nipple, the pectoral muscle on MLO and
fibroglandular tissue whose amount and texture follow the density class; neighbouring classes overlap, as
they do between human readers. The modules, in the order a run uses them:

``spec`` (:class:`Machine`, :class:`ImageSpec`: what one image is), ``cohort`` (the plan: patients, exams,
views, headers and ``train.csv`` rows), ``phantom`` (the drawn breast), ``image`` (pixels on a detector,
header, encoding: one file), ``run`` (:class:`SynthConfig` -> :func:`run`; :func:`generate`), and ``cli``
(``dens-synth``), which nothing here imports.
"""

from dens.synth.cohort import COLUMNS, DENSITY_PRIOR
from dens.synth.runner import MAX_SEED, SIZES, SynthConfig, generate, run
from dens.synth.spec import MACHINES, ImageSpec, Machine

__all__ = [
    "COLUMNS",
    "DENSITY_PRIOR",
    "MACHINES",
    "MAX_SEED",
    "SIZES",
    "ImageSpec",
    "Machine",
    "SynthConfig",
    "generate",
    "run",
]
