"""``run(InferConfig) -> Summary``: walk the input folder (or pull from a PACS, :mod:`dens.pull`), decode in
worker processes, batch into one ONNX Runtime session, append rows to preds.csv, then write the breast and exam
CSVs.

The main thread only batches, runs the model and writes; a dispatcher thread keeps the decode workers fed
meanwhile (ONNX Runtime releases the GIL), so decoding and the model overlap. Decoded files may arrive out
of order (a slow file does not hold up the ones after it); their rows are written in the walk's order,
each as soon as the rows before it are.

The run holds the output's lock (:mod:`dens.preds.lock`) from start to end, so two runs never write one
preds.csv.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from dens import labels, show_progress, sources
from dens.engine import DEFAULT_MEMORY_BUDGET, DEFAULT_TIMEOUT, Decoded, PoolError
from dens.exams import aggregate_paths
from dens.flags import FlagRule, parse_flag
from dens.infer.config import InferConfig
from dens.infer.inputs import InFlight, Inputs, PulledInputs
from dens.infer.summary import Summary
from dens.preds import aggregate
from dens.preds import shard as records
from dens.preds.cells import escape_text
from dens.preds.lock import OutputLocked, lock_path, output_lock
from dens.preds.writer import CorruptOutput, NotAFolder, OutputExists, PredsWriter, check_folder, check_output
from dens.pull import Pull, PullError
from dens.scoring.model import ModelError, ModelFile
from dens.scoring.runtime import DeviceError, planned_device
from dens.scoring.scorer import RowMaker, Scorer, ScoringError

log = logging.getLogger(__name__)

# Rows the Ray engine gathers before a write (one fsync'd append each).
_RAY_WRITE_ROWS = 256
# Rows held before a write even when no batch fills (a long run of skipped files still reaches the disk).
_MAX_PENDING_FACTOR = 4


class InferError(Exception):
    """A run that cannot start or go on (no model, no GPU, an existing output); the message says what to do."""


def run(cfg: InferConfig) -> Summary:
    """Run inference as ``cfg`` says; returns the summary (raises InferError when the run cannot start or
    cannot go on: the message says what to do)."""
    start = time.perf_counter()
    out, source = Path(cfg.out), cfg.source
    if source is None and not Path(cfg.studies).exists():
        raise InferError(f"{cfg.studies} does not exist: pass the folder of studies to read")
    try:
        model = ModelFile.read(
            cfg.model, "dens-infer", precision=cfg.precision, allow_modified=cfg.allow_modified_model
        )
    except ModelError as exc:
        raise InferError(str(exc)) from exc
    rule = parse_flag(cfg.flag)
    record = None
    if source is not None:
        try:
            inputs = PulledInputs(Pull(source, cfg.pull_query(), cfg.pull_access(), cfg.pull_folder))
        except ValueError as exc:  # a secret's variable unset since the options were read
            raise InferError(str(exc)) from exc
    else:
        # Paths as the folder really is: a resume through another spelling of it (a symlink) finds its rows.
        studies = Path(os.path.realpath(cfg.studies))
        exclude = [out, *aggregate_paths(out), lock_path(out), records.record_path(out)]
        try:
            shard = sources.Shard.parse(cfg.shard)
            if next(sources.entries(studies, exclude), None) is None:
                raise InferError(f"no files under {studies}: nothing to classify; check the folder given as STUDIES")
        except ValueError as exc:  # a file that is no manifest
            raise InferError(str(exc)) from exc
        inputs = Inputs(studies, tuple(exclude), shard, cfg.plain_images)
        if cfg.shard is not None:  # what the shard is, for dens-merge
            record = records.new_record(shard.index, shard.count, model.path, model.sha256, studies)
    try:
        check_folder(out)
        with output_lock(out):
            return _run(cfg, out, inputs, record, model, rule, start)
    except (OutputLocked, NotAFolder) as exc:
        raise InferError(str(exc)) from exc
    except OSError as exc:  # the lock, or the output folder, cannot be written
        raise InferError(f"cannot write {out} ({_os_error(exc)}): choose an --out in a folder you can write") from exc


def _run(
    cfg: InferConfig,
    out: Path,
    inputs: Inputs | PulledInputs,
    record: records.ShardRecord | None,
    model: ModelFile,
    rule: FlagRule,
    start: float,
) -> Summary:
    try:
        check_output(out, resume=cfg.resume or cfg.retry_errors, overwrite=cfg.overwrite)
        planned_device(cfg.device)  # an explicit GPU without one: refused before any file is read
        records.begin(out, record, resume=cfg.resume or cfg.retry_errors)
    except (OutputExists, DeviceError, records.RecordError) as exc:
        raise InferError(str(exc)) from exc
    try:
        # A pull opens here: its source reached and its studies found before the scorer starts.
        with inputs.opened() as pull:
            if cfg.engine == "ray":
                summary = _score_on_ray(cfg, out, inputs.items, model, rule)
            else:
                summary = _score_here(cfg, out, inputs, model, rule)
    except PullError as exc:  # unreachable, credentials refused, no study (one stopped mid-run: InferError already)
        raise InferError(f"cannot pull from {cfg.source}: {exc}") from exc
    summary.repeats = inputs.repeats.count
    summary.pull = pull.summary if pull is not None else None
    t0 = time.perf_counter()
    try:
        summary.breast_csv, summary.exam_csv = aggregate.write_aggregates(out, rule)
    except OSError as exc:
        raise InferError(
            f"{out} is complete, but its breast and exam CSVs could not be written ({_os_error(exc)}): make room, "
            "then run again with --resume (it only rewrites them)"
        ) from exc
    if record is not None:
        records.write_record(out, replace(record, complete=True, rows=summary.already_done + summary.files))
    summary.write_s += time.perf_counter() - t0
    summary.model, summary.sr = model.path, cfg.sr
    if cfg.sr is not None:
        summary.reports = write_reports(out, Path(cfg.sr), model, rule)
    summary.seconds = time.perf_counter() - start
    return summary


def _writer(cfg: InferConfig, out: Path) -> PredsWriter:
    resume = cfg.resume or cfg.retry_errors
    return PredsWriter(out, resume=resume, overwrite=cfg.overwrite, retry_errors=cfg.retry_errors)


def _check_model(writer: PredsWriter, model: ModelFile) -> None:
    """Refuse to append to rows of another model; say in one line what the model's card says against it."""
    try:
        model.check_rows(writer.models, writer.path, "resume with that model, or --overwrite")
    except ModelError as exc:
        raise InferError(str(exc)) from exc
    model.warn_caveats("dens-infer")


