"""dens-serve, the DICOM node, against real DICOM software on loopback ports: DCMTK's echoscu, storescu and
storescp, Orthanc as the PACS (its REST API and its DICOMweb plugin), dicom3tools' dciodvfy on the SRs it
sends; a kill -9 mid-study and a destination that is down, then up; TLS; the allow-list; refused and hostile
instances; TLS and authentication on the way out (a DCMTK storescp over TLS, a loopback STOW-RS server that
asks for a token). Each test that needs a program skips, naming it, where it is absent (`make test` installs them as
root)."""

from __future__ import annotations

import base64
import io
import json
import os
import queue
import re
import secrets
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from conftest import REAL_FILES, synthetic_breast, write_dicom
from dens import labels
from dens.serve.config import Allowed, Destination, ServeConfig
from dens.serve.scp import MAMMOGRAPHY_SOP_CLASSES
from dens.serve.send import SendError, backoff, outgoing, send_stow
from dens.serve.state import State, key
from pacs import DICOMWEB_PLUGIN, WAIT, free_port, need, rest, wait_for
from pacs import orthanc as start_orthanc

DENS_SERVE = [sys.executable, "-c", "from dens.serve.cli import main; main()"]
VIEWS = (("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO"))
BREAST_COMPOSITION, MEASUREMENT_GROUP, FINDING_SITE, LATERALITY = "129715009", "125007", "363698007", "272741003"
SIDE_CODES = {"7771000": "L", "24028007": "R", "51440002": "B"}
COMPOSITION_CODES = {"129716005": "A", "129717001": "B", "129718006": "C", "129719003": "D"}


def make_study(folder: Path, views=VIEWS, **tags) -> tuple[str, list[Path]]:
    """A screening study's DICOM files (one per view) in ``folder``: its StudyInstanceUID and the files."""
    folder.mkdir(parents=True, exist_ok=True)
    study = tags.pop("StudyInstanceUID", generate_uid())
    paths = [
        write_dicom(
            folder / f"{side}{view}.dcm",
            synthetic_breast(128, 96, seed=i),
            ImageLaterality=side,
            ViewPosition=view,
            StudyInstanceUID=study,
            PatientName="Doe^Jane",
            PatientSex="F",
            StudyDate="20260101",
            StudyTime="101010",
            **tags,
        )
        for i, (side, view) in enumerate(views)
    ]
    return study, paths


class Node:
    """dens-serve as a subprocess: started, its ports read from its first line, stopped or killed."""

    def __init__(self, state: Path, model: Path, *args: str, port: int = 0, env: dict[str, str] | None = None):
        self.state = state
        self.log = state.with_name(state.name + ".log")
        command = [*DENS_SERVE, str(state), "--model", str(model), "--port", str(port), "--status-port", "0"]
        command += ["--workers", "1", "--retry-seconds", "0.3", *args]
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ, **(env or {})}
            )
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in self.proc.stdout], daemon=True).start()
        deadline = time.monotonic() + WAIT
        while True:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                line = ""
            found = re.search(r"listening on [\d.]+:(\d+).*status on http://[\d.]+:(\d+)/", line)
            if found:
                self.port, self.status_port = int(found[1]), int(found[2])
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"dens-serve did not start: {self.log.read_text()[-3000:]}")

    def status(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.status_port}/status", timeout=10) as response:
            return json.load(response)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: no cleanup of any kind
        self.proc.wait(timeout=30)

    def answered(self, study_uid: str) -> dict | None:
        """The study's entry once the node answered it (from its state folder)."""
        state = State(self.state, read_only=True)
        try:
            return next((s for s in state.timeline() if s["study_uid"] == study_uid), None)
        finally:
            state.close()


# storescu proposes the uncompressed transfer syntaxes unless told which compressed one to propose besides.
_STORESCU_PROPOSE = {
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.5": "-xr",
}


