"""The node's scoring, kept open for its life: a :class:`dens.scoring.scorer.Scorer` (the decode engine feeding
one ONNX Runtime session, rows made as dens-infer makes them), preds.csv and its breast and exam CSVs
(:mod:`dens.preds`), and a study's density SR. A node scores a study exactly as ``dens-infer`` scores a folder:
both go through the same scorer and write through the same preds.csv contract.

The decode engine's :meth:`DecodePool.map` is single-use and pulls its input from the dispatcher thread, so
the node feeds it one endless iterator for its whole life. That iterator never blocks for long: while no file
waits it yields an idle marker, an item with a problem, which the pool hands back undecoded at once, so the
dispatcher keeps collecting the workers' results whatever the traffic.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dens import labels, sr
from dens.engine import Decoded, PoolError
from dens.exams import exam_calls
from dens.flags import FlagRule
from dens.preds.aggregate import write_aggregates
from dens.preds.columns import COLUMNS
from dens.preds.writer import PredsWriter, read_existing
from dens.scoring.model import ModelFile
from dens.scoring.scorer import Scorer
from dens.serve.metrics import Metrics

log = logging.getLogger(__name__)

_IDLE = ("", "idle: no file waiting")  # what the feed yields while no file waits (never decoded)
# How long the feed waits for a file before it yields an idle marker: briefly while files are out at the
# workers (the dispatcher asks for input several times in a row before it collects results), longer when
# none is (nothing to collect; a file that arrives is taken at once either way).
_BUSY_WAIT, _IDLE_WAIT = 0.005, 0.2


class PipelineError(RuntimeError):
    """The pipeline cannot go on (the decode engine broke down); the message says what to do."""


@dataclass(frozen=True)
class Report:
    """A study's SR as written: its instance UID, its file, the exam's call ('' when no image was usable), each
    breast's call (by laterality) and the exam's p_dense."""

    sr_uid: str
    path: Path
    density: str
    breasts: dict[str, str | None] = field(default_factory=dict)
    p_dense: float | None = None


class Pipeline:
    """The scorer and preds.csv of one node, open until :meth:`close`."""

    def __init__(
        self,
        model: ModelFile,
        preds: Path,
        rule: FlagRule,
        *,
        device: str = "auto",
        batch_size: int | None = None,
        workers: int | None = None,
        threads: int | None = None,
        metrics: Metrics | None = None,
    ):
        self.rule = rule
        self.metrics = metrics or Metrics()
        self.preds = preds
        self.scorer = Scorer(model, rule=rule, device=device, batch_size=batch_size, workers=workers, threads=threads)
        try:
            self.writer = PredsWriter(preds, resume=True)
            model.check_rows(self.writer.models, preds, "a state folder serves one model; start with a new one")
        except BaseException:
            self.scorer.close()
            raise
        model.warn_caveats("dens-serve")
        self.model = model
        self.identity = sr.ModelIdentity.from_metadata(model.metadata, model.sha256)  # what its SRs name
        self._feed: queue.Queue[str] = queue.Queue()
        self._outstanding = 0  # files fed whose result has not come back
        self._stop = threading.Event()
        self._results = self.scorer.pool.map(self._items())

    def close(self) -> None:
        self._stop.set()
        self.scorer.close()
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
        t0 = time.perf_counter()
        rows = self.scorer.score(ordered)
        usable = sum(d.status == "ok" for d in ordered)
        if usable:
            self.metrics.model_seconds.observe(time.perf_counter() - t0)
            self.metrics.model_images.inc(usable)
        for d in ordered:
            if d.seconds > 0:  # decoded by a worker (not refused before one took it)
                self.metrics.decode_seconds.observe(d.seconds)
            if d.status != "ok":
                log.info("dens-serve: %s: %s %s", d.path, d.status, d.reason)
        for row in rows:
            self.metrics.instances_scored.labels(row[labels.STATUS]).inc()
        self.writer.write(rows)
        return rows

    def report(self, rows: Sequence[Mapping[str, str]], paths: Sequence[Path], out_dir: Path) -> Report:
        """The density SR of one study from its rows (``paths``: each row's file), written whole into ``out_dir``
        as ``<SOP Instance UID>.dcm``. A study none of whose images was usable gets one too, that says it was not
        assessed and why, image by image: the sender learns it was seen, not lost."""
        frame = pd.DataFrame(list(rows)).astype(str)
        frame[labels.PATH] = [str(p) for p in paths]
        ok = frame[frame[labels.STATUS] == "ok"]
        cited = frame if ok.empty else ok  # a not-assessed SR cites every image it names
        headers = dict(zip(cited[labels.PATH], sr.read_headers(list(cited[labels.PATH])), strict=True))
        report = sr.exam_report(frame, headers, self.identity, self.rule)
        path = sr.save(report, out_dir, sr.uid_filename(str(report.SOPInstanceUID), ".dcm"))
        if ok.empty:
            return Report(str(report.SOPInstanceUID), path, "")
        exam = exam_calls(ok, self.rule).iloc[0]
        breasts = {side: str(exam[f"{labels.DENSITY}_{side}"]) or None for side in ("L", "R")}
        return Report(str(report.SOPInstanceUID), path, str(exam[labels.DENSITY]), breasts, float(exam[labels.P_DENSE]))

    def write_aggregates(self) -> None:
        """Rewrite preds.breast.csv and preds.exam.csv from the whole preds.csv."""
        write_aggregates(self.preds, self.rule)
