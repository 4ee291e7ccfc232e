"""Pulling over DIMSE with pynetdicom (Study Root): C-FIND finds the studies (STUDY level, the query's
matching keys) and lists each one's instances (IMAGE level for the whole study, one request; where a PACS
answers only hierarchical queries, SERIES then IMAGE level); C-MOVE or C-GET retrieves them.

* C-MOVE: the PACS opens an association of its own to dens's storage SCP, which runs while the pull does, on
  ``--move-port`` under dens's AE title (the move destination: the PACS must know that title with this
  machine's address and the port). One request moves a study whose every instance is wanted, else each
  series (or its wanted instances).
* C-GET: the instances come back on the request's own association (dens proposes each mammography storage
  class in each transfer syntax, with the SCP role), so the PACS needs no entry for dens.

Either way a C-STORE is taken only for an instance the retrieve waits for, only once, and only when its header
is the instance listed (:func:`dens.pull.folder.verify`); anything else is refused with a failure status. An
instance that never arrives is accounted for with the retrieve's status once the retrieve ends.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
from collections.abc import Iterator

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dens.pull.folder import PullFolder, Refused
from dens.pull.query import Query, is_uid
from dens.pull.sopclasses import MAMMOGRAPHY_SOP_CLASSES, TRANSFER_SYNTAXES, VERIFICATION
from dens.pull.source import Access, Dimse
from dens.pull.study import PULL_FAILED, Instance, Pulled, PullError, Study

log = logging.getLogger(__name__)

FIND = StudyRootQueryRetrieveInformationModelFind
MOVE = StudyRootQueryRetrieveInformationModelMove
GET = StudyRootQueryRetrieveInformationModelGet
_PENDING = (0xFF00, 0xFF01)
# C-STORE statuses dens answers: stored; refused (not authorised: nothing asked for it); the data set is not
# the instance listed; it could not be kept.
_STORED, _UNASKED, _MISMATCH, _NOT_KEPT = 0x0000, 0x0124, 0xA900, 0xA700
_END = object()


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]  # LO
    return ds


def _text(ds: Dataset | None, keyword: str) -> str:
    value = ds.get(keyword, "") if ds is not None else ""
    return str(value or "")


def _said(status: Dataset | None) -> str:
    """A final or failed response's status as a reason reads it."""
    if status is None or "Status" not in status:
        return "no response (the association was aborted or timed out)"
    comment = _text(status, "ErrorComment")
    failed = status.get("NumberOfFailedSubOperations")
    failures = f", {failed} failed sub-operation(s)" if failed else ""
    return f"status 0x{int(status.Status):04X}{failures}{f' ({comment})' if comment else ''}"


class Landing:
    """The instances one retrieve waits for, and what became of each as it landed (the storage handlers run on
    pynetdicom's threads; :meth:`results` reads them on the pull's)."""

    def __init__(self, folder: PullFolder, wanted: list[Instance]):
        self.folder = folder
        self.waiting = {instance.sop_uid: instance for instance in wanted}
        self.landed: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.unasked = 0

    def store(self, event) -> Dataset | int:
        """A C-STORE: kept when it is an instance waited for and its header says so; refused otherwise."""
        sop_uid = str(event.request.AffectedSOPInstanceUID or "")
        with self.lock:
            instance = self.waiting.pop(sop_uid, None)
            if instance is None:
                self.unasked += 1
        if instance is None:
            log.warning("dens pull: refused an instance nothing asked for (SOP Instance UID %r)", sop_uid[:80])
            return _status(_UNASKED, "not asked for")
        path = self.folder.path(instance)
        try:
            path, size = self.folder.keep(instance, event.dataset, lambda f: f.write(event.encoded_dataset()))
        except Refused as exc:
            self.landed.put(Pulled(instance, path, f"{PULL_FAILED}: refused: {exc}"))
            return _status(_MISMATCH, "not the instance listed")
        except Exception as exc:  # a data set that cannot be decoded, a disk that refuses the file
            self.landed.put(Pulled(instance, path, f"{PULL_FAILED}: cannot keep it: {exc}"))
            return _status(_NOT_KEPT, "cannot keep it")
        self.landed.put(Pulled(instance, path, "", size))
        return _STORED

    def close(self) -> list[Instance]:
        """Stop waiting: the instances that never came (a late one is refused)."""
        with self.lock:
            missing, self.waiting = list(self.waiting.values()), {}
        return missing


