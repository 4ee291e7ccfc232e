"""A pull from servers that lie or fail, and options that must be refused: a DICOMweb server on the loopback
address (this file's, so that it can answer what a PACS should not) that sends another instance than the one
it listed, lists a UID like ``../x``, answers HTTP 500 for one instance, lists a report among the images, and
records the Authorization header of every request; a DIMSE storage handler given instances nobody asked for
or not the one listed; and STUDIES and query options that dens-infer refuses before it starts."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import re
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, evt

from conftest import write_dicom
from dens import labels
from dens.infer import EXIT_ERRORS, EXIT_OK, EXIT_USAGE, InferConfig
from dens.infer.cli import main as infer_main
from dens.infer.runner import run
from dens.pull import Access, Pull, Query, parse_source
from dens.pull.dimse import FIND, GET, Landing
from dens.pull.driver import AHEAD
from dens.pull.folder import PullFolder
from dens.pull.sopclasses import MAMMOGRAPHY_SOP_CLASSES, TRANSFER_SYNTAXES
from dens.pull.study import Instance, Study
from pacs import free_port

ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"


def read(out: Path) -> pd.DataFrame:
    return pd.read_csv(out, dtype=str, keep_default_na=False)


class Unannounced(bytes):
    """An instance's bytes the fake server sends without a Content-Length (HTTP/1.0: until it closes)."""


