"""Pulling over DICOMweb with the maintained client, dicomweb-client: QIDO-RS finds the studies
(``search_for_studies``) and lists each one's instances (``search_for_instances``), WADO-RS fetches each
instance (``retrieve_instance``) in the transfer syntax the server stores it in.

Every request goes through one ``requests.Session`` made here: its ``Authorization`` header (a bearer token or
HTTP basic, from :class:`dens.pull.source.Access`; requests drops it on a redirect to another host), the CA
file for https:// (else the system's), a timeout on every request (connecting, and each read), and a limit on
every answer's length (:class:`AnswerTooLong`): a server announcing more than ``Access.max_answer_mib`` is refused
before its body is read, and one sending more than it announced, or announcing nothing (chunked), is cut off
there, so no server makes dens hold or write more than that for one instance or one listing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import requests
from dicomweb_client.api import DICOMwebClient

from dens.pull.folder import PullFolder, Refused
from dens.pull.query import Query
from dens.pull.source import Access, DicomWeb
from dens.pull.study import PULL_FAILED, Instance, Pulled, PullError, Study

log = logging.getLogger(__name__)

_ANY_SYNTAX = (("application/dicom", "*"),)  # as stored: no transcoding on the server
_STUDY_FIELDS = ("PatientID", "AccessionNumber", "StudyDate")
_INSTANCE_FIELDS = ("SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
_TAGS = {
    "StudyInstanceUID": "0020000D",
    "SeriesInstanceUID": "0020000E",
    "SOPInstanceUID": "00080018",
    "SOPClassUID": "00080016",
    "PatientID": "00100020",
    "AccessionNumber": "00080050",
}


def _value(item: dict, keyword: str) -> str:
    """The first value of ``keyword`` in a DICOM JSON object, as text ('' when absent or malformed)."""
    try:
        values = item.get(_TAGS[keyword], {}).get("Value") or [""]
        return str(values[0])
    except (AttributeError, TypeError):
        return ""


def describe(exc: BaseException, timeout: float) -> str:
    """A failed request as a reason reads it: the HTTP status, a timeout, a refused connection."""
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return f"HTTP {exc.response.status_code} {exc.response.reason or ''}".strip()
    if isinstance(exc, requests.Timeout):
        return f"timed out (no answer within {timeout:g} s)"
    if isinstance(exc, requests.exceptions.SSLError):
        return f"TLS failed: {_first_line(exc)} (is --pull-ca the CA that signed the server's certificate?)"
    if isinstance(exc, requests.ConnectionError):
        return f"cannot connect: {_first_line(exc)}"
    if isinstance(exc, AnswerTooLong):
        return str(exc)
    return f"{type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


class AnswerTooLong(requests.RequestException):
    """A DICOMweb answer longer than the pull reads (``Access.max_answer_mib``)."""


def limit_answers(session: requests.Session, limit: int) -> None:
    """Refuse, on ``session``, every answer longer than ``limit`` bytes. A response hook runs once the headers
    are in and before requests reads the body: it refuses a longer Content-Length at once, and counts the bytes
    of the body as they are read (for an answer without one, or one that lies)."""

    def hook(response: requests.Response, *args, **kwargs) -> requests.Response:
        announced = response.headers.get("Content-Length", "")
        if announced.isascii() and announced.isdigit() and int(announced) > limit:
            response.close()
            raise AnswerTooLong(_too_long(f"announced {int(announced)} bytes", limit))
        response.raw = _Counted(response.raw, limit)
        return response

    session.hooks["response"].append(hook)


def _too_long(what: str, limit: int) -> str:
    return f"answer too long: {what}; at most {limit >> 20} MiB is read (--max-answer-mib)"


class _Counted:
    """``raw`` (urllib3's response, which requests reads the body from), raising :class:`AnswerTooLong` once more
    than ``limit`` bytes have come."""

    def __init__(self, raw, limit: int):
        self._raw, self._limit, self._count = raw, limit, 0

    def _add(self, data: bytes) -> bytes:
        self._count += len(data)
        if self._count > self._limit:
            self._raw.close()
            raise AnswerTooLong(_too_long(f"more than {self._limit} bytes sent", self._limit))
        return data

    def stream(self, amt=None, decode_content=None):
        for chunk in self._raw.stream(amt, decode_content=decode_content):
            yield self._add(chunk)

    def read(self, *args, **kwargs) -> bytes:
        return self._add(self._raw.read(*args, **kwargs))

    def __getattr__(self, name: str):
        return getattr(self._raw, name)


class DicomWebPuller:
    """QIDO-RS and WADO-RS on ``source`` as ``access`` says."""

    unasked = 0  # an HTTP server answers what is asked, nothing more

    def __init__(self, source: DicomWeb, access: Access):
        self.source, self.timeout = source, access.timeout
        session = requests.Session()
        authorization = access.authorization()
        if authorization is not None:
            session.headers["Authorization"] = authorization
        session.verify = str(access.ca) if access.ca is not None else True
        # No gzip: the pixel data a PACS stores is mostly compressed already (JPEG 2000, JPEG-LS), and gzipping
        # each instance cost the server 5 times the transfer on a LAN (Orthanc, 0.3 MB: 7 ms against 1.4 ms).
        session.headers["Accept-Encoding"] = "identity"  # and so the length counted is the length sent
        limit_answers(session, access.max_answer_mib << 20)
        self.client = DICOMwebClient(source.url, session=session, timeout=(min(10.0, access.timeout), access.timeout))
        # Retried by the client with backoff: 408, 429, 503 and 504 (a busy server), up to 3 tries.
        self.client.set_http_retry_params(retry=True, max_attempts=3, wait_exponential_multiplier=500)
        self.session = session

    def open(self) -> None:
        """Nothing to open: each request is its own."""

    def close(self) -> None:
        self.session.close()

    def studies(self, query: Query) -> Iterator[Study]:
        """The studies ``query`` finds (QIDO-RS); PullError when the server cannot be asked or refuses."""
        for group in query.uid_groups():
            filters = query.filters()
            if group:
                filters["StudyInstanceUID"] = ",".join(group)  # UID list matching
            try:
                found = self.client.search_for_studies(search_filters=filters, fields=list(_STUDY_FIELDS))
            except Exception as exc:  # requests' errors, a body that is no JSON
                raise PullError(self._refused("the study search", exc)) from exc
            for item in found:
                if isinstance(item, dict):
                    yield Study(
                        _value(item, "StudyInstanceUID"),
                        _value(item, "PatientID"),
                        _value(item, "AccessionNumber"),
                    )

    def _refused(self, what: str, exc: BaseException) -> str:
        why = describe(exc, self.timeout)
        if isinstance(exc, requests.HTTPError) and exc.response is not None and exc.response.status_code in (401, 403):
            why += ": check the credentials (--pull-token-env, or --pull-user and --pull-password-env)"
        return f"{self.source} answered {what} with {why}" if why.startswith("HTTP") else f"{self.source}: {why}"

    def instances(self, study: Study) -> list[Instance]:
        """The instances of ``study`` (QIDO-RS); raises when they cannot be listed."""
        try:
            found = self.client.search_for_instances(study_instance_uid=study.uid, fields=list(_INSTANCE_FIELDS))
        except Exception as exc:
            raise PullError(describe(exc, self.timeout)) from exc
        return [
            Instance(
                study,
                _value(item, "SeriesInstanceUID"),
                _value(item, "SOPInstanceUID"),
                _value(item, "SOPClassUID"),
            )
            for item in found
            if isinstance(item, dict) and _value(item, "StudyInstanceUID") in ("", study.uid)
        ]

    def retrieve(self, wanted: list[Instance], listed: list[Instance], folder: PullFolder) -> Iterator[Pulled]:
        """Each of ``wanted`` (of a study's ``listed`` instances) by WADO-RS, one request each, kept as it lands
        (or why not)."""
        for instance in wanted:
            path = folder.path(instance)
            try:
                dataset = self.client.retrieve_instance(
                    instance.study_uid, instance.series_uid, instance.sop_uid, media_types=_ANY_SYNTAX
                )
                path, size = folder.keep(
                    instance, dataset, lambda f, ds=dataset: ds.save_as(f, enforce_file_format=True)
                )
            except Refused as exc:
                yield Pulled(instance, path, f"{PULL_FAILED}: refused: {exc}")
            except requests.RequestException as exc:
                yield Pulled(instance, path, f"{PULL_FAILED}: {describe(exc, self.timeout)}")
            except OSError as exc:  # the pull folder refuses the file (a full disk)
                yield Pulled(instance, path, f"{PULL_FAILED}: cannot keep it: {exc.strerror or exc}")
            except Exception as exc:  # an answer that is no DICOM instance, or more than one
                yield Pulled(instance, path, f"{PULL_FAILED}: {describe(exc, self.timeout)}")
            else:
                yield Pulled(instance, path, "", size)