def _score_here(
    cfg: InferConfig, out: Path, inputs: Inputs | PulledInputs, model: ModelFile, rule: FlagRule
) -> Summary:
    """The local engine: this machine's decode processes feeding one ONNX Runtime session."""
    try:
        scorer = Scorer(
            model, rule=rule, device=cfg.device, batch_size=cfg.batch_size, workers=cfg.workers, threads=cfg.threads
        )
    except (DeviceError, ModelError) as exc:
        raise InferError(str(exc)) from exc
    with scorer:
        try:
            writer = _writer(cfg, out)
        except (OutputExists, CorruptOutput) as exc:
            raise InferError(str(exc)) from exc
        runtime = scorer.runtime
        summary = Summary(
            provider=runtime.provider,
            workers=scorer.pool.workers,
            threads=runtime.threads,
            batch_size=runtime.batch_size,
            out=out,
            already_done=writer.kept,
            already_errors=writer.kept_errors,
            already_ok=writer.kept_ok,
            retried=writer.retried,
        )
        with writer:
            _check_model(writer, model)
            log.info(
                "dens-infer: model %s (%s, sha256 %s; preprocess %s) on %s, batch %d, %d ORT thread(s), "
                "%d decode worker(s)",
                model.path,
                model.metadata.get("arch", "?"),
                model.sha256[:12],
                scorer.rows.cell,
                runtime.provider,
                runtime.batch_size,
                runtime.threads,
                summary.workers,
            )
            _process(inputs, scorer, writer, cfg, summary)
    return summary


