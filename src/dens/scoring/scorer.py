"""From decoded files to preds.csv rows: the one way every scoring stage makes them.

A :class:`Scorer` is the decode pool, one ONNX Runtime session and the row making of a stage, set up in one
call: dens-infer's local engine and dens-serve run files through it. :class:`RowMaker` is the row making
alone, for the Ray engine's driver, whose decoding and model run in Ray actors: both engines' rows come from
the same :func:`dens.preds.columns.make_row` call with the same model identity, so they cannot differ.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from dens.engine import Decoded, DecodePool
from dens.flags import FlagRule, flag_dense
from dens.preds.columns import make_row
from dens.scoring.model import ModelFile
from dens.scoring.runtime import Runtime, decode_nice, default_parallelism, open_runtime, planned_device

log = logging.getLogger(__name__)


class RowMaker:
    """The preds.csv rows of one model under one flag rule."""

    def __init__(self, model: ModelFile, rule: FlagRule = flag_dense):
        self.model, self.rule = model, rule
        self.cell = model.preprocess_cell  # computed once, not per row

    def row(
        self, path: str, status: str, reason: str, info: Mapping | None, probs: Sequence[float] | None
    ) -> dict[str, str]:
        """The row of one file: its outcome, and the model's probabilities when it was scored."""
        return make_row(
            path,
            status=status,
            reason=reason,
            info=info,
            probs=probs,
            model_sha256=self.model.sha256,
            rule=self.rule,
            preprocess=self.cell,
        )

    def of(self, decoded: Decoded, probs: Sequence[float] | None) -> dict[str, str]:
        """The row of a file the decode engine gave back."""
        return self.row(decoded.path, decoded.status, decoded.reason, decoded.info, probs)


class ScoringError(RuntimeError):
    """The model failed on a batch (out of memory, a broken provider); the message names the batch's size."""


class Scorer:
    """The decode pool, the model's session and its rows, open until :meth:`close`.

    ``workers`` decode processes (default: :func:`default_parallelism` for the device the model got) start
    while the model opens (a second of imports each); they learn the preprocessing from the model's metadata.
    """

    def __init__(
        self,
        model: ModelFile,
        *,
        rule: FlagRule = flag_dense,
        device: str = "auto",
        batch_size: int | None = None,
        workers: int | None = None,
        threads: int | None = None,
    ):
        planned = planned_device(device)
        self.model = model
        self.rows = RowMaker(model, rule)
        self.pool = DecodePool(workers or default_parallelism(planned)[0])
        try:
            self.runtime: Runtime = open_runtime(model, device, batch_size=batch_size, threads=threads)
            if workers is None and self.runtime.device != planned:  # auto fell back to the CPU: its worker count
                self.pool.grow(default_parallelism(self.runtime.device)[0])
        except BaseException:
            self.pool.close()
            raise
        self.pool.configure(model.preprocess, nice=decode_nice(self.runtime.device), buffer=2 * self.runtime.batch_size)

    @property
    def batch_size(self) -> int:
        return self.runtime.batch_size

    def predict(self, decoded: Sequence[Decoded]) -> list[np.ndarray | None]:
        """The model's probabilities for each of ``decoded`` that is ``ok`` (None for the others), in batches
        of the session's size; ScoringError when the model fails."""
        ok = [d for d in decoded if d.status == "ok"]
        probs: list[np.ndarray] = []
        for start in range(0, len(ok), self.batch_size):
            batch = ok[start : start + self.batch_size]
            try:
                probs.extend(self.runtime.predict(np.stack([d.image for d in batch])[:, None]))
            except Exception as exc:  # ORT out of memory, a broken provider
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ScoringError(f"the model failed on a batch of {len(batch)} images ({first})") from exc
        found = iter(probs)
        return [next(found) if d.status == "ok" else None for d in decoded]

    def score(self, decoded: Sequence[Decoded]) -> list[dict[str, str]]:
        """The rows of ``decoded``, in their order, the ``ok`` ones scored."""
        return [self.rows.of(d, p) for d, p in zip(decoded, self.predict(decoded), strict=True)]

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
