"""``run(InferConfig) -> Summary``: walk the input folder, decode in worker processes, batch into one ONNX
Runtime session, append rows to preds.csv, then write the breast and exam CSVs.

The main thread only batches, runs the model and writes; a dispatcher thread keeps the decode workers fed
meanwhile (ONNX Runtime releases the GIL), so decoding and the model overlap.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dens import labels, runs, show_progress
from dens.engine import Decoded, DecodePool, PoolError
from dens.errors import Reason
from dens.exams import aggregate_paths
from dens.flags import FlagRule, parse_flag
from dens.infer import aggregate, walk
from dens.infer.config import EXIT_ERRORS, EXIT_OK, InferConfig
from dens.infer.runtime import (
    DeviceError,
    ModelError,
    Runtime,
    decode_nice,
    default_parallelism,
    open_runtime,
    planned_device,
)
from dens.infer.writer import CorruptOutput, OutputExists, PredsWriter, check_output, make_row
from dens.metadata import file_sha256

log = logging.getLogger(__name__)

# Rows held before a write even when no batch fills (a long run of skipped files still reaches the disk).
_MAX_PENDING_FACTOR = 4


class InferError(Exception):
    """A run that cannot start or go on (no model, no GPU, an existing output); the message says what to do."""


@dataclass
class Summary:
    """Counts and where the time went; ``exit_code`` is 0, or 3 when some file errored."""

    files: int = 0
    ok: int = 0
    skipped: int = 0
    errors: int = 0
    already_done: int = 0
    seconds: float = 0.0
    decode_s: float = 0.0  # summed over workers (busy time)
    wait_s: float = 0.0  # the main thread waiting for decoded images: > 0 means decode-bound
    model_s: float = 0.0
    write_s: float = 0.0
    provider: str = ""
    workers: int = 0
    threads: int = 0
    batch_size: int = 0
    out: Path | None = None
    breast_csv: Path | None = None
    exam_csv: Path | None = None

    @property
    def images_per_s(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    @property
    def exit_code(self) -> int:
        return EXIT_ERRORS if self.errors else EXIT_OK

    def line(self) -> str:
        resumed = f" (+{self.already_done} from the earlier run)" if self.already_done else ""
        return (
            f"dens-infer: {self.files} files{resumed}: {self.ok} ok, {self.skipped} skipped, {self.errors} errors "
            f"in {self.seconds:.1f} s, {self.images_per_s:.2f} img/s; decode {self.decode_s:.1f} s "
            f"({self.workers} workers), model {self.model_s:.1f} s ({self.provider}, batch {self.batch_size}, "
            f"{self.threads} threads), "
            f"write {self.write_s:.1f} s, waiting for decode {self.wait_s:.1f} s"
        )


def resolve_model(model: Path | None) -> Path:
    """``model`` when given, else the newest run's model.onnx, with a message saying how to make one."""
    if model is not None:
        if not Path(model).is_file():
            raise InferError(f"model {model} not found: export one with `dens-export --onnx`, or pass --model PATH")
        return Path(model)
    try:
        return runs.latest_file("model.onnx")
    except FileNotFoundError as exc:
        raise InferError(f"{exc} (--model PATH)") from exc


def run(cfg: InferConfig) -> Summary:
    """Run inference as ``cfg`` says; returns the summary (raises InferError when the run cannot start)."""
    start = time.perf_counter()
    studies, out = Path(cfg.studies), Path(cfg.out)
    if not studies.exists():
        raise InferError(f"{studies} does not exist: pass the folder of studies to read")
    if cfg.resume and cfg.overwrite:
        raise InferError("--resume and --overwrite contradict each other: choose one")
    model_path = resolve_model(cfg.model)
    try:
        rule = parse_flag(cfg.flag)
    except ValueError as exc:
        raise InferError(str(exc)) from exc
    try:
        check_output(out, resume=cfg.resume, overwrite=cfg.overwrite)
        device = planned_device(cfg.device)
    except (OutputExists, DeviceError) as exc:
        raise InferError(str(exc)) from exc
    workers = cfg.workers or default_parallelism(device)[0]
    # The workers start (a second of imports each) while the model opens; they learn the preprocessing
    # from its metadata once it is open.
    with DecodePool(workers) as pool:
        try:
            runtime = _open(model_path, cfg)
            writer = PredsWriter(out, resume=cfg.resume, overwrite=cfg.overwrite)
        except (DeviceError, ModelError, OutputExists, CorruptOutput) as exc:
            raise InferError(str(exc)) from exc
        if cfg.workers is None and runtime.device != device:  # auto fell back to the CPU: its worker count
            pool.grow(default_parallelism(runtime.device)[0])
            workers = pool.workers
        sha = file_sha256(model_path)
        summary = Summary(
            provider=runtime.provider,
            workers=workers,
            threads=runtime.threads,
            batch_size=runtime.batch_size,
            out=out,
            already_done=writer.kept,
        )
        with writer:
            others = writer.models - {sha}
            if others:
                raise InferError(
                    f"{out} holds rows of another model (sha256 {', '.join(s[:12] for s in others)}), "
                    f"not {model_path} ({sha[:12]}): resume with that model, or --overwrite"
                )
            log.info(
                "dens-infer: model %s (%s, S=%d, sha256 %s) on %s, batch %d, %d ORT thread(s), %d decode worker(s)",
                model_path,
                runtime.metadata.get("arch", "?"),
                runtime.preprocess.size,
                sha[:12],
                runtime.provider,
                runtime.batch_size,
                runtime.threads,
                workers,
            )
            pool.configure(runtime.preprocess, nice=decode_nice(runtime.device))  # the device the model got
            pool.buffer = 2 * runtime.batch_size
            _process(studies, [out, *aggregate_paths(out)], pool, writer, runtime, sha, cfg, summary, rule)
    if not summary.files and not summary.already_done:
        log.warning("dens-infer: no files found under %s", studies)
    t0 = time.perf_counter()
    summary.breast_csv, summary.exam_csv = aggregate.write_aggregates(out, rule)
    summary.write_s += time.perf_counter() - t0
    summary.seconds = time.perf_counter() - start
    return summary


