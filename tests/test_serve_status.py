"""dens-serve's status: what it counts (error and skipped rows, refusals by their precise reason), the last
studies and their outcome, and its bearer token. The node runs as a subprocess, started and fed by
tests/test_serve.py's helpers (DCMTK's storescu, echoscu and storescp; pynetdicom for what they cannot send)."""

from __future__ import annotations

import json
import secrets
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from conftest import synthetic_breast, write_dicom
from dens.serve.config import ServeConfig
from test_serve import DENS_SERVE, WAIT, Node, echoscu, exam_call, free_port, make_study, need, storescu, wait_for

TOKEN_ENV = "DENS_TEST_STATUS_TOKEN"


def get(port: int, path: str, authorization: str | None = None) -> tuple[int, dict, dict]:
    """GET ``path`` on the status port: the HTTP status, the JSON body and the headers (errors included)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if authorization is not None:
        request.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response), dict(response.headers)
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read() or b"{}"), dict(refused.headers)


@pytest.fixture(scope="module")
def destination(tmp_path_factory):
    """DCMTK's storescp as AE DEST: the PACS the node's SRs go to."""
    folder, port = tmp_path_factory.mktemp("received"), free_port()
    proc = subprocess.Popen(
        [need("storescp"), "-aet", "DEST", "+uf", "-od", str(folder), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    yield f"DEST@127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def node(onnx_model, destination, tmp_path_factory):
    """A node listening on every address with its status port open (no token), ORTHANC allowed from 127.0.0.1
    only, sending its SRs to ``destination``."""
    state = tmp_path_factory.mktemp("status") / "state"
    allow = ("STORESCU", "ECHOSCU", "PYNETDICOM", "ORTHANC@127.0.0.1")
    running = Node(
        state, onnx_model, "--host", "0.0.0.0", *(a for t in allow for a in ("--allow-aet", t)),
        "--stable-seconds", "1", "--send-to", destination,
    )  # fmt: skip
    yield running
    assert running.stop() == 0, running.log.read_text()[-3000:]


def answered_with(node: Node, study: str, instances: int) -> dict:
    """The study's timeline entry once it is answered with ``instances`` instances."""
    return wait_for(
        f"study {study} answered with {instances} instances",
        lambda: (found := node.answered(study)) and found["instances"] == instances and found,
    )


def test_error_and_skipped_rows_count_in_the_status(node, tmp_path):
    from pynetdicom import AE

    study, files = make_study(tmp_path / "study")
    huge = write_dicom(
        tmp_path / "huge.dcm",
        np.zeros((64, 64), np.uint16),
        Rows=60000,
        Columns=60000,
        ImageLaterality="R",
        StudyInstanceUID=study,
    )
    raw = write_dicom(
        tmp_path / "raw.dcm",
        synthetic_breast(128, 96, seed=9),
        sop_class="1.2.840.10008.5.1.4.1.1.1.2.1",  # For Processing: a skipped row
        ImageLaterality="L",
        ViewPosition="CC",
        StudyInstanceUID=study,
        PresentationIntentType="FOR PROCESSING",
    )
    before = node.status()
    ae = AE(ae_title="PYNETDICOM")  # storescu will not send a header that claims 60000 x 60000 pixels
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1.2", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DENS")
    assert assoc.is_established
    try:
        assert assoc.send_c_store(dcmread(huge)).Status == 0
    finally:
        assoc.release()
    assert storescu(node.port, [*files, raw]).returncode == 0
    answered_with(node, study, 6)
    status = node.status()
    errors = status["errors"]
    assert errors["instances"] == before["errors"]["instances"] + 1
    assert errors["count"] == errors["studies"] + errors["instances"] >= 1
    assert errors["recent_instances"][0]["sop_uid"] == dcmread(huge).SOPInstanceUID
    assert errors["recent_instances"][0]["study_uid"] == study and errors["recent_instances"][0]["reason"]
    assert status["instances"]["error"] == before["instances"]["error"] + 1
    assert status["instances"]["skipped"] == before["instances"]["skipped"] + 1
    assert status["instances"]["ok"] == before["instances"]["ok"] + 4
    mine = next(s for s in status["last_studies"] if s["study_uid"] == study)
    assert mine["images"] == {"ok": 4, "skipped": 1, "error": 1, "unscored": 0}


def test_refused_associations_are_counted_by_their_precise_reason(node):
    from pynetdicom import AE

    before = node.status()["refused"]
    assert echoscu(node.port, "INTRUDER").returncode != 0  # a calling AE title not on the allow-list

    def echo(calling: str, called: str, bind: str = "127.0.0.1"):
        ae = AE(ae_title=calling)
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", node.port, ae_title=called, bind_address=(bind, 0))
        if not assoc.is_established:
            return None
        try:
            return assoc.send_c_echo().Status
        finally:
            assoc.release()

    assert echo("ECHOSCU", "NOTDENS") is None  # an allowed caller, calling the wrong AE title
    assert echo("INTRUDER", "NOTDENS") is None  # both wrong
    assert echo("ORTHANC", "DENS", bind="127.0.0.2") == 0x0124  # an allowed title from another address
    refused = wait_for("four refusals", lambda: (r := node.status()["refused"])["count"] >= before["count"] + 4 and r)
    counted = {
        code: n - before.get("by_reason", {}).get(code, 0)
        for code, n in refused["by_reason"].items()
        if n != before.get("by_reason", {}).get(code, 0)
    }
    assert counted == {
        "calling_aet_not_allowed": 1,
        "called_aet_wrong": 1,
        "calling_and_called_aet_wrong": 1,
        "address_not_allowed": 1,
    }
    recent = {r["reason"].split(":")[0]: r for r in refused["recent"][:4]}
    assert "'NOTDENS'" in recent["called_aet_wrong"]["reason"] and recent["called_aet_wrong"]["calling_aet"] == (
        "ECHOSCU"
    )
    assert "'INTRUDER'" in recent["calling_aet_not_allowed"]["reason"]
    assert "127.0.0.2" in recent["address_not_allowed"]["reason"]
    log = node.log.read_text()
    for code in counted:
        assert code in log