class FakeDicomWeb(ThreadingHTTPServer):
    """QIDO-RS and WADO-RS as this test scripts them: one study, whose listed instances are ``listing`` (DICOM
    JSON), each retrieved as ``served[SOPInstanceUID]`` (the file's bytes, or an HTTP status to fail with).
    ``requests``: (path, Authorization header) of every request."""

    def __init__(self, study: str, listing: list[dict], served: dict[str, bytes | int]):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.study, self.listing, self.served = study, listing, served
        self.requests: list[tuple[str, str | None]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/dicom-web"

    def retrieved(self, sop: str) -> int:
        """How many times the instance ``sop`` was asked for."""
        return sum(path.endswith(f"/instances/{sop}") for path, _ in self.requests)


class _Handler(BaseHTTPRequestHandler):
    server: FakeDicomWeb

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        with self.server.lock:
            self.server.requests.append((path, self.headers.get("Authorization")))
        parts = path.strip("/").split("/")
        if parts == ["dicom-web", "studies"]:
            study = {"0020000D": {"vr": "UI", "Value": [self.server.study]}, "00100020": {"vr": "LO", "Value": ["P9"]}}
            return self._json([study])
        if parts == ["dicom-web", "studies", self.server.study, "instances"]:
            return self._json(self.server.listing)
        if len(parts) == 7 and parts[5] == "instances" and parts[6] in self.server.served:
            answer = self.server.served[parts[6]]
            if isinstance(answer, int):
                return self.send_error(answer)
            unannounced = isinstance(answer, Unannounced)  # no Content-Length: the body ends when the server closes
            boundary = "dens-test-boundary"
            body = b"".join(
                [
                    f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(),
                    answer,
                    f"\r\n--{boundary}--".encode(),
                ]
            )
            self.send_response(200)
            self.send_header("Content-Type", f'multipart/related; type="application/dicom"; boundary={boundary}')
            if not unannounced:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(OSError):  # dens hung up: it read enough
                self.wfile.write(body)
            return None
        return self.send_error(404)

    def _json(self, value) -> None:
        body = json.dumps(value).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def listed(study: str, series: str, sop: str, sop_class: str = MAMMOGRAPHY_SOP_CLASSES[0]) -> dict:
    return {
        "0020000D": {"vr": "UI", "Value": [study]},
        "0020000E": {"vr": "UI", "Value": [series]},
        "00080018": {"vr": "UI", "Value": [sop]},
        "00080016": {"vr": "UI", "Value": [sop_class]},
    }


@pytest.fixture
def one_study(synthetic_cohort) -> list:
    """The four views of the shared cohort's first study: their headers (pixels not read) and paths."""
    cohort = synthetic_cohort(3, seed=5)
    study = sorted(cohort.rglob("*.dcm"))[0].parent
    return [(dcmread(p, stop_before_pixels=True), p) for p in sorted(study.glob("*.dcm"))]


def test_a_lying_or_failing_server_costs_its_instances_error_rows_and_the_rest_are_scored(
    one_study, onnx_model, tmp_path
):
    (a, a_path), (b, b_path), (c, c_path), (d, _) = one_study
    study = a.StudyInstanceUID
    listing = [listed(study, ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds, _ in one_study]
    listing.append(listed(study, a.SeriesInstanceUID, "../x"))  # a path, not a UID
    listing.append(listed(study, a.SeriesInstanceUID, "1.2.3.4", ENHANCED_SR))  # not an image dens reads
    served = {
        a.SOPInstanceUID: a_path.read_bytes(),
        b.SOPInstanceUID: b_path.read_bytes(),
        c.SOPInstanceUID: 500,
        d.SOPInstanceUID: a_path.read_bytes(),  # another instance than the one listed
        "1.2.3.4": a_path.read_bytes(),
    }
    server = FakeDicomWeb(study, listing, served)
    out = tmp_path / "out" / "preds.csv"
    cfg = InferConfig(server.url, out, model=onnx_model, study_uid=(study,), progress=False)
    summary = run(cfg)
    rows = read(out).set_index(labels.SOP_UID)
    assert summary.exit_code == EXIT_ERRORS
    assert len(rows) == 6 and (summary.pull.instances, summary.pull.fetched) == (6, 2)
    assert (summary.pull.failed, summary.pull.not_pulled) == (3, 1)
    assert rows.loc[[a.SOPInstanceUID, b.SOPInstanceUID], labels.STATUS].tolist() == ["ok", "ok"]
    assert rows.loc[c.SOPInstanceUID, labels.REASON].startswith("pull_failed: HTTP 500")
    assert rows.loc[d.SOPInstanceUID, labels.REASON] == (
        f"pull_failed: refused: the server sent SeriesInstanceUID '{a.SeriesInstanceUID}' where its listing said "
        f"{d.SeriesInstanceUID}"
    )
    assert rows.loc["../x", labels.REASON].startswith("pull_failed: the server listed SOPInstanceUID '../x'")
    assert rows.loc["1.2.3.4", labels.STATUS] == "skipped" and "not_mammography" in rows.loc["1.2.3.4", labels.REASON]
    for sop in (c.SOPInstanceUID, d.SOPInstanceUID, "../x"):  # each failure names its study and file
        assert rows.loc[sop, labels.STATUS] == "error" and rows.loc[sop, labels.STUDY_UID] == study
        assert rows.loc[sop, labels.PATIENT_ID] == "P9"
        assert not Path(rows.loc[sop, labels.PATH]).exists()
    pulled = tmp_path / "out" / "preds.pulled"
    assert all(Path(p).is_relative_to(pulled) for p in rows[labels.PATH])
    assert sorted(p.name for p in tmp_path.rglob("*.dcm")) == sorted(
        f"{s}.dcm" for s in (a.SOPInstanceUID, b.SOPInstanceUID)
    )
    assert not any(".." in path for path, _ in server.requests)
    assert server.retrieved("1.2.3.4") == 0  # a report is not fetched
    assert (tmp_path / "out" / "preds.exam.csv").is_file()

    served[c.SOPInstanceUID] = c_path.read_bytes()  # the server is well again: --retry-errors fetches it
    again = run(dataclasses.replace(cfg, retry_errors=True))
    rows = read(out).set_index(labels.SOP_UID)
    assert rows.loc[c.SOPInstanceUID, labels.STATUS] == "ok" and len(rows) == 6
    assert rows.loc[d.SOPInstanceUID, labels.STATUS] == "error"  # still not the instance listed
    assert (again.pull.done, again.pull.fetched, again.retried) == (3, 1, 3)
    assert server.retrieved(c.SOPInstanceUID) == 2 and server.retrieved(a.SOPInstanceUID) == 1
    assert again.exit_code == EXIT_ERRORS


def test_a_bearer_token_reaches_the_server_with_every_request_and_shows_nowhere(one_study, tmp_path):
    (a, a_path), *_ = one_study
    listing = [listed(a.StudyInstanceUID, a.SeriesInstanceUID, a.SOPInstanceUID)]
    server = FakeDicomWeb(a.StudyInstanceUID, listing, {a.SOPInstanceUID: a_path.read_bytes()})
    access = Access(token_env="DENS_TEST_TOKEN", environ={"DENS_TEST_TOKEN": "t0ken-42"})
    with Pull(parse_source(server.url), Query(study_date="20000101-"), access, tmp_path) as pull:
        got = list(pull.instances())
    assert [p.problem for p in got] == [""] and got[0].path.read_bytes() == a_path.read_bytes()
    assert len(server.requests) == 3  # the study search, the instances, the instance
    assert {auth for _, auth in server.requests} == {"Bearer t0ken-42"}
    assert "t0ken-42" not in repr(access) + pull.summary.line()

    with Pull(parse_source(server.url), Query(study_date="20000101-"), Access(), tmp_path / "none") as pull:
        list(pull.instances())
    assert server.requests[-1][1] is None  # no credentials unless asked for


def test_the_dimse_storage_handler_refuses_what_nobody_asked_for_and_what_is_not_the_instance_listed(
    one_study, tmp_path
):
    (a, a_path), (b, b_path), (_, c_path), _ = one_study
    study = Study(a.StudyInstanceUID)
    expected = [Instance(study, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID) for ds in (a, b)]
    landing = Landing(PullFolder(tmp_path / "pulled"), expected)
    scp = AE(ae_title="DENS")
    for sop_class in MAMMOGRAPHY_SOP_CLASSES:
        scp.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, landing.store)])
    try:
        scu = AE(ae_title="PACS")
        for syntax in TRANSFER_SYNTAXES:
            scu.add_requested_context(MAMMOGRAPHY_SOP_CLASSES[0], syntax)
        assoc = scu.associate("127.0.0.1", port, ae_title="DENS")
        assert assoc.is_established
        sent = dcmread(a_path)
        assert assoc.send_c_store(sent).Status == 0x0000
        wrong = dcmread(b_path)
        wrong.StudyInstanceUID = "1.2.999"  # the SOP instance asked for, in another study than listed
        assert assoc.send_c_store(wrong).Status == 0xA900
        assert assoc.send_c_store(dcmread(c_path)).Status == 0x0124  # nobody asked for it
        assert assoc.send_c_store(dcmread(a_path)).Status == 0x0124  # nor for it twice
        assoc.release()
    finally:
        server.shutdown()
    landed = []
    while not landing.landed.empty():
        landed.append(landing.landed.get())
    assert [(p.instance.sop_uid, p.problem[:40]) for p in landed] == [
        (a.SOPInstanceUID, ""),
        (b.SOPInstanceUID, "pull_failed: refused: the server sent St"),
    ]
    assert landed[0].path.read_bytes()[128:132] == b"DICM" and landing.unasked == 2
    assert dcmread(landed[0].path).SOPInstanceUID == a.SOPInstanceUID
    assert not landed[1].path.exists() and landing.close() == []


