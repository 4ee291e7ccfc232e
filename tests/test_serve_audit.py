"""dens-serve's audit log: one JSON line per event with the documented fields, never pixel data nor a password;
rotated at its size limit keeping N files; a full or unwritable audit path never stops the node; and a flood of
refused connections writes no more than the refusal records' rate limit allows. Nodes run as subprocesses,
started by tests/test_serve.py's helpers; pynetdicom sends and receives."""

from __future__ import annotations

import json
import logging
import re
import secrets
import socket
import time
from pathlib import Path

import pytest

from dens.serve.audit import MAX_TEXT, AuditLog
from dens.serve.scp import DROPPED_PER_S
from dens.serve.state import State
from test_serve import Node, free_port, make_study, wait_for
from test_serve_metrics import Destination, get, samples, send, value

TOKEN_ENV, PASSWORD_ENV = "DENS_TEST_AUDIT_TOKEN", "DENS_TEST_AUDIT_PASSWORD"
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
# Each event's fields besides time and event, as dens.serve.audit's docstring and the README document them.
FIELDS = {
    "node_started": {"aet", "address", "tls", "destinations", "allow", "model", "model_sha256", "dens_version",
                     "drift_reference"},
    "node_stopped": {"failed"},
    "association_accepted": {"peer", "calling_aet", "called_aet", "more"},
    "association_refused": {"peer", "calling_aet", "called_aet", "code", "reason", "more"},
    "connection_refused": {"peer", "calling_aet", "code", "reason", "more"},
    "study_received": {"study_uid", "instances", "unscored", "peers", "first_received"},
    "study_scored": {"study_uid", "density", "breasts", "p_dense", "images", "manufacturer", "manufacturer_model",
                     "sr_uid", "model_sha256"},
    "sr_sent": {"study_uid", "sr_uid", "destination", "kind", "outcome", "attempt"},
    "sr_failed": {"study_uid", "sr_uid", "destination", "kind", "outcome", "attempt", "error", "retry_in"},
}  # fmt: skip