class DimsePuller:
    """C-FIND and C-MOVE or C-GET on ``source`` as ``access`` says."""

    def __init__(self, source: Dimse, access: Access):
        self.source, self.access = source, access
        self.how = access.how
        self._landing: Landing | None = None
        self._server = None
        self._assoc = None  # the association in use, aborted by close()
        self.unasked = 0

    def _ae(self) -> AE:
        ae = AE(ae_title=self.access.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.access.timeout
        ae.connection_timeout = min(10.0, self.access.timeout)
        return ae

    def open(self) -> None:
        """For C-MOVE, start dens's storage SCP on the move port (PullError when it cannot listen)."""
        if self.how != "move":
            return
        ae = self._ae()
        ae.require_called_aet = True  # addressed to dens's title: what the PACS knows as the move destination
        ae.add_supported_context(VERIFICATION)
        for sop_class in MAMMOGRAPHY_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        try:
            self._server = ae.start_server(
                ("", self.access.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
            )
        except OSError as exc:
            raise PullError(
                f"cannot listen on --move-port {self.access.port} for C-MOVE ({exc.strerror or exc}): free it, or "
                "choose another port (the one the PACS knows for dens's AE title), or --retrieve get"
            ) from exc

    def close(self) -> None:
        if self._assoc is not None and self._assoc.is_established:
            self._assoc.abort()
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _store(self, event) -> Dataset | int:
        landing = self._landing
        if landing is None:
            self.unasked += 1
            return _status(_UNASKED, "not asked for")
        return landing.store(event)

    def _associate(self, *contexts: str, get: bool = False):
        ae = self._ae()
        for context in contexts:
            ae.add_requested_context(context)
        roles = []
        if get:  # C-GET: the instances come back on this association, as each is stored
            for sop_class in MAMMOGRAPHY_SOP_CLASSES:
                for syntax in TRANSFER_SYNTAXES:  # one context per syntax: each arrives as the PACS stores it
                    ae.add_requested_context(sop_class, syntax)
                roles.append(build_role(sop_class, scp_role=True))
        handlers = [(evt.EVT_C_STORE, self._store)] if get else []
        assoc = ae.associate(
            self.source.host, self.source.port, ae_title=self.source.aet, ext_neg=roles, evt_handlers=handlers
        )
        if not assoc.is_established:
            what = "rejected the association" if assoc.is_rejected else "could not be reached"
            raise PullError(
                f"{self.source} {what} (dens calls it as {self.access.calling_aet}: check the PACS's AE title, host "
                "and port, and that the PACS knows dens's AE title)"
            )
        # pynetdicom writes a message's command and data set in separate writes: with Nagle's algorithm the second
        # waits for the peer's delayed acknowledgement (40 ms a message on Linux).
        with contextlib.suppress(AttributeError, OSError):
            assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._assoc = assoc
        return assoc

    def _find(self, assoc, query: Dataset) -> Iterator[Dataset]:
        for status, identifier in assoc.send_c_find(query, FIND):
            code = int(status.Status) if status is not None and "Status" in status else None
            if code in _PENDING:
                if identifier is not None:
                    yield identifier
            elif code is None:
                raise PullError(
                    f"{self.source} aborted the C-FIND at {query.QueryRetrieveLevel} level without an answer: check "
                    f"that it lets AE title {self.access.calling_aet} query it (a PACS lists the AE titles it answers)"
                )
            elif code != 0x0000:
                raise PullError(f"C-FIND at {query.QueryRetrieveLevel} level failed: {_said(status)}")

    def studies(self, query: Query) -> Iterator[Study]:
        """The studies ``query`` finds (C-FIND, STUDY level); PullError when the PACS cannot be asked."""
        assoc = self._associate(FIND)
        try:
            for group in query.uid_groups():
                ds = Dataset()
                ds.QueryRetrieveLevel = "STUDY"
                ds.StudyInstanceUID = list(group) if len(group) > 1 else (group[0] if group else "")
                ds.PatientID = ds.AccessionNumber = ds.StudyDate = ""
                for keyword, value in query.filters().items():
                    setattr(ds, keyword, value)
                found = list(self._find(assoc, ds))
                for identifier in found:
                    yield Study(
                        _text(identifier, "StudyInstanceUID"),
                        _text(identifier, "PatientID"),
                        _text(identifier, "AccessionNumber"),
                    )
        finally:
            assoc.release()

    def instances(self, study: Study) -> list[Instance]:
        """The instances of ``study``: one IMAGE level C-FIND for the study (a relational query, which most
        PACS answer); where that fails or finds nothing, the hierarchical way, its series (SERIES level), then
        each one's images."""
        assoc = self._associate(FIND)
        try:
            try:
                found = self._images(assoc, study, "")
            except PullError:
                found = []
            if found:
                return found
            ds = Dataset()
            ds.QueryRetrieveLevel, ds.StudyInstanceUID, ds.SeriesInstanceUID = "SERIES", study.uid, ""
            series = list(dict.fromkeys(_text(i, "SeriesInstanceUID") for i in self._find(assoc, ds)))
            for uid in series:
                if not is_uid(uid):
                    raise PullError(f"the PACS listed SeriesInstanceUID {uid[:80]!r}, not a UID")
                found += self._images(assoc, study, uid)
            return found
        finally:
            assoc.release()

    def _images(self, assoc, study: Study, series: str) -> list[Instance]:
        """The images of ``study``'s ``series`` ('': of every series) by an IMAGE level C-FIND."""
        ds = Dataset()
        ds.QueryRetrieveLevel, ds.StudyInstanceUID, ds.SeriesInstanceUID = "IMAGE", study.uid, series
        ds.SOPInstanceUID = ds.SOPClassUID = ""
        return [
            Instance(study, _text(i, "SeriesInstanceUID"), _text(i, "SOPInstanceUID"), _text(i, "SOPClassUID"))
            for i in self._find(assoc, ds)
        ]

    def retrieve(self, wanted: list[Instance], listed: list[Instance], folder: PullFolder) -> Iterator[Pulled]:
        """``wanted`` (of the study's ``listed`` instances) by C-MOVE or C-GET, each as it lands; then the ones
        that never came, with the retrieve's status."""
        landing = Landing(folder, wanted)
        self._landing = landing
        outcome: list[str] = []
        thread = threading.Thread(
            target=self._retrieve, args=(wanted, listed, landing, outcome), daemon=True, name="dens-pull-retrieve"
        )
        thread.start()
        try:
            while (item := landing.landed.get()) is not _END:
                yield item
        finally:
            self._landing = None
            missing = landing.close()
            self.unasked += landing.unasked
        why = "; ".join(outcome) or "the retrieve ended without it"
        for instance in missing:
            yield Pulled(instance, folder.path(instance), f"{PULL_FAILED}: not received ({why})")

    def _retrieve(self, wanted: list[Instance], listed: list[Instance], landing: Landing, outcome: list[str]) -> None:
        verb = "C-MOVE" if self.how == "move" else "C-GET"
        try:
            assoc = self._associate(MOVE if self.how == "move" else GET, get=self.how == "get")
            try:
                for request in requests_for(wanted, listed):
                    if self.how == "move":
                        responses = assoc.send_c_move(request, self.access.calling_aet, MOVE)
                    else:
                        responses = assoc.send_c_get(request, GET)
                    final = None
                    for status, _ in responses:
                        final = status
                    if final is None or "Status" not in final or int(final.Status) != 0x0000:
                        outcome.append(f"{verb} at {request.QueryRetrieveLevel} level: {_said(final)}")
            finally:
                if assoc.is_established:
                    assoc.release()
        except Exception as exc:  # PullError (no association), an aborted one
            outcome.append(f"{verb}: {exc}")
        finally:
            landing.landed.put(_END)


def requests_for(wanted: list[Instance], listed: list[Instance]) -> list[Dataset]:
    """The retrieve requests that fetch ``wanted`` and nothing else of the study: the study when every listed
    instance is wanted, else each series whose every instance is wanted, else its wanted instances (one IMAGE
    level request per series, with their SOP Instance UIDs)."""
    study = wanted[0].study_uid
    if {i.sop_uid for i in wanted} == {i.sop_uid for i in listed}:
        ds = Dataset()
        ds.QueryRetrieveLevel, ds.StudyInstanceUID = "STUDY", study
        return [ds]
    requests = []
    for series in dict.fromkeys(i.series_uid for i in wanted):
        mine = [i.sop_uid for i in wanted if i.series_uid == series]
        ds = Dataset()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        if set(mine) == {i.sop_uid for i in listed if i.series_uid == series}:
            ds.QueryRetrieveLevel = "SERIES"
        else:
            ds.QueryRetrieveLevel = "IMAGE"
            ds.SOPInstanceUID = mine if len(mine) > 1 else mine[0]
        requests.append(ds)
    return requests