def test_the_pull_fetches_a_bounded_number_of_instances_ahead_of_its_consumer(breast, tmp_path):
    """Memory and disk follow the consumer, not the query: a consumer that stops asking stops the fetching
    within the queue's length."""
    study, series = "1.2.826.0.1.3680043.8.498.77", "1.2.826.0.1.3680043.8.498.77.1"
    listing, served = [], {}
    (tmp_path / "made").mkdir()
    for i in range(3 * AHEAD):
        sop = f"{series}.{i}"
        path = write_dicom(tmp_path / "made" / f"{i}.dcm", breast(32, 24, seed=i), StudyInstanceUID=study,
                           SeriesInstanceUID=series, SOPInstanceUID=sop)  # fmt: skip
        listing.append(listed(study, series, sop))
        served[sop] = path.read_bytes()
    server = FakeDicomWeb(study, listing, served)
    with Pull(parse_source(server.url), Query(study_date="20000101-"), Access(), tmp_path / "pulled") as pull:
        results = pull.instances()
        first = next(results)
        time.sleep(1.0)  # the fetching runs on while the consumer holds back, until the queue is full
        ahead = sum(server.retrieved(sop) for sop in served)
        assert ahead <= AHEAD + 2, ahead  # the one handed out, the queue, the one waiting to go in
        rest = list(results)
    assert [p.problem for p in [first, *rest]] == [""] * (3 * AHEAD)
    assert pull.summary.fetched == 3 * AHEAD