def _os_error(exc: OSError) -> str:
    """An OSError as a user reads it: its cause, and the file when it names one."""
    where = f": {escape_text(os.fsdecode(exc.filename))}" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


def _append(writer: PredsWriter, rows: list[dict[str, str]], summary: Summary) -> None:
    """Append ``rows`` to preds.csv (fsync'd), timed; a failed write ends the run with what to do."""
    t0 = time.perf_counter()
    try:
        writer.write(rows)
    except OSError as exc:
        raise InferError(
            f"writing {writer.path} failed ({_os_error(exc)}); the rows written before are kept, whole: "
            "make room (or fix the folder), then run again with --resume"
        ) from exc
    summary.write_s += time.perf_counter() - t0


def _score_on_ray(cfg: InferConfig, out: Path, entries: Callable, model: ModelFile, rule: FlagRule) -> Summary:
    """The Ray engine (:mod:`dens.infer.ray_engine`): decode and model actors on a Ray cluster; the rows are
    made and written here, as the local engine makes and writes them."""
    try:
        from dens.infer import ray_engine  # Ray only when asked: its import takes seconds
    except ImportError as exc:
        raise InferError(f"--engine ray needs Ray ({exc}): pip install 'dens[ray]'") from exc
    try:
        writer = _writer(cfg, out)
    except (OutputExists, CorruptOutput) as exc:
        raise InferError(str(exc)) from exc
    try:
        resources = ray_engine.connect(cfg.ray_address, show_progress(cfg.progress))
    except Exception as exc:  # no cluster at that address, a version mismatch: Ray's own message
        raise InferError(f"cannot start or join Ray at {cfg.ray_address or 'a local Ray'}: {exc}") from exc
    plan = ray_engine.plan(resources, cfg.device, cfg.batch_size)
    rows_of = RowMaker(model, rule)
    summary = Summary(
        provider=f"Ray ({plan.scorers} model actor(s) on {'GPU' if plan.scorer_gpus else 'CPU'})",
        workers=plan.decoders,
        threads=int(plan.scorer_cpus),
        batch_size=plan.batch_size,
        out=out,
        already_done=writer.kept,
        already_errors=writer.kept_errors,
        already_ok=writer.kept_ok,
        retried=writer.retried,
    )
    rows: list[dict[str, str]] = []

    def write() -> None:
        _append(writer, rows, summary)
        rows.clear()

    def add(result: dict) -> None:
        status, info = result["status"], sources.fill_identity(result["info"], result["identity"])
        rows.append(rows_of.row(result["path"], status, result["reason"], info, result["probs"]))
        summary.count(status, info, result["reason"])
        summary.decode_s += result["seconds"]
        if len(rows) >= _RAY_WRITE_ROWS:
            write()

    with writer:
        _check_model(writer, model)
        log.info(
            "dens-infer: model %s (%s, sha256 %s; preprocess %s) on Ray (%d CPUs, %d GPUs): %d decode actor(s), "
            "%d model actor(s), batch %d",
            model.path,
            model.metadata.get("arch", "?"),
            model.sha256[:12],
            rows_of.cell,
            int(resources.get("CPU", 0)),
            int(resources.get("GPU", 0)),
            plan.decoders,
            plan.scorers,
            plan.batch_size,
        )
        try:
            ray_engine.process(
                entries(writer.done),
                plan,
                model.path,
                cfg.device,
                model.preprocess.to_dict(),
                add,
                timeout=DEFAULT_TIMEOUT,
                memory_budget=DEFAULT_MEMORY_BUDGET,
            )
        except ray_engine.RayError as exc:  # an actor that cannot start (its imports fail): Ray's words, in short
            write()
            raise InferError(
                f"the Ray engine failed ({ray_engine.first_line(exc)}); the rows written so far are in {out}: fix "
                "the cause, then --resume"
            ) from exc
        write()
    return summary


