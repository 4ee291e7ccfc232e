"""dens-serve's Prometheus metrics (``GET /metrics`` on the status port): behind the status token as the full
status is, and moving as a real study goes through a live node: pynetdicom sends the study, a pynetdicom
storage SCP takes the SR, a destination that is down makes the sends fail and retry, a caller with a wrong AE
title is refused. The node runs as a subprocess, started by tests/test_serve.py's helpers."""

from __future__ import annotations

import http.client
import math
import secrets
import threading
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread

from dens.serve.metrics import Metrics
from test_serve import Node, free_port, make_study, spool_bytes, wait_for

TOKEN_ENV = "DENS_TEST_METRICS_TOKEN"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR, what the node sends
MAMMO = "1.2.840.10008.5.1.4.1.1.1.2"


def get(port: int, path: str, token: str | None = None, host: str | None = None) -> tuple[int, str, dict]:
    """GET ``path`` on the status port with this bearer token and Host header: status, body and headers."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_host=True)
        conn.putheader("Host", host or f"127.0.0.1:{port}")
        if token is not None:
            conn.putheader("Authorization", f"Bearer {token}")
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read().decode(), dict(response.getheaders())
    finally:
        conn.close()


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """The samples of a Prometheus text page, by name and labels."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: dict, name: str, **labels) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