def test_a_pacs_answering_hierarchical_queries_only_is_listed_series_by_series(one_study, tmp_path):
    """A PACS that refuses an IMAGE level query without a series (as PS3.4's hierarchical queries may): the study
    is listed series by series, then retrieved by C-GET (here from pynetdicom as the PACS)."""
    study = one_study[0][0].StudyInstanceUID
    levels = []

    def on_find(event):
        query = event.identifier
        levels.append(query.QueryRetrieveLevel)
        if query.QueryRetrieveLevel == "IMAGE" and not query.SeriesInstanceUID:
            yield 0xA900, None  # identifier does not match: a unique key above the level is missing
            return
        keys = {"STUDY": ("StudyInstanceUID",), "SERIES": ("StudyInstanceUID", "SeriesInstanceUID")}
        keys["IMAGE"] = (*keys["SERIES"], "SOPInstanceUID", "SOPClassUID")
        answered = set()
        for ds, _ in one_study:
            if query.get("SeriesInstanceUID") and ds.SeriesInstanceUID != query.SeriesInstanceUID:
                continue
            found = Dataset()
            found.QueryRetrieveLevel = query.QueryRetrieveLevel
            for keyword in keys[query.QueryRetrieveLevel]:
                setattr(found, keyword, ds.get(keyword))
            if (key := tuple(str(found.get(k)) for k in keys[query.QueryRetrieveLevel])) not in answered:
                answered.add(key)
                yield 0xFF00, found

    def on_get(event):
        assert event.identifier.StudyInstanceUID == study
        yield len(one_study)
        for _, path in one_study:
            yield 0xFF00, dcmread(path)

    pacs = AE(ae_title="PACS")
    pacs.add_supported_context(FIND)
    pacs.add_supported_context(GET)
    for sop_class in MAMMOGRAPHY_SOP_CLASSES:
        pacs.add_supported_context(sop_class, list(TRANSFER_SYNTAXES), scu_role=True, scp_role=True)
    port = free_port()
    handlers = [(evt.EVT_C_FIND, on_find), (evt.EVT_C_GET, on_get)]
    server = pacs.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    try:
        source = parse_source(f"dicom://PACS@127.0.0.1:{port}")
        with Pull(source, Query(study_date="20000101-"), Access(retrieve="get"), tmp_path) as pull:
            got = list(pull.instances())
    finally:
        server.shutdown()
    assert levels == ["STUDY", "IMAGE", "SERIES", "IMAGE", "IMAGE", "IMAGE", "IMAGE"]
    assert [p.problem for p in got] == [""] * 4
    originals = {ds.SOPInstanceUID: path for ds, path in one_study}
    for pulled in got:
        assert dcmread(pulled.path).PixelData == dcmread(originals[pulled.instance.sop_uid]).PixelData
    assert pull.summary.fetched == 4 and pull.summary.instances == 4


