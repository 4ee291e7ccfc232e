"""dens-verdicts: a reviewer's verdicts, exported from the review page (:mod:`dens.review`), merged into
preds.exam.csv and scored against the model's calls.

:mod:`dens.verdicts.cli` (click) -> :class:`VerdictsConfig` -> :func:`run` (:mod:`dens.verdicts.runner`).
"""

from dens.verdicts.runner import MERGED_COLUMNS, Agreement, VerdictsConfig, VerdictsError, merge, run

__all__ = ["MERGED_COLUMNS", "Agreement", "VerdictsConfig", "VerdictsError", "merge", "run"]
