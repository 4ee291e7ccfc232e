"""The outbox: each SR goes to each destination, a DICOM AE by C-STORE or a DICOMweb server by STOW-RS,
and a send that fails is tried again after a delay that doubles each time (up to ten minutes), for as long as
the node runs and again after a restart: an SR is never dropped.

A destination's acknowledgement (a C-STORE success or warning status; an HTTP 200, or a 202 that lists no
failure) marks the entry sent. The SR's instance UID is fixed by its study and sources (:mod:`dens.sr`), so
the one resend a crash between that acknowledgement and its record can cause stores nothing new.

How the sender reaches its destinations (:class:`Outgoing`, from :func:`outgoing`): with ``--send-tls-ca``
every C-STORE goes over TLS, the destination's certificate checked against that CA and its host name or
address; STOW-RS to https:// URLs checks the server's certificate against the system's CAs or ``--stow-ca``,
and sends the ``Authorization`` header the options name (read from the environment, kept out of every log
line, error message and status). A URL is logged and recorded with its userinfo redacted (:func:`redact`).

A send whose outcome the state cannot record (a full disk) is tried again later: a destination may get the
same SR twice, which stores nothing new.

Each attempt is counted in the node's metrics (by destination kind and outcome, retries apart, and the time
from the study's first instance to its delivery) and written to the audit log (``sr_sent``, ``sr_failed``).
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from dens.serve.audit import AuditLog
from dens.serve.config import MAX_RETRY_SECONDS, Destination, ServeConfig, redact
from dens.serve.metrics import SEND_KINDS, Metrics
from dens.serve.state import Send, State, StateWriteError

log = logging.getLogger(__name__)

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
# C-STORE statuses that mean stored: success, and the warnings (coercion, elements discarded, mismatch).
_STORED = {0x0000, 0xB000, 0xB006, 0xB007}
_TIMEOUT = 30.0  # seconds for a connection, an association or a response
_STATE_RETRY = 5.0  # seconds before the sender looks at the outbox again after the state could not be written


class SendError(Exception):
    """A destination did not take the SR; the message says what it answered."""


@dataclass(frozen=True)
class Outgoing:
    """How the sender reaches destinations: the TLS context of every C-STORE (None: plain DICOM), the one of
    https:// STOW-RS URLs (None: the system's CAs) and the STOW-RS ``Authorization`` header (None: none)."""

    dicom_tls: ssl.SSLContext | None = None
    stow_tls: ssl.SSLContext | None = None
    stow_authorization: str | None = field(default=None, repr=False)


def outgoing(cfg: ServeConfig) -> Outgoing:
    """:class:`Outgoing` for ``cfg``; raises ValueError, naming the option and file or variable, when a
    certificate, key or CA file cannot be used or a secret's environment variable is unset."""
    dicom_tls = stow_tls = None
    if cfg.send_tls_ca is not None:
        files = " and ".join(str(f) for f in (cfg.send_tls_ca, cfg.send_tls_cert, cfg.send_tls_key) if f)
        try:
            dicom_tls = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cfg.send_tls_ca))
            dicom_tls.minimum_version = ssl.TLSVersion.TLSv1_2
            if cfg.send_tls_cert is not None:
                dicom_tls.load_cert_chain(str(cfg.send_tls_cert), str(cfg.send_tls_key))
        except (ssl.SSLError, OSError) as exc:  # SSLError first: it is an OSError
            raise ValueError(f"cannot use {files} for TLS to --send-to destinations ({exc})") from exc
    if cfg.stow_ca is not None:
        try:
            stow_tls = ssl.create_default_context(cafile=str(cfg.stow_ca))
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"--stow-ca {cfg.stow_ca}: cannot use it as CA certificates ({exc})") from exc
    return Outgoing(dicom_tls, stow_tls, cfg.stow_authorization())


def send_dicom(path: Path, destination: Destination, calling_aet: str, tls: ssl.SSLContext | None = None) -> None:
    """C-STORE the file ``path`` to ``destination``, over TLS with ``tls`` (raises SendError unless it is
    stored)."""
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = _TIMEOUT
    ae.connection_timeout = _TIMEOUT
    ae.add_requested_context(COMPREHENSIVE_3D_SR, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    tls_args = (tls, destination.host) if tls is not None else None
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.aet, tls_args=tls_args)
    if not assoc.is_established:
        what = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
        if tls is None:
            raise SendError(f"association with {destination} {what}")
        why = "" if assoc.is_rejected else _tls_failure(destination, tls)
        raise SendError(f"association with {destination} over TLS {what}{why}")
    try:
        status = assoc.send_c_store(dcmread(path))
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    if code not in _STORED:
        comment = getattr(status, "ErrorComment", "") if status else ""
        shown = "no response" if code is None else f"status 0x{code:04X}"
        raise SendError(f"{destination} answered {shown}{f' ({comment})' if comment else ''}")


def _tls_failure(destination: Destination, tls: ssl.SSLContext) -> str:
    """Why a TLS association failed, from a handshake of its own (pynetdicom only logs it): ``": reason"``, or
    "" when the handshake succeeds now."""
    try:
        with (
            socket.create_connection((destination.host, destination.port), timeout=_TIMEOUT) as raw,
            tls.wrap_socket(raw, server_hostname=destination.host),
        ):
            return ""
    except ssl.SSLCertVerificationError as exc:
        return f": its certificate does not verify against --send-tls-ca ({exc.verify_message})"
    except ssl.SSLError as exc:
        return f": TLS handshake failed ({exc.reason or exc})"
    except OSError as exc:
        return f": {exc.strerror or exc}"