@pytest.mark.parametrize(
    "args, said",
    [
        (["http://dens:hunter2@127.0.0.1:1/dicom-web", "--since", "1d"], "no credentials in the URL"),
        (["dicom://dens:hunter2@10.0.0.5:104", "--since", "1d"], "DIMSE authenticates by AE title"),
        (["https://pacs.example.org/dicom-web"], "needs a query"),
        (["no/such/folder"], "does not exist"),
        (["ftp://pacs.example.org/x", "--since", "1d"], "no source dens pulls from"),
        (["dicom://pacs.example.org:104", "--since", "1d"], "expected dicom://CALLED_AET@HOST:PORT"),
        (["https://pacs.example.org/dicom-web", "--study-uid", "../x"], "not a DICOM UID"),
        (["https://pacs.example.org/dicom-web", "--study-date", "20261301"], "no calendar date"),
        (["https://pacs.example.org/dicom-web", "--study-date", "20261206-20261201"], "ends before it starts"),
        (["https://pacs.example.org/dicom-web", "--since", "1w"], "hours or days"),
        (["https://pacs.example.org/dicom-web", "--since", "1d", "--study-date", "20261206"], "choose one"),
        (["https://pacs.example.org/dicom-web", "--query", "StudyDate=20261206"], "--study-date or --since"),
        (["https://pacs.example.org/dicom-web", "--query", "Bogus=1"], "not a DICOM keyword"),
        (["https://pacs.example.org/dicom-web", "--since", "1d", "--engine", "ray"], "--engine local"),
        (["https://pacs.example.org/dicom-web", "--since", "1d", "--shard", "0/2"], "split it by date"),
        (["https://pacs.example.org/dicom-web", "--since", "1d", "--move-port", "11113"], "DIMSE options"),
        (["dicom://PACS@10.0.0.5:104", "--since", "1d", "--pull-user", "u"], "DICOMweb options"),
        (["dicom://PACS@10.0.0.5:104", "--since", "1d", "--retrieve", "get", "--move-port", "1"], "C-GET needs no"),
        (["dicom://PACS@10.0.0.5:104", "--since", "1d", "--ae-title", "A\\B"], "not an AE title"),
        (["http://10.0.0.5/dicom-web", "--since", "1d", "--pull-token-env", "HOME"], "https:// URLs only"),
        ([".", "--since", "1d"], "options of a pull from a PACS"),
    ],
)
def test_bad_sources_and_queries_are_usage_errors(args, said, tmp_path):
    result = CliRunner().invoke(infer_main, [*args, "--out", str(tmp_path / "preds.csv")])
    assert result.exit_code == EXIT_USAGE, result.output
    assert said in result.output
    assert "hunter2" not in result.output
    assert not (tmp_path / "preds.csv").exists()


def test_since_is_a_date_range_ending_today_and_dates_are_checked():
    now = dt.datetime(2026, 12, 6, 9, 30)
    assert Query.parse(since="24h", now=now).study_date == "20261205-20261206"
    assert Query.parse(since="9h", now=now).study_date == "20261206-20261206"
    assert Query.parse(since="7d", now=now).study_date == "20261129-20261206"
    assert Query.parse(study_date="20261201-20261206").filters() == {
        "StudyDate": "20261201-20261206",
        "ModalitiesInStudy": "MG",
    }
    listed_only = Query.parse(study_uids=["1.2.3", "1.2.3", "1.2.4"])
    assert listed_only.study_uids == ("1.2.3", "1.2.4") and listed_only.modality is None
    assert Query.parse(keys=["AccessionNumber=A1"], modality="mg").filters() == {
        "AccessionNumber": "A1",
        "ModalitiesInStudy": "MG",
    }
    with pytest.raises(ValueError, match="at most 64"):
        Query.parse(study_uids=["1." * 40 + "1"])