def _open(model_path: Path, cfg: InferConfig) -> Runtime:
    runtime = open_runtime(model_path, cfg.device, batch_size=cfg.batch_size, threads=cfg.threads)
    if runtime.classes != labels.CLASSES:
        raise ModelError(f"{model_path} predicts classes {runtime.classes}; dens-infer writes {labels.CLASSES}")
    return runtime


def _entries(studies: Path, exclude: list[Path], done: set[str]):
    for entry in walk.walk(os.path.abspath(studies), exclude):
        if entry.path not in done:
            yield entry.path, f"{Reason.UNREADABLE.value}: {entry.problem}" if entry.problem else ""


def _process(
    studies: Path,
    exclude: list[Path],
    pool: DecodePool,
    writer: PredsWriter,
    runtime: Runtime,
    sha: str,
    cfg: InferConfig,
    summary: Summary,
    rule: FlagRule,
) -> None:
    bar = tqdm(total=None, unit="img", desc="dens-infer", disable=not show_progress(cfg.progress), dynamic_ncols=True)
    # The total comes from a second walk in a thread, so the first file is read at once on any archive; only
    # for a bar that is shown (a batch job's would cost a whole extra pass over the archive for nothing).
    if not bar.disable:
        threading.Thread(
            target=lambda: setattr(bar, "total", sum(1 for _ in _entries(studies, exclude, writer.done))), daemon=True
        ).start()
    pending: list[Decoded] = []
    images = 0

    def flush() -> None:
        nonlocal pending, images
        ok = [d for d in pending if d.status == "ok"]
        probs = iter(())
        if ok:
            t0 = time.perf_counter()
            try:
                probs = iter(runtime.predict(np.stack([d.image for d in ok])[:, None]))
            except Exception as exc:  # ORT out of memory, a broken provider: stop, keeping what is written
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise InferError(
                    f"the model failed on a batch of {len(ok)} images ({first}); the rows written "
                    f"so far are in {writer.path}: fix the cause, then --resume"
                ) from exc
            summary.model_s += time.perf_counter() - t0
        rows = [
            make_row(d.path, d.status, d.reason, d.info, next(probs) if d.status == "ok" else None, sha, rule)
            for d in pending
        ]
        t0 = time.perf_counter()
        writer.write(rows)
        summary.write_s += time.perf_counter() - t0
        for d in pending:
            summary.files += 1
            summary.ok += d.status == "ok"
            summary.skipped += d.status == "skipped"
            summary.errors += d.status == "error"
        bar.set_postfix(ok=summary.ok, skipped=summary.skipped, errors=summary.errors, refresh=False)
        bar.update(len(pending))
        pending, images = [], 0

    try:
        results = pool.map(_entries(studies, exclude, writer.done))
        while True:
            t0 = time.perf_counter()
            decoded = next(results, None)
            summary.wait_s += time.perf_counter() - t0
            if decoded is None:
                break
            summary.decode_s += decoded.seconds
            if decoded.status != "ok":
                log.debug("%s: %s %s", decoded.path, decoded.status, decoded.reason)
            if decoded.noise:
                log.debug("%s: the codecs said: %s", decoded.path, decoded.noise)
            pending.append(decoded)
            images += decoded.status == "ok"
            if images >= runtime.batch_size or len(pending) >= _MAX_PENDING_FACTOR * runtime.batch_size:
                flush()
        if pending:
            flush()
    except PoolError as exc:
        raise InferError(str(exc)) from exc
    finally:
        bar.close()
