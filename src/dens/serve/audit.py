"""The node's audit log: one JSON object a line for each thing a hospital's IT or its auditors ask about later
(who connected, who was refused and why, which study came from whom, what the model called it, where its SR
went), appended to ``--audit-log`` (default ``STATE/audit.jsonl``) and flushed per line.

Every line has ``time`` (UTC, ISO 8601 with milliseconds: ``2026-01-01T10:10:10.123Z``) and ``event``; the
other fields depend on the event:

=====================  ==========================================================================================
event                  fields
=====================  ==========================================================================================
node_started           ``aet``, ``address`` (host:port), ``tls``, ``model`` (name), ``model_sha256``,
                       ``destinations`` (credentials redacted), ``allow`` (the allow-list, or ``any``),
                       ``drift_reference`` (the test split's dense share the drift check uses, or null)
node_stopped           ``failed`` (why it could not go on; null when it was asked to stop)
association_accepted   ``peer`` (address), ``calling_aet``, ``called_aet``
association_refused    ``peer``, ``calling_aet``, ``called_aet``, ``code``, ``reason`` (``code: detail``), ``more``
connection_refused     ``peer``, ``calling_aet`` (null: no AE title is known before DICOM), ``code``, ``reason``,
                       ``more``
echo_refused           ``peer``, ``calling_aet``, ``code``, ``reason``, ``more``
instance_refused       ``peer``, ``calling_aet``, ``sop_uid``, ``code``, ``reason``, ``more``
study_received         ``study_uid``, ``instances`` (spooled), ``unscored`` (of them, new since its last
                       answer), ``peers`` (``AET@address`` of each sender), ``first_received``
study_scored           ``study_uid``, ``density`` (the exam's call; null: not assessed), ``breasts``
                       (``{"L": call, "R": call}``), ``p_dense``, ``images`` (ok, skipped, error),
                       ``manufacturer``, ``manufacturer_model``, ``sr_uid``, ``model_sha256``
study_failed           ``study_uid``, ``error`` (the study is kept and scored again at the next start)
sr_sent                ``study_uid``, ``sr_uid``, ``destination`` (credentials redacted), ``kind`` (dicom,
                       stow), ``outcome`` (sent), ``attempt`` (1 for the first try)
sr_failed              as sr_sent with ``outcome`` retry, ``error`` and ``retry_in`` (seconds)
drift_warning          ``manufacturer``, ``manufacturer_model``, ``exams``, ``dense_share``, ``expected`` ([low,
                       high]), ``reference`` (the test split's dense share)
drift_cleared          as drift_warning: the window's dense share is back within the expected range
pull_poll              ``source`` (``--pull``, credentials redacted), ``started``, ``seconds``, ``outcome`` (ok,
                       failed), ``error`` (why it failed; tried again at the next poll), ``studies`` (found,
                       answered, waiting, pulled, held), ``instances`` (fetched, failed, not_mammography)
pull_study_failed      ``study_uid``, ``instances_failed`` (null: its instances could not be listed), ``reason``
                       (the first), ``held`` (true: the study waits for the next poll; false: scored without them)
=====================  ==========================================================================================

``more`` is how many refusals like it (same peer address and code) were not written in the second before: a
refused peer's lines are limited as the state's refusal records are (:mod:`dens.serve.scp`), so a flood of
connections cannot fill the disk through the audit log. No line holds pixel data, a password or a token: the
fields are the ones named here, URLs lose their userinfo (:func:`dens.serve.config.redact`) and a text field is
cut at :data:`MAX_TEXT` characters.

The file is rotated by size: before a line would take it past ``max_bytes``, ``audit.jsonl`` becomes
``audit.jsonl.1`` (``.1`` becomes ``.2``, ...) and the oldest beyond ``keep`` goes. A write that fails (a full
disk, a folder that cannot be written) never stops the node: it is counted (``on_error``), logged once until a
write succeeds again, and the next event tries again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from dens.serve.config import DEFAULT_AUDIT_KEEP, DEFAULT_AUDIT_MAX_MIB, redact

log = logging.getLogger(__name__)

MAX_TEXT = 512  # characters of one text field (a reason, a UID a sender chose)


def utc_iso(t: float) -> str:
    """``t`` (seconds since the epoch) as UTC ISO 8601 with milliseconds and a Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def _clean(value):
    if isinstance(value, str):
        return redact(value)[:MAX_TEXT]
    if isinstance(value, dict):
        return {str(k)[:MAX_TEXT]: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return _clean(str(value))


class AuditLog:
    """Appends audit events to ``path`` (None: writes nothing), rotated at ``max_bytes`` keeping ``keep`` old
    files. Safe to call from every thread of the node; :meth:`write` never raises."""

    def __init__(
        self,
        path: Path | None,
        max_bytes: int = int(DEFAULT_AUDIT_MAX_MIB * (1 << 20)),
        keep: int = DEFAULT_AUDIT_KEEP,
        on_error: Callable[[], None] | None = None,
    ):
        self.path = None if path is None else Path(path)
        self.max_bytes, self.keep = max_bytes, keep
        self._on_error = on_error
        self._fd: int | None = None
        self._failing = False
        self._lock = threading.Lock()

    def write(self, event: str, **fields) -> None:
        """Append one line: ``time``, ``event`` and ``fields`` (cleaned: see the module's docstring)."""
        if self.path is None:
            return
        line = json.dumps({"time": utc_iso(time.time()), "event": event, **_clean(fields)}, ensure_ascii=True)
        data = (line + "\n").encode("ascii")
        with self._lock:
            try:
                self._append(data)
            except OSError as exc:
                self._failed(exc)
                return
            if self._failing:
                self._failing = False
                log.info("dens-serve: the audit log %s can be written again", self.path)

    def _append(self, data: bytes) -> None:
        if self._fd is None:
            self._open()
        info = os.fstat(self._fd)
        if info.st_size and info.st_size + len(data) > self.max_bytes and stat.S_ISREG(info.st_mode):
            self._rotate()  # a FIFO or /dev/full is written to, never renamed
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Read and write: a line a full disk cut short is ended before the next one starts.
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)  # it names studies and peers
        size = os.fstat(self._fd).st_size
        if size and os.pread(self._fd, 1, size - 1) != b"\n":
            os.write(self._fd, b"\n")

    def _rotate(self) -> None:
        self._close()
        self.path.with_name(f"{self.path.name}.{self.keep}").unlink(missing_ok=True)
        for i in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._open()

    def _failed(self, exc: OSError) -> None:
        self._close()  # the next event opens the file again (the disk may have room by then)
        if self._on_error is not None:
            self._on_error()
        if not self._failing:
            self._failing = True
            log.error(
                "dens-serve: cannot write the audit log %s (%s); the node goes on, and audit events are lost until it "
                "can be written (dens_serve_audit_write_errors_total counts them)",
                self.path,
                exc.strerror or exc,
            )

    def _close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):  # an I/O error on close: the next event opens it again
                os.close(fd)

    def close(self) -> None:
        with self._lock:
            self._close()
