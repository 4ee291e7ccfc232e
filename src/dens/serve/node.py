"""The node's life: :func:`run` starts a node, serves until SIGTERM or Ctrl-C and says how it ended.
:func:`start` opens the state folder and recovers what a crash left, opens the pipeline
(the model and the decode engine) and listens; :meth:`Node.serve` scores each study once it has been quiet
for ``stable_seconds``, writes its SR and queues it for every destination, until :meth:`Node.stop` (SIGTERM,
Ctrl-C), after the studies being scored.

Threads: pynetdicom's (one per association) spool instances; with ``--pull``, the poller
(:mod:`dens.serve.pull`) spools what it fetches; the caller's thread (:meth:`Node.serve`) schedules and scores
the studies quiet at the time, together; the sender empties the outbox; the status endpoint answers (and serves
the metrics).

What the node tells those who watch it: its metrics (:mod:`dens.serve.metrics`), its audit log
(:mod:`dens.serve.audit`) and the drift of its calls per acquisition unit (:mod:`dens.serve.drift`), each fed
where the event happens: here for the studies, in the SCP for associations and refusals, in the sender for
the SRs' sends.

A state that cannot be written (a full disk) stops no thread: a C-STORE is refused with 0xA700, the scheduler
and the sender wait and try again, and preds.csv's rows that the database missed meanwhile are adopted then.
"""

from __future__ import annotations

import errno
import logging
import shutil
import signal
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread

import dens
from dens.flags import parse_flag
from dens.scoring.model import ModelFile
from dens.serve.audit import AuditLog, utc_iso
from dens.serve.config import EXIT_FAILED, ServeConfig, redact
from dens.serve.drift import Change, Drift, Reference, unit_of
from dens.serve.metrics import Metrics
from dens.serve.pipeline import Pipeline, PipelineError, Report
from dens.serve.pull import Poller
from dens.serve.scp import StorageSCP
from dens.serve.send import Sender, outgoing
from dens.serve.state import State, StateLocked, StateWriteError
from dens.serve.statusport import serve as serve_status

log = logging.getLogger(__name__)

_SCHEDULE_WAIT = 0.25  # seconds between looks for a quiet study while none is due
# Quiet studies scored together: their images share the decode workers and the model's batches.
_STUDIES_AT_ONCE = 16
_STATE_RETRY = 5.0  # seconds the scheduler waits after the state could not be written


class ServeError(Exception):
    """The node cannot start; the message says what to do."""


@dataclass(frozen=True)
class ServeResult:
    """How a node's life ended: ``failed`` says why it could not go on (None after a stop that was asked)."""

    failed: str | None = None

    @property
    def exit_code(self) -> int:
        return EXIT_FAILED if self.failed else 0

    def line(self) -> str:
        return f"dens-serve: stopped: {self.failed}" if self.failed else "dens-serve: stopped"


