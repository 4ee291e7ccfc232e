"""dens-qc: a contact sheet of the canonical images a model sees, each captioned, so a person checks the
preprocessing at a glance.

:mod:`dens.qc.cli` (click) -> :class:`QcConfig` -> :func:`run` (:mod:`dens.qc.runner`: find, decode, call,
write); :mod:`dens.qc.sheet` lays out the sheet (pure numpy/OpenCV; bench/canonical.py uses it too).
"""

from dens.qc.runner import QcConfig, QcError, QcResult, run

__all__ = ["QcConfig", "QcError", "QcResult", "run"]