def events(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def destination():
    running = Destination()
    yield running
    running.server.shutdown()


def test_the_audit_log_records_refusals_studies_and_sends(onnx_model, destination, tmp_path):
    password, token = secrets.token_urlsafe(12), secrets.token_urlsafe(12)
    audit = tmp_path / "logs" / "audit.jsonl"
    node = Node(
        tmp_path / "state", onnx_model, "--allow-aet", "PYNETDICOM@127.0.0.1", "--stable-seconds", "1",
        "--send-to", f"DEST@127.0.0.1:{destination.port}",
        "--stow-url", f"http://127.0.0.1:{free_port()}/dicom-web/studies", "--stow-user", "orthanc",
        "--stow-password-env", PASSWORD_ENV, "--status-token-env", TOKEN_ENV, "--audit-log", str(audit),
        env={PASSWORD_ENV: password, TOKEN_ENV: token},
    )  # fmt: skip
    try:
        study, files = make_study(tmp_path / "study", Manufacturer="ACME", ManufacturerModelName="Mammo 1")
        assert send(node.port, files, aet="INTRUDER") is None  # a wrong calling AE title
        assert send(node.port, files) == [0, 0, 0, 0]
        wait_for("the SR at the destination", lambda: destination.sr_of(study))
        wait_for("a failed STOW-RS", lambda: '"sr_failed"' in audit.read_text() and '"sr_sent"' in audit.read_text())
        with socket.create_connection(("127.0.0.1", node.port), source_address=("127.0.0.2", 0)) as s:
            s.settimeout(10)
            assert s.recv(1) == b""  # no allowed title names 127.0.0.2: closed before a byte of DICOM
    finally:
        assert node.stop() == 0, node.log.read_text()[-3000:]
    found = events(audit)
    kinds = [e["event"] for e in found]
    assert kinds[0] == "node_started" and kinds[-1] == "node_stopped" and found[-1]["failed"] is None
    for e in found:
        assert ISO_UTC.match(e["time"]), e
        assert set(e) - {"time", "event"} == FIELDS[e["event"]], e
    by = {k: [e for e in found if e["event"] == k] for k in FIELDS}
    (refused,) = by["association_refused"]
    assert refused["peer"] == "127.0.0.1" and refused["calling_aet"] == "INTRUDER" and refused["called_aet"] == "DENS"
    assert refused["code"] == "calling_aet_not_allowed" and refused["reason"].startswith("calling_aet_not_allowed: ")
    (connection,) = by["connection_refused"]
    assert connection["peer"] == "127.0.0.2" and connection["code"] == "address_not_allowed"
    assert connection["calling_aet"] is None
    accepted = by["association_accepted"]
    assert {(a["peer"], a["calling_aet"], a["called_aet"]) for a in accepted} == {("127.0.0.1", "PYNETDICOM", "DENS")}
    (received,) = by["study_received"]
    assert received["study_uid"] == study and received["instances"] == 4 and received["unscored"] == 4
    assert received["peers"] == ["PYNETDICOM@127.0.0.1"] and ISO_UTC.match(received["first_received"])
    (scored,) = by["study_scored"]
    assert scored["study_uid"] == study and scored["density"] in "ABCD" and set(scored["breasts"]) == {"L", "R"}
    assert scored["density"] == max(scored["breasts"].values())  # the denser breast sets the exam's call
    assert scored["images"] == {"ok": 4, "skipped": 0, "error": 0}
    assert (scored["manufacturer"], scored["manufacturer_model"]) == ("ACME", "Mammo 1")
    assert (
        re.fullmatch(r"[0-9a-f]{64}", scored["model_sha256"])
        and scored["sr_uid"] == destination.sr_of(study).SOPInstanceUID
    )
    (sent,) = by["sr_sent"]
    assert sent["destination"] == f"dicom:DEST@127.0.0.1:{destination.port}" and sent["kind"] == "dicom"
    assert sent["outcome"] == "sent" and sent["attempt"] == 1 and sent["study_uid"] == study
    failed = by["sr_failed"][0]
    assert failed["kind"] == "stow" and failed["outcome"] == "retry" and failed["attempt"] == 1 and failed["error"]
    assert failed["destination"].startswith("stow:http://127.0.0.1:") and failed["retry_in"] > 0
    text = audit.read_text()
    assert password not in text and token not in text
    assert max(len(line) for line in text.splitlines()) < 2000  # no pixel data: a few fields a line
    assert audit.stat().st_mode & 0o077 == 0  # it names studies and peers: the owner's only


def test_the_audit_log_rotates_at_its_size_and_keeps_n_files(tmp_path):
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, max_bytes=2000, keep=3)
    for i in range(200):
        audit.write("study_received", study_uid=f"1.2.{i}", instances=4)
    audit.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"audit.jsonl{s}" for s in ("", ".1", ".2", ".3")]
    numbers = []
    for name in ("audit.jsonl.3", "audit.jsonl.2", "audit.jsonl.1", "audit.jsonl"):  # oldest first
        assert (tmp_path / name).stat().st_size <= 2000
        numbers += [int(e["study_uid"].rsplit(".", 1)[1]) for e in events(tmp_path / name)]
    assert numbers == list(range(numbers[0], 200)) and numbers[0] > 0  # in order, the oldest gone
    assert (tmp_path / "audit.jsonl.1").stat().st_size > 2000 - 200  # rotated at the limit, not before it
    current = events(path)
    AuditLog(path, max_bytes=2000, keep=3).write("node_started", aet="DENS")  # appends to what is there
    assert events(path)[:-1] == current and events(path)[-1]["event"] == "node_started"


def test_a_long_or_secret_field_is_cut_and_redacted(tmp_path):
    audit = AuditLog(tmp_path / "audit.jsonl")
    audit.write("sr_failed", destination="stow:https://user:s3cret@pacs/dicom-web", error="x" * 5000 + "\n\x00")
    (line,) = events(tmp_path / "audit.jsonl")
    assert line["destination"] == "stow:https://***@pacs/dicom-web" and len(line["error"]) == MAX_TEXT
    assert "s3cret" not in (tmp_path / "audit.jsonl").read_text()