def test_a_pulled_folder_is_scored_like_any_folder(one_study, onnx_model, tmp_path):
    """The pull folder is a folder of DICOM files as the walk takes them: a later folder run over it gives the
    pull's rows (a pull never writes anything else there)."""
    (a, a_path), *_ = one_study
    listing = [listed(a.StudyInstanceUID, a.SeriesInstanceUID, a.SOPInstanceUID)]
    server = FakeDicomWeb(a.StudyInstanceUID, listing, {a.SOPInstanceUID: a_path.read_bytes()})
    pulled = run(InferConfig(server.url, tmp_path / "p.csv", model=onnx_model, since="30000d", progress=False))
    assert pulled.exit_code == EXIT_OK
    again = run(InferConfig(tmp_path / "p.pulled", tmp_path / "f.csv", model=onnx_model, progress=False))
    assert (
        read(tmp_path / "f.csv")
        .drop(columns=[labels.PATH])
        .equals(read(tmp_path / "p.csv").drop(columns=[labels.PATH]))
    )
    assert again.files == 1 and os.listdir(tmp_path / "p.pulled") == [a.StudyInstanceUID]


def test_an_answer_longer_than_the_limit_is_refused_announced_or_not(one_study, tmp_path):
    """A server announcing 2 MiB for an instance is refused before the body is read; one sending 2 MiB without
    announcing a length is cut off at the limit (1 MiB here); either is an error row, and nothing is kept."""
    (a, a_path), (b, _), (c, _), _ = one_study
    study = a.StudyInstanceUID
    huge = a_path.read_bytes() + bytes(2 << 20)
    listing = [listed(study, ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds, _ in one_study[:3]]
    served = {a.SOPInstanceUID: a_path.read_bytes(), b.SOPInstanceUID: huge, c.SOPInstanceUID: Unannounced(huge)}
    server = FakeDicomWeb(study, listing, served)
    access = Access(max_answer_mib=1)
    with Pull(parse_source(server.url), Query(study_uids=(study,)), access, tmp_path / "pulled") as pull:
        got = {p.instance.sop_uid: p for p in pull.instances()}
    assert got[a.SOPInstanceUID].problem == ""
    assert re.fullmatch(
        r"pull_failed: answer too long: announced (\d+) bytes; at most 1 MiB is read \(--max-answer-mib\)",
        got[b.SOPInstanceUID].problem,
    ), got
    assert got[c.SOPInstanceUID].problem.startswith("pull_failed: answer too long: more than 1048576 bytes sent"), got
    assert sorted(p.name for p in (tmp_path / "pulled").rglob("*.dcm")) == [f"{a.SOPInstanceUID}.dcm"]
    assert not list((tmp_path / "pulled").rglob("*.tmp*"))


_SILENT_LISTING = """
import json, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from dens.pull import Access, Pull, Query, parse_source

class Silent(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path.split("?")[0].rstrip("/").endswith("/studies"):
            body = json.dumps([{"0020000D": {"vr": "UI", "Value": ["1.2.3"]}}]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            time.sleep(3600)  # the study's listing never comes

server = ThreadingHTTPServer(("127.0.0.1", 0), Silent)
server.daemon_threads = True
threading.Thread(target=server.serve_forever, daemon=True).start()
url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
pull = Pull(parse_source(url), Query(study_uids=("1.2.3",)), Access(timeout=300), sys.argv[1]).__enter__()
threading.Thread(target=lambda: list(pull.instances()), daemon=True).start()
time.sleep(1)
print("interrupted", flush=True)
sys.exit(130)
"""


def test_a_run_interrupted_while_a_listing_waits_on_a_silent_server_exits_at_once(tmp_path):
    """A listing waits out its timeout (here 300 s) on a server that never answers: the process that asked for
    it, interrupted meanwhile, still exits (the listing thread is a daemon, not an executor's, which Python joins
    at exit)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _SILENT_LISTING, str(tmp_path / "pulled")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 130 and "interrupted" in done.stdout, done.stderr[-2000:]
