"""dens-serve's scheduled pull (``--pull``) against a real PACS: Orthanc (Debian packages orthanc, and
orthanc-dicomweb for its DICOMweb plugin) on loopback ports, loaded with a small dens-synth cohort through its
REST API; the node runs as a subprocess (tests/test_serve.py's helpers) and sends its SRs to a pynetdicom
storage SCP that keeps every one it gets. A DICOMweb pull answers each study once with the rows a folder run of
dens-infer gives, and later polls fetch nothing; kill -9 mid-poll and after an SR still gives one SR per study
and one row per instance; C-FIND with C-MOVE does the same; a study dated today waits until it stops growing;
a PACS that is down fails polls, not the node. Each test skips, naming the package, where Orthanc or its
plugin is not installed."""

from __future__ import annotations

import datetime as dt
import json
import secrets
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from pydicom import dcmread
from pydicom.uid import generate_uid

from conftest import synthetic_breast, write_dicom
from dens import labels
from dens.serve.cli import main as serve_main
from dens.serve.config import ServeConfig, parse_duration
from dens.serve.node import recover
from dens.serve.pull import Growth
from dens.serve.state import State, key
from pacs import free_port, need_dicomweb, orthanc, orthanc_holding, pacs_ports, rest, wait_for
from test_serve import VIEWS, Node, preds
from test_serve_metrics import Destination, get, samples, value

TOKEN_ENV = "DENS_TEST_PULL_TOKEN"
PROBABILITIES = [*labels.PROB_COLUMNS, labels.P_DENSE]


def sop_uids(files) -> list[str]:
    return sorted(str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files)


def study_of_today(folder: Path) -> tuple[str, list[Path]]:
    """A screening study (one file per view) dated today: its StudyInstanceUID and its files."""
    folder.mkdir(parents=True)
    study, today = generate_uid(), dt.date.today().strftime("%Y%m%d")
    files = [
        write_dicom(
            folder / f"{side}{view}.dcm",
            synthetic_breast(128, 96, seed=i),
            ImageLaterality=side,
            ViewPosition=view,
            StudyInstanceUID=study,
            StudyDate=today,
            PatientID="P-GROWING",
        )
        for i, (side, view) in enumerate(VIEWS)
    ]
    return study, files


@pytest.fixture(scope="module")
def cohort(synthetic_cohort) -> Path:
    """Three synthetic screening studies, four views each, dated years ago."""
    return synthetic_cohort(3, seed=5)


@pytest.fixture(scope="module")
def studies(cohort) -> dict[str, list[str]]:
    """The cohort's SOP Instance UIDs by study."""
    found: dict[str, list[str]] = {}
    for path in sorted(cohort.rglob("*.dcm")):
        ds = dcmread(path, stop_before_pixels=True)
        found.setdefault(str(ds.StudyInstanceUID), []).append(str(ds.SOPInstanceUID))
    return found


@pytest.fixture(scope="module")
def ports() -> dict[str, int]:
    return pacs_ports()


@pytest.fixture(scope="module")
def pacs(cohort, ports, tmp_path_factory) -> str:
    """Orthanc holding the cohort, with the node (AE title DENS, on the test's move port) among its modalities."""
    with orthanc_holding(tmp_path_factory.mktemp("orthanc"), ports, sorted(cohort.rglob("*.dcm"))) as url:
        yield url


@pytest.fixture(scope="module")
def folder_rows(cohort, onnx_model, tmp_path_factory) -> pd.DataFrame:
    """dens-infer's rows for the cohort's folder: what a pull of the same files must give."""
    from dens.infer import InferConfig
    from dens.infer.runner import run

    out = tmp_path_factory.mktemp("folder") / "preds.csv"
    run(InferConfig(cohort, out, model=onnx_model, progress=False))
    rows = pd.read_csv(out, dtype=str, keep_default_na=False)
    return rows[rows[labels.SOP_UID] != ""]  # the cohort's images (not its train.csv and metadata)


@pytest.fixture
def destination():
    running = Destination()
    yield running
    running.server.shutdown()