@pytest.mark.parametrize("where", ["/dev/full", "file/audit.jsonl"])
def test_an_audit_log_that_cannot_be_written_costs_one_error_line(where, tmp_path, caplog):
    (tmp_path / "file").write_text("a file, not a folder")
    errors = []
    audit = AuditLog(Path(where) if where.startswith("/") else tmp_path / where, on_error=lambda: errors.append(1))
    with caplog.at_level(logging.INFO, logger="dens.serve.audit"):
        for _ in range(5):
            audit.write("node_started", aet="DENS")  # never raises
    assert len(errors) == 5
    assert [r.levelname for r in caplog.records] == ["ERROR"] and "audit log" in caplog.records[0].getMessage()


def test_a_cut_line_is_ended_before_the_next(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_text('{"time": "2026-01-01T00:00:00.000Z", "event": "node_sta')  # a full disk cut it short
    AuditLog(path).write("node_started", aet="DENS")
    assert json.loads(path.read_text().splitlines()[-1])["event"] == "node_started"


def test_a_full_audit_disk_does_not_stop_the_node(onnx_model, destination, tmp_path):
    token = secrets.token_urlsafe(12)
    node = Node(
        tmp_path / "state", onnx_model, "--allow-aet", "PYNETDICOM", "--stable-seconds", "0.5",
        "--send-to", f"DEST@127.0.0.1:{destination.port}", "--audit-log", "/dev/full",
        "--status-token-env", TOKEN_ENV, env={TOKEN_ENV: token},
    )  # fmt: skip
    try:
        study, files = make_study(tmp_path / "study")
        assert send(node.port, files) == [0, 0, 0, 0]
        wait_for("the SR at the destination", lambda: destination.sr_of(study))
        found = samples(get(node.status_port, "/metrics", token)[1])
        assert value(found, "dens_serve_audit_write_errors_total") >= 4  # started, accepted, received, scored
    finally:
        assert node.stop() == 0, node.log.read_text()[-3000:]
    assert node.log.read_text().count("cannot write the audit log /dev/full") == 1


def test_a_flood_of_refused_connections_writes_no_more_than_the_rate_limit(onnx_model, tmp_path):
    token = secrets.token_urlsafe(12)
    audit = tmp_path / "state" / "audit.jsonl"  # the default: in the state folder
    node = Node(
        tmp_path / "state", onnx_model, "--allow-aet", "PYNETDICOM@127.0.0.1",
        "--status-token-env", TOKEN_ENV, env={TOKEN_ENV: token},
    )  # fmt: skip
    flood = 300
    try:
        start = time.monotonic()
        for _ in range(flood):
            with socket.create_connection(("127.0.0.1", node.port), source_address=("127.0.0.2", 0)) as s:
                s.settimeout(10)
                s.recv(1)
        elapsed = time.monotonic() - start
        time.sleep(1.1)  # a new second: the next refusal is written, saying how many were not
        with socket.create_connection(("127.0.0.1", node.port), source_address=("127.0.0.2", 0)) as s:
            s.settimeout(10)
            s.recv(1)

        def counted() -> dict | None:
            found = samples(get(node.status_port, "/metrics", token)[1])
            refused = value(found, "dens_serve_refused_total", what="connection", code="address_not_allowed")
            return found if refused >= flood + 1 else None

        found = wait_for("every refusal counted", counted)
        assert value(found, "dens_serve_refused_total", what="connection", code="address_not_allowed") == flood + 1
    finally:
        assert node.stop() == 0, node.log.read_text()[-3000:]
    written = [e for e in events(audit) if e["event"] == "connection_refused"]
    bound = DROPPED_PER_S * (int(elapsed) + 3)
    assert 0 < len(written) <= bound < flood, (len(written), elapsed)
    assert sum(1 + e["more"] for e in written) == flood + 1  # each one written, or counted by the next written
    state = State(tmp_path / "state", read_only=True)
    try:
        assert state.read("SELECT COUNT(*) FROM refused")[0][0] == len(written)  # the same limit as the state's
    finally:
        state.close()
    last = written[-1]
    assert last["more"] > 0 and last["reason"].endswith(f"(and {last['more']} more like it before)")