def test_the_last_studies_and_their_outcome(node, destination, tmp_path):
    first, files_a = make_study(tmp_path / "a")
    assert storescu(node.port, files_a).returncode == 0
    answered_with(node, first, 4)
    second, files_b = make_study(tmp_path / "b")
    assert storescu(node.port, files_b).returncode == 0
    answered_with(node, second, 4)
    wait_for(
        "both SRs sent",
        lambda: all(s["state"] == "sent" for u in (first, second) for s in node.answered(u)["sends"]),
    )
    code, status, _ = get(node.status_port, "/status")
    assert code == 200
    uids = [s["study_uid"] for s in status["last_studies"]]
    assert uids.index(second) < uids.index(first)  # the latest first
    latest = status["last_studies"][uids.index(second)]
    assert latest["state"] == "answered" and latest["images"] == {"ok": 4, "skipped": 0, "error": 0, "unscored": 0}
    assert latest["density"] == exam_call(node.state, second)["density"]
    assert latest["sr_uid"] == node.answered(second)["sr_uid"] and latest["error"] is None
    assert latest["first_received"] <= latest["last_received"] <= latest["answered"]
    (send,) = latest["sends"]
    assert send["destination"] == f"dicom:{destination}" and send["state"] == "sent" and send["sent"]
    code, one, _ = get(node.status_port, "/status?studies=1")
    assert code == 200 and [s["study_uid"] for s in one["last_studies"]] == [second]
    assert get(node.status_port, "/status?studies=0")[1]["last_studies"] == []
    code, bad, _ = get(node.status_port, "/status?studies=many")
    assert code == 400 and "studies" in bad["error"]
    printed = subprocess.run([*DENS_SERVE, str(node.state), "--status"], capture_output=True, text=True, timeout=WAIT)
    assert printed.returncode == 0, printed.stderr
    offline = json.loads(printed.stdout)
    assert [s for s in offline["last_studies"] if s["study_uid"] == second] == [latest]


def test_a_status_port_open_beyond_loopback_warns(node):
    status = node.status()
    assert status["node"]["status_auth"] is None
    assert "--status-token-env" in node.log.read_text()  # the warning says how to close it


def test_the_status_port_asks_for_its_token(onnx_model, tmp_path):
    token = secrets.token_urlsafe(24)
    node = Node(
        tmp_path / "state",
        onnx_model,
        "--allow-aet",
        "STORESCU",
        "--status-token-env",
        TOKEN_ENV,
        env={TOKEN_ENV: token},
    )
    try:
        for path in ("/status", "/health", "/nothing"):
            code, body, headers = get(node.status_port, path)
            assert code == 401 and headers["WWW-Authenticate"].startswith("Bearer") and "node" not in body, path
        for wrong in (f"Bearer {token[:-1]}", f"Bearer {token}x", "Bearer ", f"Basic {token}", token):
            code, body, headers = get(node.status_port, "/status", wrong)
            assert code == 401 and "invalid_token" in headers["WWW-Authenticate"] and "node" not in body, wrong
        code, status, _ = get(node.status_port, "/status", f"Bearer {token}")
        assert code == 200 and status["node"]["status_auth"] == "bearer"
        assert get(node.status_port, "/health", f"bearer {token}")[:2] == (200, {"ok": True})
        assert get(node.status_port, "/nothing", f"Bearer {token}")[0] == 404
        shown = json.dumps(status)
    finally:
        assert node.stop() == 0
    log = node.log.read_text()
    assert "--status-token-env" not in log  # on loopback: no warning
    for where in (shown, log, " ".join(node.proc.args)):
        assert token not in where


def test_status_token_options_are_checked_before_the_node_starts(onnx_model, tmp_path):
    base = [str(tmp_path / "state"), "--model", str(onnx_model), "--allow-any-aet"]
    cases = {
        "environment variable DENS_TEST_UNSET is not set": [
            "--status-port",
            "0",
            "--status-token-env",
            "DENS_TEST_UNSET",
        ],
        "--status-token-env needs --status-port": ["--status-token-env", "HOME"],
    }
    for message, args in cases.items():
        done = subprocess.run([*DENS_SERVE, *base, *args], capture_output=True, text=True, timeout=WAIT)
        assert done.returncode == 2, (message, done.stderr)
        assert message in " ".join(done.stderr.split()), (message, done.stderr)
    assert not (tmp_path / "state").exists()
    shown = subprocess.run([*DENS_SERVE, "--help"], capture_output=True, text=True, timeout=WAIT).stdout
    assert "--status-token-env" in shown and "Authorization: Bearer" in " ".join(shown.split())


def test_the_status_token_is_read_from_the_environment_it_names():
    cfg = ServeConfig(state=Path("state"), allow_any=True, status_port=0, status_token_env="DENS_TEST_TOKEN")
    assert cfg.status_token({"DENS_TEST_TOKEN": "s3cret"}) == "s3cret"
    with pytest.raises(ValueError, match="DENS_TEST_TOKEN is not set"):
        cfg.status_token({})
    assert ServeConfig(state=Path("state"), allow_any=True, status_port=0).status_token({}) is None
    assert "s3cret" not in repr(cfg)