@dataclass
class Node:
    """A running node: :func:`start` makes one, :meth:`serve` runs it until :meth:`stop`."""

    cfg: ServeConfig
    state: State
    pipeline: Pipeline
    scp: StorageSCP
    sender: Sender
    address: tuple[str, int]
    metrics: Metrics
    audit: AuditLog
    drift: Drift
    poller: Poller | None = None  # --pull: the scheduled pull
    started: float = field(default_factory=time.time)
    status_address: tuple[str, int] | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    received: threading.Event = field(default_factory=threading.Event)  # set by the SCP after each instance
    _status_server: object = None
    _dirty: bool = True  # preds.csv has rows the breast and exam CSVs lack
    failed: str | None = None  # why the node stopped on its own (the pipeline broke down)
    _unrecorded: bool = False  # a state write failed: preds.csv may hold rows the database lacks
    _announced: bool = False  # the audit log says it started

    def info(self) -> dict:
        """What the node says about itself in its status (:func:`dens.serve.status.view` says who sees which)."""
        return {
            "aet": self.cfg.aet,
            "address": f"{self.address[0]}:{self.address[1]}",
            "tls": self.cfg.tls_cert is not None,
            "send_tls": self.cfg.send_tls_ca is not None,
            "stow_auth": self.cfg.stow_auth,  # the scheme only, never the secret
            "status_auth": "bearer" if self.cfg.status_token_env else None,
            "allow": "any"
            if self.cfg.allow_any
            else [a.aet + (f"@{a.address}" if a.address else "") for a in self.cfg.allow],
            "stable_seconds": self.cfg.stable_seconds,
            "destinations": [redact(d) for d in self.cfg.destinations],
            "model": {"name": self.pipeline.identity.name, "sha256": self.pipeline.model.sha256},
            "state": str(self.state.folder),
            "audit_log": str(self.audit.path),
            "drift_window": self.drift.window,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
        }

    def line(self) -> str:
        """The line that says the node is up: where it listens, as whom, its status URL and its state."""
        host, port = self.address
        status = (
            f", status on http://{self.status_address[0]}:{self.status_address[1]}/status"
            if self.status_address
            else ""
        )
        tls = " (TLS)" if self.cfg.tls_cert else ""
        return f"dens-serve: listening on {host}:{port} as {self.cfg.aet}{tls}{status}; state {self.cfg.state}"

    def stop(self) -> None:
        """Ask :meth:`serve` to return (after the studies it is scoring)."""
        self._stop.set()
        self.received.set()

    def serve(self) -> None:
        """Score quiet studies until :meth:`stop`; then close everything."""
        try:
            while not self._stop.is_set():
                try:
                    self._step()
                except OSError as exc:  # a full disk: the studies stay receiving, scored once it can be written
                    if not _no_room(exc):
                        raise
                    self._unrecorded = True
                    log.error(
                        "dens-serve: cannot write to the state folder (%s); the quiet studies wait, tried again in "
                        "%.0f s",
                        redact(exc.strerror or str(exc)),
                        _STATE_RETRY,
                    )
                    self._stop.wait(_STATE_RETRY)
        finally:
            self.close()

    def _step(self) -> None:
        if self._unrecorded:  # rows appended to preds.csv whose record failed: not scored twice
            self.state.adopt_rows(self.pipeline.existing_rows())
            self._unrecorded = False
        studies = self.state.stable_studies(self.cfg.stable_seconds, _STUDIES_AT_ONCE)
        if not studies:
            if self._dirty:
                self._aggregate()
            self.received.wait(_SCHEDULE_WAIT)
            self.received.clear()
            return
        self._process(studies)

    def close(self) -> None:
        if self.poller is not None:
            self.poller.stop()
        self.scp.stop()
        if self._status_server is not None:
            self._status_server.shutdown()
            self._status_server = None
        self.sender.stop()
        if self._dirty:
            self._aggregate()
        self.pipeline.close()
        self.state.close()
        if self._announced:
            self.audit.write("node_stopped", failed=self.failed)
        self.audit.close()

    def announce(self) -> None:
        """The audit log's first line of this node's life: who it is, where it listens, what it scores with."""
        reference, info = self.drift.reference, self.info()
        self.audit.write(
            "node_started",
            **{k: info[k] for k in ("aet", "address", "tls", "destinations", "allow")},
            model=self.pipeline.identity.name,
            model_sha256=self.pipeline.model.sha256,
            dens_version=dens.__version__,
            drift_reference=None if reference is None else round(reference.share, 4),
        )
        self._announced = True

    def _aggregate(self) -> None:
        self._dirty = False  # a failure is tried again after the next study, not in a loop
        try:
            self.pipeline.write_aggregates()
        except (OSError, ValueError) as exc:
            log.error("dens-serve: cannot rewrite the breast and exam CSVs (%s); tried again after the next study", exc)

    def _process(self, keys: list[str]) -> None:
        """Score the new instances of quiet studies together, then write and queue each study's SR."""
        studies = [(key, *self.state.snapshot(key)) for key in keys]
        todo = [i for *_, instances in studies for i in instances if i.row is None]
        for key, uid, _, instances in studies:
            self._received(key, uid, instances)
        t0 = time.perf_counter()
        try:
            new = dict(zip((i.sop_key for i in todo), self.pipeline.score([i.path for i in todo]), strict=True))
        except PipelineError as exc:  # the decode engine is gone: stop, so that a supervisor restarts the node
            log.error("dens-serve: %s", exc)
            self.failed = str(exc)
            self.stop()
            return
        except Exception as exc:  # a model failure: the studies are kept until the next start
            if _no_room(exc):  # a full disk: preds.csv was cut back to its last whole row; serve() tries again
                raise
            for key, uid, generation, _ in studies:
                self._fail(key, uid, generation, exc)
            return
        if new:
            self._dirty = True
            self.state.set_rows(new)
        scored = time.perf_counter() - t0
        for key, uid, generation, instances in studies:
            self._answer(key, uid, generation, instances, new, scored)

    def _received(self, key: str, uid: str, instances: list) -> None:
        """The audit's line for a study going to scoring: its instances and who sent them."""
        peers = self.state.read(
            "SELECT DISTINCT calling_aet, address FROM instances WHERE study_key = ? ORDER BY 1, 2 LIMIT 16", [key]
        )
        first = self.state.read("SELECT first_received FROM studies WHERE study_key = ?", [key])[0][0]
        self.audit.write(
            "study_received",
            study_uid=uid,
            instances=len(instances),
            unscored=sum(i.row is None for i in instances),
            peers=[f"{aet}@{address}" for aet, address in peers],
            first_received=utc_iso(first),
        )

    def _fail(self, key: str, uid: str, generation: int, exc: Exception) -> None:
        message = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        log.error("dens-serve: study %s failed (%s); it is retried at the next start", uid, message)
        self.metrics.studies_scored.labels("failed").inc()
        self.audit.write("study_failed", study_uid=uid, error=message)
        self.state.fail(key, generation, message)

    def _answer(self, key: str, uid: str, generation: int, instances: list, new: dict, scored: float) -> None:
        t0 = time.perf_counter()
        try:
            rows = [i.row or new[i.sop_key] for i in instances]
            report = self.pipeline.report(rows, [i.path for i in instances], self.state.sr_dir)
        except Exception as exc:  # an SR highdicom refuses
            if _no_room(exc):  # a full disk: serve() tries again
                raise
            self._fail(key, uid, generation, exc)
            return
        if not self.state.answer(key, generation, report.sr_uid, report.path, report.density, self.cfg.destinations):
            log.info("dens-serve: study %s received more instances while it was scored; scored again when quiet", uid)
            return
        self._scored(key, uid, rows, report)
        call = report.density or "not assessed (no usable image; the SR says why)"
        log.info(
            "dens-serve: study %s: %d instance(s), %s; scored in %.2f s (with the studies quiet at the time), "
            "SR %s in %.2f s",
            uid,
            len(instances),
            call,
            scored,
            report.sr_uid,
            time.perf_counter() - t0,
        )
        if self.cfg.destinations:
            self.sender.wake.set()

    def _scored(self, key: str, uid: str, rows: list, report: Report) -> None:
        """A study answered: counted, its latency observed, its call in the audit log and its unit's window."""
        first = self.state.read("SELECT first_received FROM studies WHERE study_key = ?", [key])[0][0]
        self.metrics.latency_scored.observe(max(0.0, time.time() - first))
        self.metrics.studies_scored.labels("assessed" if report.density else "not_assessed").inc()
        if report.density:
            self.metrics.exam_calls.labels(report.density).inc()
        unit = unit_of(rows)
        images = {s: sum(r.get("status") == s for r in rows) for s in ("ok", "skipped", "error")}
        self.audit.write(
            "study_scored",
            study_uid=uid,
            density=report.density or None,
            breasts=report.breasts,
            p_dense=report.p_dense,
            images=images,
            manufacturer=unit[0],
            manufacturer_model=unit[1],
            sr_uid=report.sr_uid,
            model_sha256=self.pipeline.model.sha256,
        )
        change = self.drift.add(key, unit, report.density)
        if change is not None:
            self.drifted(change)

    def drifted(self, change: Change) -> None:
        """Say that a unit's dense share left its expected range (a warning), or came back."""
        log.log(logging.WARNING if change.warning else logging.INFO, "dens-serve: %s", change.line())
        self.audit.write("drift_warning" if change.warning else "drift_cleared", **change.fields())


