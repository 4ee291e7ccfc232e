"""The node's storage SCP (pynetdicom): C-ECHO, and C-STORE of mammograms into the spool.

What it accepts, and why:

* associations from the allowed calling AE titles only (A-ASSOCIATE-RJ "calling AE title not recognised"
  otherwise), addressed to the node's own AE title; where every allowed title names an address, connections
  from any other address are closed before a byte of DICOM is read;
* presentation contexts of Digital Mammography X-Ray Image Storage, For Presentation and For Processing (the
  latter are acknowledged and get a skipped row, as dens-infer gives them), and Verification; every other
  SOP class, Breast Tomosynthesis among them, is refused at negotiation (its context rejected: "abstract
  syntax not supported"); the transfer syntaxes are those the decode engine reads;
* an instance whose header cannot be read, whose Modality is another than MG (an absent one is the SOP
  class's), or that lacks its UIDs is refused
  (a failure status with the reason in Error Comment, a line in the log and in the status' refusals);
* anything else is written to the spool (:meth:`State.receive`) before the success status goes back.
"""

from __future__ import annotations

import io
import logging
import ssl
import threading
from collections.abc import Sequence

from pydicom import dcmread
from pydicom import uid as uids
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

from dens.serve.config import Allowed, ServeConfig
from dens.serve.state import State

log = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
MAMMOGRAPHY_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.1.2",  # Digital Mammography X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.2.1",  # Digital Mammography X-Ray Image Storage - For Processing
)
# The transfer syntaxes dens.route.dicom decodes.
TRANSFER_SYNTAXES = (
    uids.ExplicitVRLittleEndian,
    uids.ImplicitVRLittleEndian,
    uids.DeflatedExplicitVRLittleEndian,
    uids.JPEG2000Lossless,
    uids.JPEG2000,
    uids.JPEGLosslessSV1,
    uids.JPEGLossless,
    uids.JPEGBaseline8Bit,
    uids.JPEGExtended12Bit,
    uids.JPEGLSLossless,
    uids.JPEGLSNearLossless,
    uids.RLELossless,
)
# C-STORE statuses (PS3.4 B.2.3, PS3.7 C): success, refused for lack of resources, refused as not authorised,
# data set does not match the SOP class, cannot understand.
SUCCESS, OUT_OF_RESOURCES, NOT_AUTHORISED, MISMATCH, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0x0124, 0xA900, 0xC000


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]  # LO
    return ds


class _Server(ThreadedAssociationServer):
    """pynetdicom's threaded server, closing connections from addresses none of the allowed titles names
    (when every one names an address) before any association is read."""

    addresses: frozenset[str] | None = None

    def verify_request(self, request, client_address) -> bool:
        if self.addresses is None or client_address[0] in self.addresses:
            return True
        log.warning("dens-serve: connection from %s closed: no allowed AE title names that address", client_address[0])
        return False


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

    def __init__(self, cfg: ServeConfig, state: State, received: threading.Event | None = None):
        self.cfg = cfg
        self.state = state
        self.received = received  # set after each instance spooled: the scheduler looks sooner
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
        self.server: _Server | None = None

    def start(self) -> tuple[str, int]:
        """Listen on the configured host and port; the address bound."""
        handlers = [(evt.EVT_C_ECHO, self._echo), (evt.EVT_C_STORE, self._store), (evt.EVT_REJECTED, self._rejected)]
        server = self.ae.make_server(
            (self.cfg.host, self.cfg.port),
            ssl_context=tls_context(self.cfg),
            evt_handlers=handlers,
            server_class=_Server,
        )
        if not self.cfg.allow_any and all(a.address for a in self.allow):
            server.addresses = frozenset(a.address for a in self.allow)
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

    def _rejected(self, event) -> None:
        aet, address = self._caller(event)
        log.warning(
            "dens-serve: association from %r at %s rejected (not on the allow-list, or not called %s)",
            aet,
            address,
            self.cfg.aet,
        )

    def _echo(self, event) -> int:
        return SUCCESS if self._admitted(event) else NOT_AUTHORISED

    def _store(self, event) -> int | Dataset:
        aet, address = self._caller(event)
        claimed = str(event.request.AffectedSOPInstanceUID or "")
        if not self._admitted(event):
            return self._refuse(aet, address, claimed, NOT_AUTHORISED, f"{aet!r} is not allowed from {address}")
        try:
            data = event.encoded_dataset(include_meta=True)
            ds = dcmread(io.BytesIO(data), stop_before_pixels=True)
            modality = str(ds.get("Modality", ""))
            study_uid, sop_uid = str(ds.get("StudyInstanceUID", "")), str(ds.get("SOPInstanceUID", ""))
            sop_class = str(ds.get("SOPClassUID", ""))
        except Exception as exc:  # a header pydicom cannot parse: the node refuses it and carries on
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return self._refuse(aet, address, claimed, CANNOT_UNDERSTAND, f"unreadable header: {first}")
        # An absent Modality is taken from the SOP class (anonymised archives, RSNA's among them, drop it).
        if modality and modality != "MG":
            return self._refuse(aet, address, sop_uid, MISMATCH, f"not_mammography: Modality {modality}, not MG")
        if sop_class != event.context.abstract_syntax:
            return self._refuse(aet, address, sop_uid, MISMATCH, f"SOP Class {sop_class} is not the context's")
        if not study_uid or not sop_uid:
            return self._refuse(aet, address, sop_uid, MISMATCH, "no StudyInstanceUID or SOPInstanceUID")
        try:
            added = self.state.receive(study_uid, sop_uid, data, aet, address)
        except OSError as exc:  # a full or unwritable spool: the sender keeps the instance and retries
            log.error("dens-serve: cannot spool an instance from %s (%s)", aet, exc)
            return _status(OUT_OF_RESOURCES, f"cannot store: {exc.strerror or exc}")
        if not added:
            log.info("dens-serve: instance from %s already received; acknowledged again", aet)
        if self.received is not None:
            self.received.set()
        return SUCCESS

    def _refuse(self, aet: str, address: str, sop_uid: str, code: int, reason: str) -> Dataset:
        log.warning("dens-serve: refused an instance from %r at %s: %s", aet, address, reason)
        self.state.refuse(aet, address, sop_uid, reason)
        return _status(code, reason)
