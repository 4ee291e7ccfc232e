"""dens-infer's pipeline, kept open for the node's life: the decode engine feeding one ONNX Runtime session,
rows made and appended as dens-infer makes them, the breast and exam CSVs, and a study's density SR.

This is the one module of the node that reaches into dens-infer's public pieces (the runtime, the preds.csv
writer and its rows, the aggregate CSVs): a node scores a study exactly as ``dens-infer`` scores a folder.

The decode engine's :meth:`DecodePool.map` is single-use and pulls its input from the dispatcher thread, so
the node feeds it one endless iterator for its whole life. That iterator never blocks for long: while no file
waits it yields an idle marker, an item with a problem, which the pool hands back undecoded at once, so the
dispatcher keeps collecting the workers' results whatever the traffic.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dens import labels, modelcard, sr
from dens.engine import Decoded, DecodePool, PoolError
from dens.flags import FlagRule
from dens.infer.aggregate import write_aggregates
from dens.infer.runtime import ModelError, decode_nice, default_parallelism, open_runtime, planned_device
from dens.infer.writer import COLUMNS, PredsWriter, make_row, preprocess_cell, read_existing
from dens.metadata import file_sha256

log = logging.getLogger(__name__)

_IDLE = ("", "idle: no file waiting")  # what the feed yields while no file waits (never decoded)
# How long the feed waits for a file before it yields an idle marker: briefly while files are out at the
# workers (the dispatcher asks for input several times in a row before it collects results), longer when
# none is (nothing to collect; a file that arrives is taken at once either way).
_BUSY_WAIT, _IDLE_WAIT = 0.005, 0.2


class PipelineError(RuntimeError):
    """The pipeline cannot start (a model of other classes, preds.csv of another model), or cannot go on (the
    decode engine broke down); the message says what to do."""


@dataclass(frozen=True)
class Report:
    """A study's SR as written: its instance UID, its file, the exam's call ('' when the exam is incomplete)."""

    sr_uid: str
    path: Path
    density: str


class Pipeline:
    """The decode pool, the model session and preds.csv of one node, open until :meth:`close`."""

    def __init__(
        self,
        model_path: Path,
        preds: Path,
        rule: FlagRule,
        *,
        device: str = "auto",
        batch_size: int | None = None,
        workers: int | None = None,
        threads: int | None = None,
    ):
        self.rule = rule
        self.preds = preds
        planned = planned_device(device)
        # The workers start (a second of imports each) while the model opens, as in dens-infer.
        self.pool = DecodePool(workers or default_parallelism(planned)[0])
        try:
            self.runtime = open_runtime(model_path, device, batch_size=batch_size, threads=threads)
            if self.runtime.classes != labels.CLASSES:
                raise ModelError(f"{model_path} predicts classes {self.runtime.classes}; dens writes {labels.CLASSES}")
            if workers is None and self.runtime.device != planned:
                self.pool.grow(default_parallelism(self.runtime.device)[0])
            self.sha256 = file_sha256(model_path)
            self.model = sr.ModelIdentity.from_metadata(self.runtime.metadata, self.sha256)
            self.writer = PredsWriter(preds, resume=True)
            others = self.writer.models - {self.sha256}
            if others:
                raise PipelineError(
                    f"{preds} holds rows of another model (sha256 {', '.join(s[:12] for s in others)}), not "
                    f"{model_path} ({self.sha256[:12]}): a state folder serves one model; start with a new one"
                )
        except BaseException:
            self.pool.close()
            raise
        caveats = modelcard.caveats(self.runtime.metadata.get("summary"))
        if caveats:
            log.warning("dens-serve: warning: %s: %s (see its model card)", model_path.name, "; ".join(caveats))
        self.cell = preprocess_cell(self.runtime.preprocess)
        self.pool.configure(self.runtime.preprocess, nice=decode_nice(self.runtime.device))
        self.pool.buffer = 2 * self.runtime.batch_size
        self._feed: queue.Queue[str] = queue.Queue()
        self._outstanding = 0  # files fed whose result has not come back
        self._stop = threading.Event()
        self._results = self.pool.map(self._items())

    def close(self) -> None:
        self._stop.set()
        self.pool.close()
        self.writer.close()

    def _items(self) -> Iterator[tuple[str, str]]:
        while not self._stop.is_set():
            try:
                yield self._feed.get(timeout=_BUSY_WAIT if self._outstanding else _IDLE_WAIT), ""
            except queue.Empty:
                yield _IDLE

    def existing_rows(self) -> dict[str, dict[str, str]]:
        """preds.csv's rows by their spool file's stem (the instance's key), for :meth:`State.adopt_rows`."""
        return {Path(r[0]).stem: dict(zip(COLUMNS, r, strict=True)) for r in read_existing(self.preds).rows}

    def score(self, paths: Sequence[Path]) -> list[dict[str, str]]:
        """Decode ``paths`` through the pool, run the model on the usable ones in batches, append one row per
        file to preds.csv (fsync'd); the rows, in ``paths``' order."""
        wanted = list(dict.fromkeys(str(p) for p in paths))
        pending = set(wanted)
        self._outstanding = len(wanted)
        for p in wanted:
            self._feed.put(p)
        got: dict[str, Decoded] = {}
        while len(got) < len(wanted):
            try:
                decoded = next(self._results)
            except (StopIteration, PoolError) as exc:
                raise PipelineError(
                    f"the decode engine stopped ({exc or 'no more results'}); restart dens-serve: what was spooled "
                    "and not answered is scored then"
                ) from exc
            if decoded.path in pending:
                got[decoded.path] = decoded
                self._outstanding -= 1
        ordered = [got[p] for p in wanted]
        ok = [d for d in ordered if d.status == "ok"]
        batch = self.runtime.batch_size
        probs = [
            p
            for i in range(0, len(ok), batch)
            for p in self.runtime.predict(np.stack([d.image for d in ok[i : i + batch]])[:, None])
        ]
        by_path = {d.path: p for d, p in zip(ok, probs, strict=True)}
        rows = [
            make_row(d.path, d.status, d.reason, d.info, by_path.get(d.path), self.sha256, self.rule, self.cell)
            for d in ordered
        ]
        for d in ordered:
            if d.status != "ok":
                log.info("dens-serve: %s: %s %s", d.path, d.status, d.reason)
        self.writer.write(rows)
        return rows

    def report(self, rows: Sequence[Mapping[str, str]], paths: Sequence[Path], out_dir: Path) -> Report | None:
        """The density SR of one study from its rows (``paths``: each row's file), written whole into
        ``out_dir`` as ``<SOP Instance UID>.dcm``; None when no image of it was usable."""
        frame = pd.DataFrame(list(rows)).astype(str)
        frame[labels.PATH] = [str(p) for p in paths]
        ok = frame[frame[labels.STATUS] == "ok"]
        if ok.empty:
            return None
        headers = dict(zip(ok[labels.PATH], sr.read_headers(list(ok[labels.PATH])), strict=True))
        report = sr.exam_report(frame, headers, self.model, self.rule)
        path = sr.save(report, out_dir, sr.uid_filename(str(report.SOPInstanceUID), ".dcm"))
        call = "" if report.CompletionFlag != "COMPLETE" else _exam_density(ok, self.rule)
        return Report(str(report.SOPInstanceUID), path, call)

    def write_aggregates(self) -> None:
        """Rewrite preds.breast.csv and preds.exam.csv from the whole preds.csv."""
        write_aggregates(self.preds, self.rule)


def _exam_density(ok: pd.DataFrame, rule: FlagRule) -> str:
    from dens.exams import exam_calls

    return str(exam_calls(ok, rule)[labels.DENSITY].iloc[0])