def _process(
    inputs: Inputs | PulledInputs, scorer: Scorer, writer: PredsWriter, cfg: InferConfig, summary: Summary
) -> None:
    def entries():
        return inputs.items(writer.done, writer.done_sops)

    in_flight = InFlight(entries())  # the items the pool takes, with the manifest's identity until the row

    bar = tqdm(total=None, unit="img", desc="dens-infer", disable=not show_progress(cfg.progress), dynamic_ncols=True)
    # The total comes from a second walk in a thread, so the first file is read at once on any archive; only
    # for a bar that is shown (a batch job's would cost a whole extra pass over the archive for nothing), and
    # never for a pull (a second pass would pull again).
    if not bar.disable and inputs.countable:
        threading.Thread(target=lambda: setattr(bar, "total", sum(1 for _ in entries())), daemon=True).start()
    pending: list[Decoded] = []
    images = 0
    waiting: dict[int, dict[str, str]] = {}  # rows by input index, until the rows before them are written
    next_row = 0

    def flush() -> None:
        nonlocal pending, images, next_row
        t0 = time.perf_counter()
        try:
            made = scorer.score(pending)
        except ScoringError as exc:  # ORT out of memory, a broken provider: stop, keeping what is written
            raise InferError(
                f"{exc}; the rows written so far are in {writer.path}: fix the cause, then --resume"
            ) from exc
        summary.model_s += time.perf_counter() - t0
        for d, row in zip(pending, made, strict=True):
            waiting[d.index] = row
        rows = []
        while next_row in waiting:
            rows.append(waiting.pop(next_row))
            next_row += 1
        _write(rows)
        for d in pending:
            summary.count(d.status, d.info, d.reason)
        bar.set_postfix(ok=summary.ok, skipped=summary.skipped, errors=summary.errors, refresh=False)
        bar.update(len(pending))
        pending, images = [], 0

    def _write(rows: list[dict[str, str]]) -> None:
        if rows:
            _append(writer, rows, summary)

    try:
        results = scorer.pool.map(in_flight)
        while True:
            t0 = time.perf_counter()
            decoded = next(results, None)
            summary.wait_s += time.perf_counter() - t0
            if decoded is None:
                break
            summary.decode_s += decoded.seconds
            decoded.info = in_flight.info(decoded.index, decoded.info)
            if decoded.status != "ok":
                log.debug("%s: %s %s", escape_text(decoded.path), decoded.status, escape_text(decoded.reason))
            if decoded.noise:
                log.debug("%s: the codecs said: %s", escape_text(decoded.path), escape_text(decoded.noise))
            pending.append(decoded)
            images += decoded.status == "ok"
            if images >= scorer.batch_size or len(pending) >= _MAX_PENDING_FACTOR * scorer.batch_size:
                flush()
        if pending:
            flush()
        _write([waiting.pop(i) for i in sorted(waiting)])  # none, unless the pool skipped an index
    except PoolError as exc:
        raise InferError(str(exc)) from exc
    except PullError as exc:  # the pull cannot go on: what was fetched and scored is kept
        raise InferError(
            f"the pull from {cfg.source} stopped: {exc}; the rows written so far are in {writer.path}: fix the "
            "cause, then --resume"
        ) from exc
    finally:
        inputs.close()
        bar.close()


def write_reports(out: Path, folder: Path, model: ModelFile, rule: FlagRule) -> tuple[Path, ...]:
    """``--sr``: one density SR per exam of ``out`` (preds.csv) into ``folder`` (:mod:`dens.sr`, whose pydicom and
    highdicom load only now: the decoding is over). Plain images' rows (``--plain-images``) are left out of the
    SRs, the log says how many; the DICOM exams beside them get theirs."""
    import pandas as pd

    from dens import sr
    from dens.preds.cells import raw_path

    preds = pd.read_csv(out, dtype=str, keep_default_na=False)
    preds[labels.PATH] = [raw_path(cell) for cell in preds[labels.PATH]]
    identity = sr.ModelIdentity.from_metadata(model.metadata, model.sha256)
    try:
        return tuple(sr.write_reports(preds, folder, identity, rule))
    except (OSError, ValueError) as exc:
        raise InferError(
            f"{out} is complete, but the SRs could not be written to {folder} ({exc}): fix the cause, then run "
            "again with --resume --sr (it only rewrites them)"
        ) from exc
