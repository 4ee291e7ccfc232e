"""The node's storage SCP (pynetdicom): C-ECHO, and C-STORE of mammograms into the spool.

What it accepts, and why:

* associations from the allowed calling AE titles only (A-ASSOCIATE-RJ "calling AE title not recognised"
  otherwise), addressed to the node's own AE title ("called AE title not recognised" otherwise); where every
  allowed title names an address, connections from any other address are closed before a byte of DICOM is
  read, and where some do, such a title's requests from another address are refused (not authorised);
* presentation contexts of Digital Mammography X-Ray Image Storage, For Presentation and For Processing (the
  latter are acknowledged and get a skipped row, as dens-infer gives them), and Verification; every other
  SOP class, Breast Tomosynthesis among them, is refused at negotiation (its context rejected: "abstract
  syntax not supported"); the transfer syntaxes are those the decode engine reads;
* an instance whose header cannot be read, whose Modality is another than MG (an absent one is the SOP
  class's), or that lacks its UIDs is refused
  (a failure status with the reason in Error Comment, a line in the log and in the status' refusals);
* an instance whose data set is larger than ``--max-instance-mib`` is refused (0xA700, out of resources); each
  data set goes to a file in the spool as it arrives (:mod:`dens.serve.incoming`), never to memory;
* anything else is renamed into the spool, and recorded, before the success status goes back.

Before any of this, :mod:`dens.serve.transport` bounds what a connection may cost: the TLS handshake and the
A-ASSOCIATE-RQ within a deadline, each PDU's size, and the connections one peer address may hold.

Each refusal is counted in the node's metrics, and is a line in the log, a row in the state (the status counts
them by reason) and a line in the audit log, at most :data:`DROPPED_PER_S` a second per address and reason
code (the next saying how many more there were), so that a flood of refusals costs the disk no more than that;
its reason ``code: detail``: ``calling_aet_not_allowed``, ``called_aet_wrong`` (or ``calling_and_called_aet_wrong``),
``address_not_allowed``, ``too_many_associations`` for associations; ``address_not_allowed``,
``too_many_connections``, ``tls_failed``, ``idle``, ``slow`` and ``pdu_too_large`` for connections;
``unreadable_header``, ``not_mammography``, ``sop_class_mismatch``, ``missing_uid``, ``invalid_uid`` and
``instance_too_large`` for instances.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Sequence

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, evt

from dens.pull.sopclasses import MAMMOGRAPHY_SOP_CLASSES as MAMMOGRAPHY_SOP_CLASSES  # what the node accepts
from dens.pull.sopclasses import TRANSFER_SYNTAXES as TRANSFER_SYNTAXES
from dens.pull.sopclasses import VERIFICATION as VERIFICATION
from dens.serve.audit import AuditLog
from dens.serve.config import Allowed, ServeConfig
from dens.serve.incoming import INCOMING, InstanceFile, SpoolingDIMSE
from dens.serve.metrics import Metrics
from dens.serve.state import State
from dens.serve.transport import Server
from dens.sr import valid_uid

log = logging.getLogger(__name__)

# C-STORE statuses (PS3.4 B.2.3, PS3.7 C): success, refused for lack of resources, refused as not authorised,
# data set does not match the SOP class, cannot understand.
SUCCESS, OUT_OF_RESOURCES, NOT_AUTHORISED, MISMATCH, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0x0124, 0xA900, 0xC000
DROPPED_PER_S = 8  # refusals (and accepted associations that are not admitted) written a second per address and code
_WHAT = {"a connection": "connection", "an association": "association", "a C-ECHO": "echo", "an instance": "instance"}


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]  # LO
    return ds


def tls_context(cfg: ServeConfig) -> ssl.SSLContext | None:
    """The server's TLS context when ``cfg`` names a certificate (and, with a CA, asks callers for theirs)."""
    if cfg.tls_cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key))
    if cfg.tls_ca is not None:
        context.load_verify_locations(str(cfg.tls_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class StorageSCP:
    """The listening AE; :meth:`start` binds it, :meth:`stop` stops it (associations in flight end first)."""

    def __init__(
        self,
        cfg: ServeConfig,
        state: State,
        received: threading.Event | None = None,
        metrics: Metrics | None = None,
        audit: AuditLog | None = None,
    ):
        self.cfg = cfg
        self.state = state
        self.received = received  # set after each instance spooled: the scheduler looks sooner
        self.metrics = metrics or Metrics()
        self.audit = audit or AuditLog(None)
        self.allow: Sequence[Allowed] = cfg.allow
        ae = AE(ae_title=cfg.aet)
        ae.require_called_aet = True
        if not cfg.allow_any:
            ae.require_calling_aet = sorted({a.aet for a in cfg.allow})
        ae.add_supported_context(VERIFICATION)
        for sop_class in MAMMOGRAPHY_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        ae.maximum_associations = 16
        self.ae = ae
        self.server: Server | None = None
        # Refusals by (address, reason code): [this second's start, written in it, not written]
        self._unrecorded: dict[tuple[str, str], list] = {}
        self._unrecorded_lock = threading.Lock()

    def start(self) -> tuple[str, int]:
        """Listen on the configured host and port; the address bound."""
        handlers = [
            (evt.EVT_ACCEPTED, self._accepted),
            (evt.EVT_C_ECHO, self._echo),
            (evt.EVT_C_STORE, self._store),
            (evt.EVT_REJECTED, self._rejected),
            (evt.EVT_CONN_CLOSE, self._closed),
        ]
        server = self.ae.make_server(
            (self.cfg.host, self.cfg.port),
            ssl_context=tls_context(self.cfg),
            evt_handlers=handlers,
            server_class=Server,
        )
        if not self.cfg.allow_any and all(a.address for a in self.allow):
            server.addresses = frozenset(a.address for a in self.allow)
        server.max_peer_connections = self.cfg.max_peer_connections
        server.dropped = self._dropped
        server.prepare = self._prepare
        thread = threading.Thread(target=server.serve_forever, name="dens-serve-scp", daemon=True)
        thread.start()
        # As AE.start_server does: the server's shutdown() removes itself from this list.
        self.ae._servers.append(server)
        self.server = server
        return server.server_address[:2]

    def stop(self) -> None:
        """Stop accepting associations (those in flight finish on their own threads)."""
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def _caller(self, event) -> tuple[str, str]:
        requestor = event.assoc.requestor
        return requestor.ae_title.strip(), str(requestor.address)

    def _admitted(self, event) -> bool:
        aet, address = self._caller(event)
        return self.cfg.allow_any or any(a.admits(aet, address) for a in self.allow)

    def _not_admitted(self, aet: str, address: str) -> str:
        """Why an allowed title's request from ``address`` is refused: the addresses it is allowed from."""
        allowed = sorted(a.address for a in self.allow if a.aet.strip() == aet and a.address)
        return f"address_not_allowed: {aet!r} is allowed from {', '.join(allowed)} only, not from {address}"

    def _dropped(self, address: str, reason: str) -> None:
        """A connection closed for ``reason`` (by :mod:`dens.serve.transport`)."""
        self._record("a connection", "", address, reason)

    def _limited(self, address: str, code: str) -> int | None:
        """Whether a record of ``code`` from ``address`` may be written now: None when :data:`DROPPED_PER_S` were
        this second (a flood costs no more than that in log lines, database rows and audit lines), else how many
        were not written before it."""
        now = time.monotonic()
        with self._unrecorded_lock:
            window = self._unrecorded.setdefault((address, code), [now, 0, 0])
            if now - window[0] >= 1:
                window[:2] = [now, 0]
            if window[1] >= DROPPED_PER_S:
                window[2] += 1
                return None
            window[1] += 1
            more, window[2] = window[2], 0
            if len(self._unrecorded) > 4096:  # addresses long gone
                self._unrecorded = {k: v for k, v in self._unrecorded.items() if now - v[0] < 1}
        return more

    def _accepted(self, event) -> None:
        """An association accepted: its peer and AE titles in the audit log (one whose title is allowed from
        other addresses only is limited as a refusal is: its messages will be refused)."""
        aet, address = self._caller(event)
        more = 0 if self._admitted(event) else self._limited(address, "accepted_not_admitted")
        if more is not None:
            called = str(event.assoc.requestor.primitive.called_ae_title).strip()
            self.audit.write("association_accepted", peer=address, calling_aet=aet, called_aet=called, more=more)

    def _prepare(self, assoc) -> None:
        """Each association's C-STORE data sets go to files in the spool as they arrive (never to memory)."""
        assoc.dimse = SpoolingDIMSE(assoc, self.state.spool / INCOMING, self.cfg.max_instance_mib << 20)

    def _closed(self, event) -> None:
        """A connection closed mid-instance: its file goes."""
        if isinstance(event.assoc.dimse, SpoolingDIMSE):
            event.assoc.dimse.discard()

    def _rejected(self, event) -> None:
        """An association pynetdicom rejected: why, from what it was asked (the calling and called titles)."""
        request = event.assoc.requestor.primitive
        aet, address = self._caller(event)
        called = str(request.called_ae_title).strip()
        sent = event.assoc.acceptor.primitive
        if sent is not None and sent.result_source == 0x03:  # local limit exceeded, whoever asked
            self._record("an association", aet, address, self._too_many(), called=called)
            return
        calling_ok = self.cfg.allow_any or any(a.aet.strip() == aet for a in self.allow)
        called_ok = called == self.cfg.aet.strip()
        not_allowed = f"{aet!r} is not an allowed calling AE title"
        wrong_called = f"called {called!r}, this node is {self.cfg.aet!r}"
        if not calling_ok and not called_ok:
            reason = f"calling_and_called_aet_wrong: {not_allowed}, and it {wrong_called}"
        elif not calling_ok:
            reason = f"calling_aet_not_allowed: {not_allowed}"
        elif not called_ok:
            reason = f"called_aet_wrong: {wrong_called}"
        else:
            reason = self._too_many()
        self._record("an association", aet, address, reason, called=called)

    def _too_many(self) -> str:
        return f"too_many_associations: {self.ae.maximum_associations} already open"

    def _echo(self, event) -> int:
        if self._admitted(event):
            return SUCCESS
        aet, address = self._caller(event)
        self._record("a C-ECHO", aet, address, self._not_admitted(aet, address))
        return NOT_AUTHORISED

    def _store(self, event) -> int | Dataset:
        incoming: InstanceFile = event.request.DataSet
        try:
            return self._receive(event, incoming)
        finally:
            incoming.discard()  # what was not renamed into the spool

    def _receive(self, event, incoming: InstanceFile) -> int | Dataset:
        aet, address = self._caller(event)
        claimed = str(event.request.AffectedSOPInstanceUID or "")
        if not self._admitted(event):
            return self._refuse(aet, address, claimed, NOT_AUTHORISED, self._not_admitted(aet, address))
        if incoming.over:
            size = f"{incoming.size / (1 << 20):.1f} MiB"
            reason = f"instance_too_large: {size}, over --max-instance-mib {self.cfg.max_instance_mib}"
            return self._refuse(aet, address, claimed, OUT_OF_RESOURCES, reason)
        try:
            path = incoming.finish() if incoming.error is None else None
        except OSError as exc:
            incoming.error = exc
        if incoming.error is not None:  # a full or unwritable spool: the sender keeps the instance and retries
            exc = incoming.error
            log.error("dens-serve: cannot spool an instance from %s (%s)", aet, exc)
            return _status(OUT_OF_RESOURCES, f"cannot store: {exc.strerror or exc}")
        try:  # large values stay on the disk: only the header's small elements are read
            ds = dcmread(path, stop_before_pixels=True, defer_size="1 MB")
            modality = str(ds.get("Modality", ""))
            study_uid, sop_uid = str(ds.get("StudyInstanceUID", "")), str(ds.get("SOPInstanceUID", ""))
            sop_class = str(ds.get("SOPClassUID", ""))
        except Exception as exc:  # a header pydicom cannot parse: the node refuses it and carries on
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return self._refuse(aet, address, claimed, CANNOT_UNDERSTAND, f"unreadable_header: {first}")
        # An absent Modality is taken from the SOP class (anonymised archives, RSNA's among them, drop it).
        if modality and modality != "MG":
            return self._refuse(aet, address, sop_uid, MISMATCH, f"not_mammography: Modality {modality}, not MG")
        if sop_class != event.context.abstract_syntax:
            return self._refuse(
                aet, address, sop_uid, MISMATCH, f"sop_class_mismatch: {sop_class} is not the context's"
            )
        if not study_uid or not sop_uid:
            return self._refuse(aet, address, sop_uid, MISMATCH, "missing_uid: no StudyInstanceUID or SOPInstanceUID")
        if not valid_uid(study_uid):  # its SR could name no study: refused now, not failed at every start
            return self._refuse(
                aet,
                address,
                sop_uid,
                MISMATCH,
                f"invalid_uid: the StudyInstanceUID is no valid UID ({study_uid[:80]!r}: digits and dots, no leading "
                "zero, at most 64 characters); no SR could name its study: fix it at the source and send it again",
            )
        try:
            added = self.state.receive_file(study_uid, sop_uid, path, aet, address)
        except OSError as exc:  # a full or unwritable spool: the sender keeps the instance and retries
            log.error("dens-serve: cannot spool an instance from %s (%s)", aet, exc)
            return _status(OUT_OF_RESOURCES, f"cannot store: {exc.strerror or exc}")
        if not added:
            self.metrics.instances_duplicate.inc()
            log.info("dens-serve: instance from %s already received; acknowledged again", aet)
        else:
            self.metrics.instances_received.inc()
        if self.received is not None:
            self.received.set()
        return SUCCESS

    def _refuse(self, aet: str, address: str, sop_uid: str, code: int, reason: str) -> Dataset:
        self._record("an instance", aet, address, reason, sop_uid)
        return _status(code, reason)

    def _record(
        self, what: str, aet: str, address: str, reason: str, sop_uid: str | None = None, called: str | None = None
    ) -> None:
        """A refusal: counted, then written (log, state, audit) as :meth:`_limited` allows."""
        self.metrics.refusal(_WHAT.get(what, what), reason)
        code = reason.partition(":")[0]
        more = self._limited(address, code)
        if more is None:
            return
        if more:
            reason += f" (and {more} more like it before)"
        log.warning("dens-serve: refused %s from %s: %s", what, f"{aet!r} at {address}" if aet else address, reason)
        self.state.refuse(aet or None, address, reason, sop_uid)
        fields = {"peer": address, "calling_aet": aet or None, "called_aet": called, "sop_uid": sop_uid}
        event = f"{_WHAT.get(what, 'association')}_refused"
        shown = {k: v for k, v in fields.items() if v is not None or k == "calling_aet"}
        self.audit.write(event, **shown, code=code, reason=reason, more=more)