def _no_room(exc: BaseException) -> bool:
    """Whether ``exc`` says the state folder cannot take a write now (full, over quota, read-only): a wait, not
    a study's failure."""
    return isinstance(exc, StateWriteError) or (
        isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
    )


def recover(state: State) -> int:
    """What a crash can leave in the spool: temporaries and hidden folders (removed: files on their way in) and
    files renamed into place whose record was not committed (recorded now: a C-STORE's was not acknowledged, and
    its sender would send it again; a pulled study's folder is renamed into place whole).
    How many files were recorded."""
    known = state.known_paths()
    adopted = 0
    for entry in state.spool.iterdir():  # hidden: on its way in (a C-STORE's data, a pull's files, a study's folder)
        if entry.name.startswith("."):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink(missing_ok=True)
    for path in sorted(state.spool.glob("*/*")):
        if path.name.startswith("."):
            path.unlink(missing_ok=True)
            continue
        if str(path) in known:
            continue
        try:
            ds = dcmread(path, stop_before_pixels=True)
            study_uid, sop_uid = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
        except Exception as exc:
            log.warning("dens-serve: %s in the spool cannot be read (%s); left alone", path, exc)
            continue
        if state.spool_path(study_uid, sop_uid) == path and state.register(study_uid, sop_uid, path):
            adopted += 1
    return adopted