def pulling_node(state: Path, model: Path, source: str, destination: Destination, *args: str) -> Node:
    """A node pulling ``source`` every second (studies of the last 20000 days), with a status token
    (``node.token``), its SRs to ``destination``."""
    token = secrets.token_hex(12)
    node = Node(
        state, model, "--allow-aet", "STORESCU", "--stable-seconds", "1", "--send-to",
        f"DEST@127.0.0.1:{destination.port}", "--pull", source, "--pull-every", "1s", "--pull-since", "20000d",
        "--status-token-env", TOKEN_ENV, *args, env={TOKEN_ENV: token},
    )  # fmt: skip
    node.token = token
    return node


def status(node: Node) -> dict:
    code, body, _ = get(node.status_port, "/status", node.token)
    assert code == 200, body
    return json.loads(body)


def metrics(node: Node) -> dict:
    return samples(get(node.status_port, "/metrics", node.token)[1])


def srs(destination: Destination) -> dict[str, set[str]]:
    """The SR instance UIDs the destination received, by study (an SR sent again has its UID again)."""
    found: dict[str, set[str]] = {}
    for ds in list(destination.received):
        found.setdefault(str(ds.StudyInstanceUID), set()).add(str(ds.SOPInstanceUID))
    return found


def audit(state: Path, event: str) -> list[dict]:
    lines = (state / "audit.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == event]


def assert_same_rows(pulled: pd.DataFrame, folder: pd.DataFrame) -> None:
    """The rows of a folder run but for their path, by SOP Instance UID: every cell equal, probabilities to
    float noise."""
    a = pulled.set_index(labels.SOP_UID).sort_index().drop(columns=[labels.PATH])
    b = folder.set_index(labels.SOP_UID).sort_index().drop(columns=[labels.PATH])
    assert list(a.index) == list(b.index) and len(a) > 0
    pd.testing.assert_frame_equal(a.drop(columns=PROBABILITIES), b.drop(columns=PROBABILITIES))
    assert (a[labels.STATUS] == "ok").all()
    np.testing.assert_allclose(a[PROBABILITIES].astype(float), b[PROBABILITIES].astype(float), atol=2e-6)


def test_a_dicomweb_pull_answers_each_study_once_as_a_folder_run_and_later_polls_fetch_nothing(
    pacs, studies, folder_rows, onnx_model, destination, tmp_path
):
    need_dicomweb()
    state = tmp_path / "state"
    node = pulling_node(state, onnx_model, f"{pacs}/dicom-web", destination)
    try:
        wait_for("an SR per study", lambda: set(srs(destination)) == set(studies))
        wait_for("the exam CSV", lambda: (state / "preds.exam.csv").is_file())
        polled = value(metrics(node), "dens_serve_pull_polls_total", outcome="ok")
        wait_for(
            "two more polls", lambda: value(metrics(node), "dens_serve_pull_polls_total", outcome="ok") >= polled + 2
        )
        found, shown = metrics(node), status(node)
    finally:
        asked = time.monotonic()
        assert node.stop() == 0, node.log.read_text()[-3000:]
    assert time.monotonic() - asked < 15  # polling every second, it stops as promptly as a node that does not
    assert_same_rows(preds(state), folder_rows)
    assert Counter(str(ds.StudyInstanceUID) for ds in destination.received) == dict.fromkeys(studies, 1)
    # Dated years ago: taken at the first poll, whole; the later polls leave the answered studies alone.
    assert value(found, "dens_serve_pull_instances_total", outcome="fetched") == sum(map(len, studies.values()))
    assert value(found, "dens_serve_pull_instances_total", outcome="failed") == 0
    assert value(found, "dens_serve_pull_polls_total", outcome="failed") == 0
    polls = audit(state, "pull_poll")
    assert polls[0]["instances"]["fetched"] == 12 and polls[0]["studies"]["pulled"] == 3
    assert all(p["instances"]["fetched"] == 0 for p in polls[1:]) and len(polls) >= 3
    assert polls[-1]["studies"] == {"found": 3, "answered": 3, "waiting": 0, "pulled": 0, "held": 0}
    pull = shown["pull"]
    assert pull["source"] == f"{pacs}/dicom-web" and pull["polls"]["failed"] == 0 and pull["next_poll"]
    assert pull["last_poll"]["outcome"] == "ok" and pull["last_poll"]["instances"]["fetched"] == 0
    received = audit(state, "study_received")
    assert {r["study_uid"] for r in received} == set(studies)
    assert all(r["peers"] == ["DICOMWEB@127.0.0.1"] for r in received)
    assert not (state / "spool" / ".pulled").exists()


def test_kill_9_mid_poll_and_after_an_sr_still_answer_each_study_once(pacs, studies, onnx_model, destination, tmp_path):
    need_dicomweb()
    state = tmp_path / "state"
    source = f"{pacs}/dicom-web"

    def spooled() -> int:
        if not (state / "serve.db").is_file():
            return 0
        held = State(state, read_only=True)
        try:
            return held.read("SELECT COUNT(*) FROM instances")[0][0]
        finally:
            held.close()

    first = pulling_node(state, onnx_model, source, destination)
    wait_for("the first pulled study", spooled, every=0.01)
    first.kill()  # mid-poll: the other studies are on their way
    after_kill = spooled()
    assert after_kill % 4 == 0  # a study is handed over whole or not at all
    second = pulling_node(state, onnx_model, source, destination)
    wait_for("an SR", lambda: destination.received, every=0.01)
    second.kill()
    third = pulling_node(state, onnx_model, source, destination)
    try:
        wait_for("an SR per study", lambda: set(srs(destination)) == set(studies))
        wait_for("an empty outbox", lambda: status(third)["outbox"]["pending"] == 0)
    finally:
        assert third.stop() == 0, third.log.read_text()[-3000:]
    assert all(len(uids) == 1 for uids in srs(destination).values())  # one SR per study (a resend is the same)
    rows = preds(state)
    assert sorted(rows[labels.SOP_UID]) == sorted(u for uids in studies.values() for u in uids)
    assert set(rows[labels.STATUS]) == {"ok"}
    held = State(state, read_only=True)
    try:
        timeline = held.timeline()
    finally:
        held.close()
    assert sorted((s["study_uid"], s["instances"]) for s in timeline) == sorted((s, 4) for s in studies)


def test_a_c_find_c_move_pull_answers_each_study_once(
    pacs, ports, studies, folder_rows, onnx_model, destination, tmp_path
):
    state = tmp_path / "state"
    source = f"dicom://ORTHANC@127.0.0.1:{ports['dicom']}"
    node = pulling_node(state, onnx_model, source, destination, "--pull-move-port", str(ports["move"]))
    try:
        wait_for("an SR per study", lambda: set(srs(destination)) == set(studies))
        wait_for("the exam CSV", lambda: (state / "preds.exam.csv").is_file())
        shown = status(node)
    finally:
        assert node.stop() == 0, node.log.read_text()[-3000:]
    assert_same_rows(preds(state), folder_rows)
    assert all(len(uids) == 1 for uids in srs(destination).values())
    pull = shown["pull"]
    assert (pull["source"], pull["retrieve"], pull["ae_title"]) == (source, "move", "DENS")
    assert all(r["peers"] == ["ORTHANC@127.0.0.1"] for r in audit(state, "study_received"))


def test_a_pacs_down_fails_polls_not_the_node_and_a_study_still_growing_waits(onnx_model, destination, tmp_path):
    need_dicomweb()
    http, dicom = free_port(), free_port()
    state = tmp_path / "state"
    node = pulling_node(state, onnx_model, f"http://127.0.0.1:{http}/dicom-web", destination, "--stable-seconds", "3")
    try:
        failed = wait_for("a failed poll", lambda: status(node)["pull"]["polls"]["failed"] and status(node))
        assert "cannot connect" in failed["pull"]["last_poll"]["error"]
        assert get(node.status_port, "/health", node.token)[0] == 200
        study, files = study_of_today(tmp_path / "study")
        (tmp_path / "orthanc").mkdir()
        with orthanc(tmp_path / "orthanc", http, dicom) as url:
            for f in files[:2]:
                rest(f"{url}/instances", f.read_bytes())

            def waiting() -> bool:
                last = status(node)["pull"]["last_poll"]
                return last["outcome"] == "ok" and last["studies"]["waiting"] == 1

            wait_for("a poll to find the study growing", waiting, every=0.05)
            for f in files[2:]:  # within --stable-seconds of the poll that saw two instances
                rest(f"{url}/instances", f.read_bytes())
            wait_for("the study's SR", lambda: srs(destination).get(study), timeout=60)
            found = metrics(node)
    finally:
        assert node.stop() == 0, node.log.read_text()[-3000:]
    assert sorted(preds(state)[labels.SOP_UID]) == sop_uids(files)  # pulled once, whole
    fetched = [p for p in audit(state, "pull_poll") if p["instances"]["fetched"]]
    assert [p["instances"]["fetched"] for p in fetched] == [4]
    assert value(found, "dens_serve_pull_polls_total", outcome="failed") >= 1
    assert any(p["outcome"] == "failed" and "cannot connect" in p["error"] for p in audit(state, "pull_poll"))
    assert "failed: " in node.log.read_text() and "tried again at the next poll" in node.log.read_text()


def test_a_study_dated_today_is_ready_once_its_count_holds_for_the_quiet_time():
    growth = Growth(stable_seconds=10)
    assert not growth.ready("1.2", 2, now=0)  # first seen
    assert not growth.ready("1.2", 2, now=5)  # the same count, too soon
    assert not growth.ready("1.2", 3, now=11)  # it grew: the clock starts again
    assert not growth.ready("1.2", 3, now=20)
    assert growth.ready("1.2", 3, now=21)
    assert not growth.ready("1.3", 4, now=21)  # each study its own
    growth.keep(["1.3"])
    assert not growth.ready("1.2", 3, now=40)  # forgotten: seen anew
    at_once = Growth(stable_seconds=0)
    assert not at_once.ready("1.2", 1, now=0)  # two polls, whatever the quiet time
    assert at_once.ready("1.2", 1, now=0.5)


def test_a_pulled_study_enters_the_spool_whole_and_recover_clears_what_a_kill_left(tmp_path, make_dicom, breast):
    state = State(tmp_path / "state")
    try:
        study, sops = "1.2.3", ["1.2.3.1", "1.2.3.2"]
        pulled = state.spool / ".pulled" / study
        pulled.mkdir(parents=True)
        files = {}
        for sop in sops:
            path = make_dicom(breast(64, 48), StudyInstanceUID=study, SOPInstanceUID=sop)
            files[sop] = path.rename(pulled / f"{sop}.dcm")
        assert state.receive_study(study, files, "DICOMWEB", "pacs") == sops
        folder = state.spool / key("study", study)
        assert sorted(p.name for p in folder.iterdir()) == sorted(f"{key('sop', s)}.dcm" for s in sops)
        assert state.receive_study(study, files, "DICOMWEB", "pacs") == []  # held already: nothing again
        assert state.answered([study, "9.9"]) == set()
        # A kill between a study's folder renamed into place and its record: recover() finds it whole; what was
        # on its way in (a pull's files, a folder put together) is removed.
        lost = "1.2.4"
        folder = state.spool / key("study", lost)
        folder.mkdir()
        for sop in ("1.2.4.1", "1.2.4.2"):
            make_dicom(breast(64, 48), StudyInstanceUID=lost, SOPInstanceUID=sop).rename(state.spool_path(lost, sop))
        (state.spool / ".pulled" / "1.2.5" / "1.2.5.1").mkdir(parents=True)
        (state.spool / ".pulled" / "1.2.5" / "1.2.5.1" / "1.2.5.1.1.dcm").write_bytes(b"half")
        (state.spool / f".{key('study', '1.2.6')}.stage").mkdir()
        assert recover(state) == 2
        assert state.knows("1.2.4.1") and state.knows("1.2.4.2")
        assert sorted(p.name for p in state.spool.iterdir() if p.name.startswith(".")) == []
    finally:
        state.close()


def test_bad_pull_options_are_refused_before_the_node_starts(onnx_model, tmp_path):
    base = {"state": tmp_path / "state", "allow_any": True}
    cases = {
        "no credentials in the URL": {"pull": "https://user:s3cret@pacs.example.org/dicom-web"},
        "a DICOMweb base URL": {"pull": "ftp://pacs.example.org/"},
        "expected dicom://CALLED_AET@HOST:PORT": {"pull": "dicom://PACS@pacs.example.org"},
        "DIMSE authenticates by AE title": {"pull": "dicom://PACS:s3cret@pacs.example.org:104"},
        "--pull-since, --pull-modality: options of a scheduled pull": {"pull_since": "7d", "pull_modality": "MG"},
        "--pull-since '2w'": {"pull": "https://pacs/dicom-web", "pull_since": "2w"},
        "--pull-query StudyDate: set it with --pull-since": {
            "pull": "https://pacs/dicom-web",
            "pull_query": ("StudyDate=20260101",),
        },
        "--pull-retrieve: DIMSE options": {"pull": "https://pacs/dicom-web", "pull_retrieve": "get"},
        "--pull-ae-title": {"pull": "dicom://PACS@10.0.0.5:104", "pull_ae_title": "A\\B"},
        "--pull-move-port 11112 is the node's --port": {
            "pull": "dicom://PACS@10.0.0.5:104",
            "pull_move_port": 11112,
            "port": 11112,
        },
        "credentials go to https:// URLs only": {
            "pull": "http://pacs/dicom-web", "pull_user": "u", "pull_password_env": "HOME",
        },
        "--pull-every must be at least 1 s": {"pull": "https://pacs/dicom-web", "pull_every": 0.5},
    }  # fmt: skip
    for message, options in cases.items():
        with pytest.raises(ValueError) as caught:
            ServeConfig(**base, **options)
        assert message in str(caught.value), (message, str(caught.value))
        assert "s3cret" not in str(caught.value)
    cfg = ServeConfig(**base, pull="dicom://PACS@10.0.0.5:104", aet="DENS1")
    assert cfg.pull_access().calling_aet == "DENS1"  # the node's own AE title by default
    web = ServeConfig(**base, pull="https://pacs/dicom-web", max_instance_mib=64)
    assert web.pull_access().max_answer_mib == 64  # a pulled instance is held to a C-STORE'd one's limit
    assert (parse_duration("30s"), parse_duration("10m"), parse_duration("1.5h")) == (30, 600, 5400)
    for wrong in ("10", "5x", "m", "-1m"):
        with pytest.raises(ValueError, match="a duration"):
            parse_duration(wrong)
    args = [str(tmp_path / "state"), "--model", str(onnx_model), "--allow-any-aet", "--pull", "https://pacs/dw"]
    done = CliRunner().invoke(serve_main, [*args, "--pull-every", "10 minutes"])
    assert done.exit_code == 2 and "a duration" in done.output
    assert not (tmp_path / "state").exists()
    help_text = " ".join(CliRunner().invoke(serve_main, ["--help"]).output.split())
    assert "same at two polls --stable-seconds apart" in help_text  # the growing-study rule, said where IT looks


def test_the_status_never_shows_a_pull_secret_and_keeps_a_dicom_ae_title():
    from dens.serve.config import redact

    assert redact("dicom://PACS@10.0.0.5:104") == "dicom://PACS@10.0.0.5:104"
    assert redact("dicom://PACS:pw@10.0.0.5:104") == "dicom://***@10.0.0.5:104"
    assert redact("see https://u:pw@pacs/dicom-web") == "see https://***@pacs/dicom-web"


def test_a_study_whose_uid_no_sr_could_name_is_left_on_the_pacs(tmp_path, caplog):
    """As a C-STORE'd instance with such a StudyInstanceUID is refused, a pulled study with one (a leading zero:
    digits and dots, but not a valid UID) is not fetched, and the log says why."""
    import threading

    from dens.pull import Query
    from dens.serve.audit import AuditLog
    from dens.serve.metrics import Metrics
    from dens.serve.pull import Poller
    from test_pull_hostile import FakeDicomWeb

    server = FakeDicomWeb("1.02.3", [], {})
    cfg = ServeConfig(tmp_path / "state", allow_any=True, pull=server.url)
    state = State(tmp_path / "state")
    try:
        poller = Poller(cfg, state, Metrics(), AuditLog(tmp_path / "audit.jsonl"), threading.Event())
        with caplog.at_level("WARNING", logger="dens.serve.pull"):
            assert poller._search(Query(study_date="20000101-")) == []
        assert "1 study left on the PACS: no valid StudyInstanceUID ('1.02.3')" in caplog.text
    finally:
        state.close()