def storescu(port: int, files, aet: str = "STORESCU") -> subprocess.CompletedProcess:
    """DCMTK's storescu sending ``files`` (one run per transfer syntax); the last failed run, else the last."""
    groups: dict[str, list[str]] = {}
    for f in files:
        syntax = str(dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        groups.setdefault(_STORESCU_PROPOSE.get(syntax, "-x="), []).append(str(f))
    runs = [
        subprocess.run(
            [need("storescu"), propose, "-aet", aet, "-aec", "DENS", "127.0.0.1", str(port), *group],
            capture_output=True,
            text=True,
            timeout=WAIT,
        )
        for propose, group in groups.items()
    ]
    return next((r for r in runs if r.returncode != 0), runs[-1])


def echoscu(port: int, aet: str = "ECHOSCU", *tls: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [need("echoscu"), *tls, "-aet", aet, "-aec", "DENS", "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=WAIT,
    )


def preds(state: Path) -> pd.DataFrame:
    return pd.read_csv(state / "preds.csv", dtype=str, keep_default_na=False)


def content(item) -> list:
    found = []
    for child in getattr(item, "ContentSequence", []):
        found.append(child)
        found.extend(content(child))
    return found


def compositions(ds) -> dict[str, str]:
    """Each measurement group's BI-RADS composition by the laterality of its finding site (L, R, B)."""
    found = {}
    for group in content(ds):
        if group.ValueType != "CONTAINER" or group.ConceptNameCodeSequence[0].CodeValue != MEASUREMENT_GROUP:
            continue
        items = {c.ConceptNameCodeSequence[0].CodeValue: c for c in group.ContentSequence}
        site = items[FINDING_SITE]
        side = next(c for c in site.ContentSequence if c.ConceptNameCodeSequence[0].CodeValue == LATERALITY)
        if BREAST_COMPOSITION in items:
            code = items[BREAST_COMPOSITION].ConceptCodeSequence[0].CodeValue
            found[SIDE_CODES[side.ConceptCodeSequence[0].CodeValue]] = COMPOSITION_CODES[code]
    return found


def exam_call(state: Path, study_uid: str) -> pd.Series:
    """The study's row of preds.exam.csv, once the node has written it."""
    path = state / "preds.exam.csv"

    def row() -> list[pd.Series]:
        if not path.is_file():
            return []
        exams = pd.read_csv(path, dtype=str, keep_default_na=False)
        return [r for _, r in exams[exams[labels.STUDY_UID] == study_uid].iterrows()]

    return wait_for("the exam CSV to hold the study", row)[0]


def dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run([need("dciodvfy"), str(path)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def referenced(ds) -> set[str]:
    return {
        ref.ReferencedSOPInstanceUID
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }


# --- the node shared by most tests, with Orthanc as the PACS that sends to it and receives its SRs -------------


@pytest.fixture(scope="module")
def ports() -> dict[str, int]:
    return {"node": free_port(), "orthanc_dicom": free_port(), "orthanc_http": free_port()}


@pytest.fixture(scope="module")
def node(onnx_model, ports, tmp_path_factory):
    """dens-serve answering to Orthanc (C-STORE, and STOW-RS to its DICOMweb), storescu and echoscu."""
    state = tmp_path_factory.mktemp("node") / "state"
    # STOW-RS to Orthanc's DICOMweb where its plugin is installed (Debian package orthanc-dicomweb).
    stow = (
        ("--stow-url", f"http://127.0.0.1:{ports['orthanc_http']}/dicom-web/studies")
        if DICOMWEB_PLUGIN.is_file()
        else ()
    )
    running = Node(
        state,
        onnx_model,
        "--allow-aet",
        "ORTHANC@127.0.0.1",
        "--allow-aet",
        "STORESCU",
        "--allow-aet",
        "ECHOSCU",
        "--allow-aet",
        "PYNETDICOM",
        "--stable-seconds",
        "1",
        "--send-to",
        f"ORTHANC@127.0.0.1:{ports['orthanc_dicom']}",
        *stow,
        port=ports["node"],
    )
    yield running
    assert running.stop() == 0, running.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def orthanc(ports, tmp_path_factory):
    """Orthanc with a temporary configuration: its own storage, loopback only, dens-serve as modality 'dens'."""
    root = tmp_path_factory.mktemp("orthanc")
    dens = {"dens": ["DENS", "127.0.0.1", ports["node"]]}
    with start_orthanc(root, ports["orthanc_http"], ports["orthanc_dicom"], modalities=dens) as url:
        yield url


def test_echo_is_answered_for_an_allowed_title_and_refused_for_another(node):
    assert echoscu(node.port).returncode == 0
    refused = echoscu(node.port, "INTRUDER")
    assert refused.returncode != 0
    assert "Rejected" in refused.stdout + refused.stderr


def test_an_allowed_title_from_another_address_than_its_own_is_refused(node):
    from pynetdicom import AE

    ae = AE(ae_title="ORTHANC")  # allowed from 127.0.0.1 only
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DENS", bind_address=("127.0.0.2", 0))
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0124  # refused: not authorised
    finally:
        assoc.release()


def test_a_second_node_on_the_same_state_folder_does_not_start(node, onnx_model):
    second = subprocess.run(
        [*DENS_SERVE, str(node.state), "--model", str(onnx_model), "--allow-any-aet", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert second.returncode == 1
    assert "another dens-serve keeps" in second.stderr


def test_storescu_study_gets_one_row_per_instance_and_one_valid_sr(node, tmp_path):
    study, files = make_study(tmp_path / "study")
    sent = storescu(node.port, files)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    answer = wait_for("the study's SR", lambda: node.answered(study))
    rows = preds(node.state)
    mine = rows[rows[labels.STUDY_UID] == study]
    assert sorted(mine[labels.SOP_UID]) == sorted(dcmread(f).SOPInstanceUID for f in files)
    assert set(mine[labels.STATUS]) == {"ok"}
    assert all(Path(p).is_relative_to(node.state / "spool") for p in mine[labels.PATH])
    report = dcmread(node.state / "sr" / f"{answer['sr_uid']}.dcm")
    call = exam_call(node.state, study)
    assert compositions(report) == {"L": call["density_L"], "R": call["density_R"], "B": call[labels.DENSITY]}
    assert answer["density"] == call[labels.DENSITY]
    assert referenced(report) == set(mine[labels.SOP_UID])
    assert dciodvfy_errors(node.state / "sr" / f"{answer['sr_uid']}.dcm") == []
    # The same study again (a PACS retry): acknowledged, no new row, no new SR.
    assert storescu(node.port, files).returncode == 0
    time.sleep(1.5)
    assert len(preds(node.state).query(f"{labels.STUDY_UID} == @study")) == 4
    assert node.answered(study)["sr_uid"] == answer["sr_uid"]


def test_the_real_samples_go_through_the_node_into_valid_srs(node, real_mammo):
    # The real mammograms an SCU can send as mammograms: a mammography SOP class in the data set (some RSNA test
    # files name theirs in the file meta only; the NEMA WG04 ones are Secondary Captures).
    headers = {name: dcmread(real_mammo / name, stop_before_pixels=True) for name in REAL_FILES}
    files = [real_mammo / n for n, ds in headers.items() if ds.get("SOPClassUID") in MAMMOGRAPHY_SOP_CLASSES]
    assert files
    sent = storescu(node.port, files)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    studies = {str(dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in files}
    for study in studies:
        answer = wait_for(f"study {study} answered", lambda study=study: node.answered(study))
        path = node.state / "sr" / f"{answer['sr_uid']}.dcm"
        assert path.is_file() and dciodvfy_errors(path) == [], study
    rows = preds(node.state)
    mine = rows[rows[labels.SOP_UID].isin({str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files})]
    assert len(mine) == len(files) and set(mine[labels.STATUS]) == {"ok"}


def send_from_orthanc(orthanc: str, study: str, files) -> dict:
    """Upload ``files`` to Orthanc, then have Orthanc C-STORE their study to the node (its modality 'dens');
    Orthanc's job report."""
    for f in files:
        rest(f"{orthanc}/instances", f.read_bytes())
    orthanc_study = rest(f"{orthanc}/tools/lookup", study.encode())[0]["ID"]
    return rest(f"{orthanc}/modalities/dens/store", {"Resources": [orthanc_study], "Synchronous": True})


def srs_in_orthanc(orthanc: str, study: str) -> list:
    """The SR instances Orthanc holds for ``study``."""
    query = {"Level": "Instance", "Query": {"StudyInstanceUID": study, "Modality": "SR"}}
    return rest(f"{orthanc}/tools/find", query)


def test_orthanc_sends_a_study_and_receives_its_sr(node, orthanc, tmp_path):
    study, files = make_study(tmp_path / "study", PatientID="P-ORTHANC")
    job = send_from_orthanc(orthanc, study, files)
    assert job["InstancesCount"] == 4 and job["FailedInstancesCount"] == 0
    found = wait_for("the SR in Orthanc", lambda: srs_in_orthanc(orthanc, study))
    assert len(found) == 1  # sent by C-STORE and by STOW-RS: one instance (its UID is the study's and sources')
    path = tmp_path / "sr.dcm"
    path.write_bytes(rest(f"{orthanc}/instances/{found[0]}/file"))
    report = dcmread(path)
    call = exam_call(node.state, study)
    assert compositions(report) == {"L": call["density_L"], "R": call["density_R"], "B": call[labels.DENSITY]}
    assert report.PatientID == "P-ORTHANC" and report.VerificationFlag == "UNVERIFIED"
    assert referenced(report) == {dcmread(f).SOPInstanceUID for f in files}
    assert dciodvfy_errors(path) == []
    # Each destination acknowledged it once: the C-STORE to Orthanc and, with its DICOMweb plugin, the STOW-RS.
    sends = wait_for(
        "both sends acknowledged", lambda: all(s["state"] == "sent" for s in node.answered(study)["sends"]) and node
    ).answered(study)["sends"]
    kinds = sorted(s["destination"].split(":")[0] for s in sends)
    assert kinds == (["dicom", "stow"] if DICOMWEB_PLUGIN.is_file() else ["dicom"])


def test_a_for_processing_image_is_acknowledged_and_gets_a_skipped_row(node, tmp_path):
    """A modality sends its raw 'For Processing' image with the study: the node takes it (the SOP class is a
    mammogram's), gives it a skipped row with its reason, and calls the exam on the presentation views."""
    study, files = make_study(tmp_path / "study")
    raw = write_dicom(
        tmp_path / "raw.dcm",
        synthetic_breast(128, 96, seed=9),
        sop_class="1.2.840.10008.5.1.4.1.1.1.2.1",  # Digital Mammography X-Ray Image Storage - For Processing
        ImageLaterality="L",
        ViewPosition="CC",
        StudyInstanceUID=study,
        PresentationIntentType="FOR PROCESSING",
    )
    assert storescu(node.port, [*files, raw]).returncode == 0
    answer = wait_for("the study's SR", lambda: node.answered(study))
    rows = preds(node.state).query(f"{labels.STUDY_UID} == @study")
    assert len(rows) == 5
    skipped = rows[rows[labels.SOP_UID] == dcmread(raw).SOPInstanceUID]
    assert list(skipped[labels.STATUS]) == ["skipped"] and skipped.iloc[0]["reason"].startswith("for_processing")
    report = dcmread(node.state / "sr" / f"{answer['sr_uid']}.dcm")
    assert referenced(report) == {dcmread(f).SOPInstanceUID for f in files}  # the raw image is not a source


def test_non_mammography_is_refused_with_its_reason(node, tmp_path):
    ct_in_mg = write_dicom(tmp_path / "ct.dcm", synthetic_breast(64, 48), modality="CT")
    ct_image = write_dicom(tmp_path / "ct-image.dcm", synthetic_breast(64, 48), sop_class="1.2.840.10008.5.1.4.1.1.2")
    before = node.status()["refused"]["count"]
    spooled = sorted((node.state / "spool").rglob("*.dcm"))
    assert storescu(node.port, [ct_in_mg]).returncode != 0
    assert storescu(node.port, [ct_image]).returncode != 0  # CT Image Storage: no presentation context for it
    status = node.status()["refused"]
    assert status["count"] == before + 1
    assert status["recent"][0]["reason"].startswith("not_mammography")
    assert status["recent"][0]["sop_uid"] == dcmread(ct_in_mg).SOPInstanceUID
    assert sorted((node.state / "spool").rglob("*.dcm")) == spooled


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_a_hostile_instance_stays_in_the_spool_and_the_node_carries_on(node, tmp_path):
    from pynetdicom import AE

    paths = [
        write_dicom(
            tmp_path / "uids.dcm",
            synthetic_breast(64, 48),
            StudyInstanceUID="../../../escaped",
            SOPInstanceUID="../../escaped/x",
            ImageLaterality="L",
            ViewPosition="CC",
        ),
        write_dicom(
            tmp_path / "huge.dcm", np.zeros((64, 64), np.uint16), Rows=60000, Columns=60000, ImageLaterality="R"
        ),
    ]
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1.2", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DENS")
    assert assoc.is_established
    try:
        answers = [assoc.send_c_store(dcmread(p)) for p in paths]
    finally:
        assoc.release()
    # A path for a StudyInstanceUID is no UID: refused at the door (no SR could name its study); the 60000x60000
    # claim is taken, and its row is an error.
    assert [a.Status for a in answers] == [0xA900, 0]
    assert answers[0].ErrorComment.startswith("invalid_uid: the StudyInstanceUID is no valid UID ('../")
    sop = dcmread(paths[1]).SOPInstanceUID

    def row_of_the_huge_one() -> list[pd.DataFrame]:
        rows = preds(node.state)
        rows = rows[rows[labels.SOP_UID] == sop]
        return [rows] if len(rows) == 1 else []

    rows = wait_for("the huge one's row", row_of_the_huge_one)[0]
    assert rows[labels.STATUS].tolist() == ["error"]  # refused from its header
    assert not [p for up in (*node.state.parents[:4], Path.cwd()) for p in up.glob("escaped*")]
    for path in rows[labels.PATH]:
        assert Path(path).parent.parent == node.state / "spool" and re.fullmatch(r"[0-9a-f]{32}\.dcm", Path(path).name)
    assert echoscu(node.port).returncode == 0  # still answering


def test_the_status_endpoint_and_the_status_command_agree(node):
    live = node.status()
    assert live["node"]["aet"] == "DENS" and live["node"]["address"] == f"127.0.0.1:{node.port}"
    for field in ("queue_depth", "studies_processed", "last_study", "errors", "outbox", "refused"):
        assert field in live
    printed = subprocess.run([*DENS_SERVE, str(node.state), "--status"], capture_output=True, text=True)
    assert printed.returncode == 0, printed.stderr
    offline = json.loads(printed.stdout)
    assert "node" not in offline
    assert offline["instances_received"] == node.status()["instances_received"]


# --- a node killed mid-study, a destination down then up, TLS ---------------------------------------------------


def test_kill_9_mid_study_and_a_destination_down_lose_nothing_and_double_nothing(onnx_model, tmp_path):
    need("storescp")
    received, port = tmp_path / "received", free_port()
    received.mkdir()
    state = tmp_path / "state"
    args = ("--allow-aet", "STORESCU", "--stable-seconds", "1", "--send-to", f"DEST@127.0.0.1:{port}")
    first = Node(state, onnx_model, *args)
    _, files_a = make_study(tmp_path / "a")
    study_b, files_b = make_study(tmp_path / "b", PatientID="P-B")
    assert storescu(first.port, files_a).returncode == 0
    # A is scored and answered; its SR cannot go out (nothing listens at the destination yet).
    wait_for("a failed send of A's SR", lambda: first.status()["outbox"]["retrying"])
    assert storescu(first.port, files_b[:2]).returncode == 0  # half of B: acknowledged, then the node dies
    first.kill()

    destination = subprocess.Popen(
        [need("storescp"), "-aet", "DEST", "+uf", "-od", str(received), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        second = Node(state, onnx_model, *args)
        assert storescu(second.port, files_b[2:]).returncode == 0
        wait_for("both SRs at the destination", lambda: len(list(received.iterdir())) == 2)
        wait_for("an empty outbox", lambda: second.status()["outbox"]["pending"] == 0)
        second.kill()
        third = Node(state, onnx_model, *args)  # restarted with everything acknowledged: nothing goes again
        time.sleep(2.0)
        assert third.status()["outbox"] == {"pending": 0, "sent": 2, "retrying": []}
        assert third.stop() == 0
    finally:
        destination.terminate()
        destination.wait(timeout=30)
    reports = {dcmread(p).StudyInstanceUID: dcmread(p) for p in received.iterdir()}
    assert len(reports) == 2 == len(list(received.iterdir()))  # one SR per study, none twice
    assert referenced(reports[study_b]) == {dcmread(f).SOPInstanceUID for f in files_b}
    assert reports[study_b].CompletionFlag == "COMPLETE"
    rows = preds(state)
    sent = sorted(dcmread(f).SOPInstanceUID for f in files_a + files_b)
    assert sorted(rows[labels.SOP_UID]) == sent  # every acknowledged instance one row, none twice


def self_signed(root: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA) and its key, made by openssl in ``root``."""
    cert, key_ = root / f"{name}.pem", root / f"{name}.key.pem"
    subprocess.run(
        [
            *(need("openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key_), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key_


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("tls"), "cert")


@pytest.fixture(scope="module")
def other_certificate(tmp_path_factory) -> tuple[Path, Path]:
    """Another self-signed certificate for the same address: one ``certificate`` did not sign."""
    return self_signed(tmp_path_factory.mktemp("tls-other"), "other")


def test_tls_when_a_certificate_is_given(onnx_model, certificate, tmp_path):
    cert, key_ = certificate
    tls = Node(
        tmp_path / "state", onnx_model, "--allow-aet", "ECHOSCU", "--tls-cert", str(cert), "--tls-key", str(key_)
    )
    try:
        assert echoscu(tls.port, "ECHOSCU", "+tla", "+cf", str(cert)).returncode == 0
        assert echoscu(tls.port).returncode != 0  # plain DICOM is not spoken there
        from pynetdicom import AE

        context = ssl.create_default_context(cafile=str(cert))
        ae = AE(ae_title="ECHOSCU")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", tls.port, ae_title="DENS", tls_args=(context, "127.0.0.1"))
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()
    finally:
        assert tls.stop() == 0


def storescp_tls(port: int, folder: Path, cert: Path, key_: Path, *peer: str) -> subprocess.Popen:
    """DCMTK's storescp as AE DEST over TLS with ``cert``; ``peer``: how it checks callers' certificates."""
    return subprocess.Popen(
        [need("storescp"), "+tls", str(key_), str(cert), *peer, "-aet", "DEST", "+uf", "-od", str(folder), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_srs_go_over_tls_only_to_a_destination_the_ca_signed(onnx_model, certificate, other_certificate, tmp_path):
    ca, ca_key = certificate  # self-signed: the CA, and the certificate of the real destination
    other, other_key = other_certificate  # the impostor's certificate, and the node's client certificate
    received, port = tmp_path / "received", free_port()
    received.mkdir()
    impostor = storescp_tls(port, received, other, other_key, "-ic")
    destination = None
    tls = ("--send-tls-ca", str(ca), "--send-tls-cert", str(other), "--send-tls-key", str(other_key))
    node = Node(
        tmp_path / "state", onnx_model, "--allow-aet", "STORESCU", "--stable-seconds", "1",
        "--send-to", f"DEST@127.0.0.1:{port}", *tls,
    )  # fmt: skip
    try:
        study, files = make_study(tmp_path / "study")
        assert storescu(node.port, files).returncode == 0
        retrying = wait_for(
            "a send refused for the impostor's certificate", lambda: node.status()["outbox"]["retrying"]
        )
        assert "does not verify against --send-tls-ca" in retrying[0]["last_error"]
        assert list(received.iterdir()) == []  # the impostor got nothing
        impostor.terminate()
        impostor.wait(timeout=30)
        # The real destination, which asks for the node's client certificate (storescp's default -rc) and trusts it.
        destination = storescp_tls(port, received, ca, ca_key, "+cf", str(other))
        wait_for("the SR at the real destination", lambda: list(received.iterdir()))
        outbox = wait_for("an empty outbox", lambda: (o := node.status()["outbox"])["pending"] == 0 and o)
        assert outbox["sent"] == 1 and outbox["retrying"] == []
        assert node.status()["node"]["send_tls"] is True
        assert node.stop() == 0
    finally:
        node.proc.kill()
        for proc in (impostor, destination):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)
    (path,) = received.iterdir()
    assert dcmread(path).StudyInstanceUID == study and dcmread(path).Modality == "SR"


class StowServer:
    """A STOW-RS endpoint on loopback (http.server in a thread) that stores only requests with the right
    ``Authorization`` header and answers 401 to others; over TLS with ``tls`` (certificate, key)."""

    def __init__(self, authorization: str, tls: tuple[Path, Path] | None = None):
        self.stored: list[bytes] = []
        self.refused = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Authorization") != authorization:
                    outer.refused += 1
                    self._answer(401, b"", WWW_Authenticate="Bearer")
                    return
                outer.stored.append(body)
                self._answer(200, b"{}", Content_Type="application/dicom+json")

            def _answer(self, code: int, body: bytes, **headers: str) -> None:
                self.send_response(code)
                for name, value in {**headers, "Content_Length": str(len(body))}.items():
                    self.send_header(name.replace("_", "-"), value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*map(str, tls))
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}/dicom-web/studies"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def instances(self) -> list:
        """The data sets stored (each request's one part)."""
        parts = [body.split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n--", 1)[0] for body in self.stored]
        return [dcmread(io.BytesIO(part)) for part in parts]


def test_stow_with_a_bearer_token_from_the_environment_and_never_shown(onnx_model, tmp_path):
    token = secrets.token_urlsafe(24)
    server = StowServer(f"Bearer {token}")
    state = tmp_path / "state"
    args = ("--allow-aet", "STORESCU", "--stable-seconds", "1", "--stow-url", server.url)
    try:
        first = Node(state, onnx_model, *args)  # no token: the server refuses, the send waits
        study, files = make_study(tmp_path / "study")
        assert storescu(first.port, files).returncode == 0
        retrying = wait_for("a send refused with 401", lambda: first.status()["outbox"]["retrying"])
        assert "HTTP 401" in retrying[0]["last_error"] and server.refused >= 1 and server.stored == []
        assert first.stop() == 0
        second = Node(
            state, onnx_model, *args, "--stow-token-env", "DENS_TEST_STOW_TOKEN", env={"DENS_TEST_STOW_TOKEN": token}
        )
        outbox = wait_for("the SR sent", lambda: (o := second.status()["outbox"])["pending"] == 0 and o)
        assert outbox == {"pending": 0, "sent": 1, "retrying": []}
        live = json.dumps(second.status())
        assert second.status()["node"]["stow_auth"] == "bearer"
        assert second.stop() == 0
    finally:
        server.close()
    assert [ds.StudyInstanceUID for ds in server.instances()] == [study]  # delivered once
    offline = subprocess.run([*DENS_SERVE, str(state), "--status"], capture_output=True, text=True, check=True)
    for shown in (live, offline.stdout, second.log.read_text()):
        assert token not in shown


def test_bad_send_and_stow_options_stop_the_node_before_it_starts(onnx_model, certificate, tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    base = [str(tmp_path / "state"), "--model", str(onnx_model), "--allow-any-aet"]
    dicom, stow = ["--send-to", "DEST@127.0.0.1:104"], ["--stow-url", "https://pacs.example/dicom-web/studies"]
    cases = {
        "cannot use": [*dicom, "--send-tls-ca", str(garbage)],
        "does not exist": [*dicom, "--send-tls-ca", str(tmp_path / "missing.pem")],
        "needs --send-tls-ca": [*dicom, "--send-tls-cert", str(certificate[0]), "--send-tls-key", str(certificate[1])],
        "environment variable DENS_TEST_UNSET is not set": [*stow, "--stow-token-env", "DENS_TEST_UNSET"],
        "--stow-user and --stow-password-env": [*stow, "--stow-user", "dens"],
        "not in clear": ["--stow-url", "http://pacs.example/dicom-web/studies", "--stow-token-env", "HOME"],
        "--stow-ca": [*stow, "--stow-ca", str(garbage)],
    }
    env = {k: v for k, v in os.environ.items() if k != "DENS_TEST_UNSET"}
    # Together (each is an interpreter start): the entry point itself, whose logging set-up stays out of pytest.
    runs = {
        message: subprocess.Popen(
            [*DENS_SERVE, *base, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
        )
        for message, args in cases.items()
    }
    for message, proc in runs.items():
        output = proc.communicate(timeout=WAIT)[0].decode()
        assert proc.returncode == 2, (message, output)
        assert message in " ".join(output.split()), (message, output)
    assert not (tmp_path / "state").exists()


# --- the pieces, without processes ------------------------------------------------------------------------------


def test_a_node_without_an_allow_list_does_not_start():
    with pytest.raises(ValueError, match="--allow-aet"):
        ServeConfig(state=Path("state"))
    assert ServeConfig(state=Path("state"), allow_any=True).host == "127.0.0.1"


def test_peers_parse_and_bad_spellings_are_refused():
    assert Destination.parse("PACS@10.0.0.5:104") == Destination("PACS", "10.0.0.5", 104)
    assert Allowed.parse("PACS@10.0.0.5").admits("PACS", "10.0.0.5")
    assert not Allowed.parse("PACS@10.0.0.5").admits("PACS", "10.0.0.6")
    assert Allowed.parse("PACS").admits("PACS", "192.168.1.1")
    for bad in ("PACS", "PACS@host", "@h:1", "A_TITLE_LONGER_THAN_16@h:1", "PACS@h:0"):
        with pytest.raises(ValueError):
            Destination.parse(bad)


def test_retries_wait_twice_as_long_each_time_up_to_ten_minutes():
    assert [backoff(n, 5.0) for n in (1, 2, 3, 4)] == [5.0, 10.0, 20.0, 40.0]
    assert backoff(30, 5.0) == 600.0


def test_stow_basic_authentication_over_https_checked_against_the_given_ca(
    certificate, other_certificate, tmp_path, monkeypatch
):
    monkeypatch.setenv("DENS_TEST_STOW_PASSWORD", "s3cret:with colon")
    sr = write_dicom(tmp_path / "sr.dcm", synthetic_breast(32, 24))
    server = StowServer("Basic " + base64.b64encode(b"dens:s3cret:with colon").decode(), tls=certificate)

    def how(ca: Path):
        return outgoing(
            ServeConfig(
                state=tmp_path / "state",
                allow_any=True,
                stow_urls=(server.url,),
                stow_user="dens",
                stow_password_env="DENS_TEST_STOW_PASSWORD",
                stow_ca=ca,
            )
        )

    trusted, untrusted = how(certificate[0]), how(other_certificate[0])
    try:
        send_stow(sr, server.url, trusted.stow_tls, trusted.stow_authorization)
        with pytest.raises(SendError, match="HTTP 401") as refused:
            send_stow(sr, server.url, trusted.stow_tls, None)
        with pytest.raises(SendError, match="certificate verify failed"):
            send_stow(sr, server.url, untrusted.stow_tls, untrusted.stow_authorization)
        with pytest.raises(SendError, match="certificate verify failed"):  # the system's CAs did not sign it either
            send_stow(sr, server.url, None, trusted.stow_authorization)
    finally:
        server.close()
    assert len(server.stored) == 1 and server.refused == 1
    assert "s3cret" not in repr(trusted) + str(refused.value)


def spool_bytes(state: State, study_uid: str, sop_uid: str, data: bytes = b"DICM") -> bool:
    """``data`` received as an instance is (a file on the spool's file system, then State.receive_file)."""
    part = state.spool / f".{key('sop', sop_uid)}.part"
    part.write_bytes(data)
    return state.receive_file(study_uid, sop_uid, part)


@pytest.mark.parametrize("uid", ["../../etc/passwd", "1.2/3", "1.2.3\x00", "a" * 500])
def test_spool_names_never_hold_a_character_of_the_uid(tmp_path, uid):
    state = State(tmp_path / "state")
    path = state.spool_path(uid, uid)
    assert path.parent.parent == state.spool and re.fullmatch(r"[0-9a-f]{32}\.dcm", path.name)
    assert path.parent.name == key("study", uid) != key("sop", uid)
    assert spool_bytes(state, uid, uid) and not spool_bytes(state, uid, uid)  # stored once
    assert path.read_bytes() == b"DICM"
    state.close()
    assert os.listdir(tmp_path) == ["state"]


@pytest.mark.slow
def test_the_benchmark_runs_at_toy_settings(tmp_path):
    bench = Path(__file__).resolve().parents[1] / "bench" / "serve.py"
    env = {**os.environ, "DENS_BENCH_RESULTS": str(tmp_path)}
    args = ["--studies", "4", "--size", "64", "--stable-seconds", "0.5", "--seed", "3"]
    done = subprocess.run([sys.executable, str(bench), *args], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (result,) = tmp_path.glob("serve-*.json")
    record = json.loads(result.read_text())
    assert record["checks"]["every_acknowledged_instance_one_row"] and record["checks"]["every_study_exactly_one_sr"]
    assert record["results"]["instances_per_s"] > 0 and record["machine"]["cpu_count"] > 0
