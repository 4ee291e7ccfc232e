"""A density call and whether it is flagged for review (and Grad-CAM): one rule, shared by dens-infer's
CSVs (image, breast and exam rows alike) and dens-gradcam.

torch-free, so the inference process never imports torch for it, and pandas-free at import, so a stage's
config can check a rule where a spawned worker imports it.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dens import labels
from dens.labels import FLAGGED

if TYPE_CHECKING:
    import pandas as pd

TRUE, FALSE = "true", "false"
PROB_FORMAT = "{:.6f}"

# The flag rule: which calls are flagged for review (and Grad-CAM). One function, so preds.csv, the breast
# and exam CSVs and Grad-CAM agree; ``--flag`` passes another rule with the same signature.
FlagRule = Callable[[str, Mapping[str, float]], bool]

_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
_THRESHOLD = re.compile(r"^\s*(p_[A-Za-z]+)\s*(>=|<=|>|<)\s*([0-9.eE+-]+)\s*$")


@dataclass(frozen=True)
class Flag:
    """Which calls are flagged: density classes (``C,D``) or a probability threshold (``p_dense>=0.5``).

    A Flag is a dens-infer flag rule too, ``flag(density, {"A": p_A, ...}) -> bool``, so that inference and
    Grad-CAM can flag alike. ``Flag()`` (no classes, no column) is the C/D rule, and in :meth:`select` it
    means preds.csv's own ``flagged`` column (whatever rule dens-infer used).
    """

    classes: tuple[str, ...] = ()
    column: str = ""
    op: str = ""
    threshold: float = 0.0

    def __call__(self, density: str, probs: Mapping[str, float]) -> bool:
        if self.column == labels.P_DENSE:  # as written in preds.csv when given, else the dense classes' sum
            value = probs[labels.P_DENSE] if labels.P_DENSE in probs else sum(probs[c] for c in labels.DENSE_CLASSES)
            return bool(_OPS[self.op](value, self.threshold))
        if self.column:
            return bool(_OPS[self.op](probs[self.column.removeprefix("p_")], self.threshold))
        return str(density).strip().upper() in (self.classes or labels.DENSE_CLASSES)

    def select(self, preds: pd.DataFrame) -> pd.Series:
        """The ok rows of preds.csv (strings, as read) that this flag picks."""
        import pandas as pd

        ok = preds[labels.STATUS] == "ok"
        if not self.classes and not self.column and FLAGGED in preds:
            return ok & preds[FLAGGED].str.strip().str.lower().isin({"true", "1", "yes"})
        columns = [*labels.PROB_COLUMNS, labels.P_DENSE]
        values = preds[columns].apply(pd.to_numeric, errors="coerce").to_numpy()
        keys = [*labels.CLASSES, labels.P_DENSE]
        picked = [
            bool(is_ok) and self(density, dict(zip(keys, row, strict=True)))
            for is_ok, density, row in zip(ok, preds[labels.DENSITY], values, strict=True)
        ]
        return pd.Series(picked, index=preds.index)

    def __str__(self) -> str:
        if self.classes:
            return ",".join(self.classes)
        return f"{self.column}{self.op}{self.threshold:g}" if self.column else FLAGGED


def parse_flag(spec: str | Flag | None) -> Flag:
    """``None``/``""`` -> preds.csv's ``flagged`` column; ``"C,D"`` -> those classes; ``"p_dense>=0.5"`` or
    ``"p_D>0.3"`` -> a threshold on that column."""
    if isinstance(spec, Flag):
        return spec
    if not spec or spec.strip().lower() == FLAGGED:
        return Flag()
    match = _THRESHOLD.match(spec)
    if match:
        column, op, value = match.groups()
        if column not in (*labels.PROB_COLUMNS, labels.P_DENSE):
            raise ValueError(
                f"--flag {spec!r}: unknown column {column!r}; use one of "
                f"{', '.join((*labels.PROB_COLUMNS, labels.P_DENSE))}"
            )
        return Flag(column=column, op=op, threshold=float(value))
    classes = tuple(c.strip().upper() for c in spec.split(",") if c.strip())
    bad = [c for c in classes if c not in labels.CLASSES]
    if bad or not classes:
        raise ValueError(
            f"--flag {spec!r}: expected density classes like 'C,D' or a threshold like "
            f"'p_dense>=0.5' (classes are {', '.join(labels.CLASSES)})"
        )
    return Flag(classes=classes)


# The default rule: flag the dense calls (C, D), the ones that trigger a density notification.
flag_dense: FlagRule = Flag()


def call(probs: Sequence[float], classes: Sequence[str] = labels.CLASSES) -> tuple[str, float]:
    """The density call (argmax) and p_dense (the summed probability of the dense classes)."""
    probs = np.asarray(probs, dtype=np.float64)
    density = classes[int(np.argmax(probs))]
    p_dense = float(sum(p for c, p in zip(classes, probs, strict=True) if labels.is_dense(c)))
    return density, p_dense


def prediction_cells(probs: Sequence[float], rule: FlagRule = flag_dense) -> dict[str, str]:
    """The prediction columns (p_A..p_D, density, p_dense, dense, flagged) for one probability vector: an
    image's in preds.csv, a breast's or an exam's in the aggregated CSVs."""
    density, p_dense = call(probs)
    named = dict(zip(labels.CLASSES, (float(p) for p in probs), strict=True))
    return {
        **{col: PROB_FORMAT.format(p) for col, p in zip(labels.PROB_COLUMNS, probs, strict=True)},
        labels.DENSITY: density,
        labels.P_DENSE: PROB_FORMAT.format(p_dense),
        labels.DENSE: TRUE if labels.is_dense(density) else FALSE,
        FLAGGED: TRUE if rule(density, named) else FALSE,
    }