def send_stow(path: Path, url: str, tls: ssl.SSLContext | None = None, authorization: str | None = None) -> None:
    """STOW-RS: POST the file ``path`` to ``url`` as multipart/related, an https:// server checked with ``tls``
    (None: the system's CAs), with the ``Authorization`` header ``authorization`` (raises SendError unless
    stored)."""
    boundary = uuid.uuid4().hex
    body = b"".join(
        [
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(),
            path.read_bytes(),
            f"\r\n--{boundary}--\r\n".encode(),
        ]
    )
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        },
    )
    if authorization is not None:  # not carried to where a redirect points
        request.add_unredirected_header("Authorization", authorization)
    shown = redact(url)
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT, context=tls) as response:
            code, answer = response.status, response.read()
    except urllib.error.HTTPError as exc:
        raise SendError(f"{shown} answered HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:  # ValueError: a URL urllib cannot parse
        raise SendError(redact(f"{shown}: {getattr(exc, 'reason', exc)}")) from exc
    if code == 202 and _failed_sop(answer):  # accepted in part: the SR is among the failures
        raise SendError(f"{shown} answered HTTP 202 listing the SR as failed")
    if code not in (200, 202):
        raise SendError(f"{shown} answered HTTP {code}")


def _failed_sop(answer: bytes) -> bool:
    try:
        return bool(json.loads(answer or b"{}").get("00081198", {}).get("Value"))
    except (ValueError, AttributeError):
        return False


def deliver(send: Send, calling_aet: str, how: Outgoing = Outgoing()) -> None:
    """Send one outbox entry to its destination (``dicom:AET@HOST:PORT`` or ``stow:URL``)."""
    kind, _, where = send.destination.partition(":")
    if kind == "dicom":
        send_dicom(send.sr_path, Destination.parse(where), calling_aet, how.dicom_tls)
    elif kind == "stow":
        send_stow(send.sr_path, where, how.stow_tls, how.stow_authorization)
    else:
        raise SendError(f"unknown destination {redact(send.destination)!r}")


def backoff(attempts: int, first: float) -> float:
    """Seconds before the next try after ``attempts`` failed ones: ``first``, then doubling, at most ten
    minutes."""
    return min(MAX_RETRY_SECONDS, first * 2 ** max(0, attempts - 1))


class Sender:
    """A thread that empties the outbox: due entries are sent; failures wait their backoff."""

    def __init__(
        self,
        state: State,
        calling_aet: str,
        first_retry: float,
        how: Outgoing = Outgoing(),
        *,
        metrics: Metrics | None = None,
        audit: AuditLog | None = None,
    ):
        self.state = state
        self.calling_aet = calling_aet
        self.how = how
        self.first_retry = first_retry
        self.metrics = metrics or Metrics()
        self.audit = audit or AuditLog(None)
        self.wake = threading.Event()  # set when new entries are queued
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dens-serve-sender", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.wake.set()
        self._thread.join(timeout=2 * _TIMEOUT)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for send in self.state.due():
                    if self._stop.is_set():
                        return
                    self._try(send)
            except StateWriteError as exc:  # the entry stays pending: tried again once the state can be written
                log.error("dens-serve: the outbox cannot be updated (%s); tried again in %.0f s", exc, _STATE_RETRY)
                self._stop.wait(_STATE_RETRY)
                continue
            wait = self.state.next_send_in()
            self.wake.wait(timeout=1.0 if wait is None else min(max(wait, 0.05), 1.0))
            self.wake.clear()

    def _try(self, send: Send) -> None:
        kind = send.destination.partition(":")[0]
        kind = kind if kind in SEND_KINDS else "other"
        if send.attempts:
            self.metrics.retries.labels(kind).inc()
        found = self.state.read("SELECT study_uid, first_received FROM studies WHERE study_key = ?", [send.study_key])
        study_uid, first = found[0] if found else (None, None)
        where = {"study_uid": study_uid, "sr_uid": send.sr_uid, "destination": redact(send.destination), "kind": kind}
        try:
            deliver(send, self.calling_aet, self.how)
        except Exception as exc:  # SendError, an unreadable SR file, a pynetdicom failure: retried later
            delay = backoff(send.attempts + 1, self.first_retry)
            error = redact(str(exc))
            log.warning(
                "dens-serve: sending SR %s to %s failed (attempt %d: %s); next try in %.0f s",
                send.sr_uid,
                redact(send.destination),
                send.attempts + 1,
                error,
                delay,
            )
            self.metrics.sends.labels(kind, "failed").inc()
            self.audit.write(
                "sr_failed", **where, outcome="retry", attempt=send.attempts + 1, error=error, retry_in=delay
            )
            self.state.retry_later(send.id, error, delay)
            return
        self.metrics.sends.labels(kind, "sent").inc()
        if first is not None:
            self.metrics.latency_sent.labels(kind).observe(max(0.0, time.time() - first))
        self.audit.write("sr_sent", **where, outcome="sent", attempt=send.attempts + 1)
        self.state.sent(send.id)
        log.info("dens-serve: sent SR %s to %s", send.sr_uid, redact(send.destination))