class Destination:
    """A pynetdicom storage SCP as AE DEST: the PACS the node's SRs go to; ``received``: the data sets."""

    def __init__(self) -> None:
        from pynetdicom import AE, evt

        self.received: list = []
        self._lock = threading.Lock()
        ae = AE(ae_title="DEST")
        ae.add_supported_context(SR_CLASS, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = self.server.server_address[1]

    def _store(self, event) -> int:
        with self._lock:
            self.received.append(event.dataset)
        return 0

    def sr_of(self, study: str):
        with self._lock:
            return next((ds for ds in self.received if ds.StudyInstanceUID == study), None)


def send(port: int, files, aet: str = "PYNETDICOM", called: str = "DENS") -> list[int] | None:
    """C-STORE ``files`` with pynetdicom as ``aet``; their statuses, or None when the association is refused."""
    from pynetdicom import AE

    ae = AE(ae_title=aet)
    ae.add_requested_context(MAMMO, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return None
    try:
        return [assoc.send_c_store(dcmread(f)).Status for f in files]
    finally:
        assoc.release()


@pytest.fixture(scope="module")
def destination():
    running = Destination()
    yield running
    running.server.shutdown()


@pytest.fixture(scope="module")
def node(onnx_model, destination, tmp_path_factory):
    """A node with a status token, sending its SRs to ``destination`` and to an AE that is down."""
    token = secrets.token_urlsafe(24)
    state = tmp_path_factory.mktemp("metrics") / "state"
    running = Node(
        state, onnx_model, "--allow-aet", "PYNETDICOM", "--stable-seconds", "1",
        "--send-to", f"DEST@127.0.0.1:{destination.port}", "--send-to", f"DOWN@127.0.0.1:{free_port()}",
        "--status-token-env", TOKEN_ENV, env={TOKEN_ENV: token},
    )  # fmt: skip
    running.token = token
    yield running
    assert running.stop() == 0, running.log.read_text()[-3000:]


def test_metrics_are_behind_the_status_token(node):
    for token in (None, node.token[:-1], "x"):
        code, body, headers = get(node.status_port, "/metrics", token)
        assert code == 401 and "dens_serve" not in body and headers["WWW-Authenticate"].startswith("Bearer"), token
    code, body, _ = get(node.status_port, "/metrics", node.token, host="evil.example")
    assert code == 421 and "dens_serve" not in body  # the status' Host check holds for /metrics too
    code, body, headers = get(node.status_port, "/metrics", node.token)
    assert code == 200 and headers["Content-Type"].startswith("text/plain; version=")
    for name in ("instances_received_total", "refused_total", "studies_scored_total", "sr_sends_total",
                 "decode_seconds", "model_seconds", "study_scored_seconds", "study_sent_seconds", "queue_studies",
                 "queue_instances", "drift_reference_dense_share", "audit_write_errors_total"):  # fmt: skip
        help_line = next(line for line in body.splitlines() if line.startswith(f"# HELP dens_serve_{name} "))
        assert len(help_line) > len(f"# HELP dens_serve_{name} ") + 20, help_line  # it says what it means


def test_a_study_through_the_node_moves_the_counters(node, destination, tmp_path):
    before = samples(get(node.status_port, "/metrics", node.token)[1])
    study, files = make_study(tmp_path / "study", Manufacturer="ACME", ManufacturerModelName="Mammo 1")
    assert send(node.port, files) == [0, 0, 0, 0]
    assert send(node.port, files[:1]) == [0]  # sent again: acknowledged, not stored twice
    assert send(node.port, files, aet="INTRUDER") is None  # not on the allow-list
    wait_for("the SR at the destination", lambda: destination.sr_of(study))

    def moved() -> dict | None:
        found = samples(get(node.status_port, "/metrics", node.token)[1])
        sent = value(found, "dens_serve_sr_sends_total", kind="dicom", outcome="sent")
        retried = value(found, "dens_serve_sr_retries_total", kind="dicom")
        failed = value(found, "dens_serve_sr_sends_total", kind="dicom", outcome="failed")
        done = sent > value(before, "dens_serve_sr_sends_total", kind="dicom", outcome="sent")
        # A retry is counted as it starts, its failure once it has failed: wait for both.
        failed_twice = failed >= value(before, "dens_serve_sr_sends_total", kind="dicom", outcome="failed") + 2
        return (
            found
            if done and failed_twice and retried > value(before, "dens_serve_sr_retries_total", kind="dicom")
            else None
        )

    after = wait_for("the SR sent and the send to the AE that is down retried, and failed again", moved)

    def delta(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("dens_serve_instances_received_total") == 4
    assert delta("dens_serve_instances_duplicate_total") == 1
    assert delta("dens_serve_instances_scored_total", status="ok") == 4
    assert delta("dens_serve_studies_scored_total", outcome="assessed") == 1
    assert sum(delta("dens_serve_exam_calls_total", density=c) for c in "ABCD") == 1
    assert delta("dens_serve_refused_total", what="association", code="calling_aet_not_allowed") == 1
    assert delta("dens_serve_decode_seconds_count") == 4 and delta("dens_serve_decode_seconds_sum") > 0
    assert delta("dens_serve_model_seconds_count") >= 1 and delta("dens_serve_model_images_total") == 4
    assert delta("dens_serve_study_scored_seconds_count") == 1
    assert delta("dens_serve_study_scored_seconds_sum") >= 1  # the quiet time (--stable-seconds 1) at least
    assert delta("dens_serve_sr_sends_total", kind="dicom", outcome="sent") == 1
    assert delta("dens_serve_sr_sends_total", kind="dicom", outcome="failed") >= 2  # DOWN, tried and retried
    assert delta("dens_serve_study_sent_seconds_count", kind="dicom") == 1
    assert value(after, "dens_serve_queue_studies") == 0 and value(after, "dens_serve_queue_instances") == 0
    assert value(after, "dens_serve_outbox_pending") >= 1  # the SR for DOWN, retried until it answers
    assert value(after, "dens_serve_drift_exams", manufacturer="ACME", manufacturer_model="Mammo 1") == 1
    assert math.isnan(value(after, "dens_serve_drift_reference_dense_share"))  # a model without a card
    assert value(after, "dens_serve_audit_write_errors_total") == 0
    text = get(node.status_port, "/metrics", node.token)[1]
    assert study not in text and "127.0.0.1" not in text and "INTRUDER" not in text  # no UID, address or title


def test_without_a_status_token_there_are_no_metrics_nor_drift(onnx_model, tmp_path):
    node = Node(tmp_path / "state", onnx_model, "--allow-aet", "PYNETDICOM")
    try:
        code, body, _ = get(node.status_port, "/metrics")
        assert code == 403 and "--status-token-env" in body and "dens_serve" not in body
        status = node.status()
        assert status["view"] == "local" and "drift" not in status
    finally:
        assert node.stop() == 0


def test_two_nodes_in_one_process_count_apart():
    one, two = Metrics(), Metrics()
    one.instances_received.inc(3)
    one.refusal("connection", "idle: no A-ASSOCIATE-RQ within 5 s")
    one.refusal("association", "not a code: from a sender\nwith a newline")
    assert value(samples(one.render().decode()), "dens_serve_instances_received_total") == 3
    assert value(samples(two.render().decode()), "dens_serve_instances_received_total") == 0
    found = samples(one.render().decode())
    assert value(found, "dens_serve_refused_total", what="connection", code="idle") == 1
    assert value(found, "dens_serve_refused_total", what="association", code="other") == 1  # no label from outside
    assert not [m for m in REGISTRY.collect() if m.name.startswith("dens_serve")]  # never the global registry


def test_metrics_read_the_queue_from_the_state(tmp_path):
    from dens.serve.state import State

    state = State(tmp_path / "state")
    try:
        spool_bytes(state, "1.2.3", "1.2.3.4")
        spool_bytes(state, "1.2.3", "1.2.3.5")
        metrics = Metrics()
        metrics.watch(state, started=1.5e9)
        found = samples(metrics.render().decode())
    finally:
        state.close()
    assert value(found, "dens_serve_queue_studies") == 1 and value(found, "dens_serve_queue_instances") == 2
    assert value(found, "dens_serve_outbox_pending") == 0 and value(found, "dens_serve_start_time_seconds") == 1.5e9
    assert not Path(tmp_path / "state" / "audit.jsonl").exists()