def run(cfg: ServeConfig, ready: Callable[[Node], None] | None = None) -> ServeResult:
    """Start a node (ServeError when it cannot), call ``ready`` with it, serve until SIGTERM or Ctrl-C (or until
    it cannot go on), and say how it ended."""
    node = start(cfg)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: node.stop())
    if ready is not None:
        ready(node)
    node.serve()
    return ServeResult(node.failed)


def start(cfg: ServeConfig) -> Node:
    """Open the state, recover, open the pipeline and listen; raises ServeError when the node cannot start."""
    try:
        model = ModelFile.read(cfg.model, "dens-serve", allow_modified=cfg.allow_modified_model)
        how = outgoing(cfg)
        status_token = cfg.status_token()
    except ValueError as exc:  # ModelError, a bad destination, an unset token variable
        raise ServeError(str(exc)) from exc
    try:
        rule = parse_flag(cfg.flag)
        state = State(Path(cfg.state).resolve())
    except StateLocked as exc:
        raise ServeError(str(exc)) from exc
    except (ValueError, OSError) as exc:
        raise ServeError(f"cannot use {cfg.state} as the state folder ({exc})") from exc
    metrics = Metrics()
    metrics.destinations(sorted({d.partition(":")[0] for d in cfg.destinations}))
    audit = AuditLog(cfg.audit_path, int(cfg.audit_max_mib * (1 << 20)), cfg.audit_keep, metrics.audit_errors.inc)
    try:
        adopted = recover(state)
        pipeline = Pipeline(
            model,
            state.preds,
            rule,
            device=cfg.device,
            batch_size=cfg.batch_size,
            workers=cfg.workers,
            threads=cfg.threads,
            metrics=metrics,
        )
    except Exception as exc:
        state.close()
        raise ServeError(str(exc)) from exc
    scored = state.adopt_rows(pipeline.existing_rows())
    retried = state.retry_failed()
    if adopted or scored or retried:
        log.info(
            "dens-serve: recovered %d spooled instance(s), %d row(s) from preds.csv, %d failed study(ies) to retry",
            adopted,
            scored,
            retried,
        )
    drift = Drift(cfg.drift_window, *Reference.of(model.metadata))
    drifted = drift.load(state)
    received = threading.Event()
    scp = StorageSCP(cfg, state, received, metrics, audit)
    sender = Sender(state, cfg.aet, cfg.retry_seconds, how, metrics=metrics, audit=audit)
    try:
        address = scp.start()
    except ssl.SSLError as exc:  # before OSError: it is one
        pipeline.close()
        state.close()
        raise ServeError(f"cannot use {cfg.tls_cert} and {cfg.tls_key} for TLS ({exc})") from exc
    except OSError as exc:
        pipeline.close()
        state.close()
        raise ServeError(f"cannot listen on {cfg.host}:{cfg.port} ({exc.strerror or exc})") from exc
    poller = Poller(cfg, state, metrics, audit, received) if cfg.pull else None
    node = Node(cfg, state, pipeline, scp, sender, address, metrics, audit, drift, poller, received=received)
    metrics.watch(state, drift, node.started)
    sender.start()
    if cfg.status_port is not None:
        try:
            node._status_server = serve_status(
                state,
                cfg.host,
                cfg.status_port,
                node.info,
                status_token,
                metrics=metrics.render,
                drift=drift.snapshot,
                pull=None if poller is None else poller.info,
            )
        except OSError as exc:
            node.close()
            raise ServeError(
                f"cannot serve the status on {cfg.host}:{cfg.status_port} ({exc.strerror or exc})"
            ) from exc
        node.status_address = node._status_server.server_address[:2]
        if cfg.status_exposed:
            log.warning(
                "dens-serve: warning: the status on %s:%d answers anyone who can reach %s: give it a token with "
                "--status-token-env NAME, or keep --host 127.0.0.1",
                *node.status_address,
                cfg.host,
            )
    node.announce()
    if drift.reference is None:
        log.info("dens-serve: drift: %s", drift.why)
    for change in drifted:
        node.drifted(change)
    if poller is not None:
        poller.start()
    return node
