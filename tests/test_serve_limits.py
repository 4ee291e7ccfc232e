"""dens-serve at its limits: the status page against a browser on the same machine (DNS rebinding), against
clients that open connections and never finish them, and who sees what of it; no URL's password shown, logged
or stored; a state folder whose disk is full (a C-STORE refused with 0xA700 and a comment, the node going on)
and one that is read-only (``dens-serve STATE --status`` reads it). Nodes are started by tests/test_serve.py's
helpers; the disk-full test mounts a small tmpfs where it may (as root, as CI runs) and skips, saying why,
where it may not."""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from dens import labels
from dens.serve.config import ServeConfig, redact
from dens.serve.send import Sender
from dens.serve.state import State, StateWriteError, key
from dens.serve.status import COUNTS, FULL, LOCAL, snapshot, view
from dens.serve.statusport import MAX_CONNECTIONS, MAX_PER_PEER, REQUEST_SECONDS
from test_serve import DENS_SERVE, WAIT, Node, echoscu, make_study, preds, wait_for
from test_serve_status import TOKEN_ENV

PASSWORD = "S3cretPass"
STOW = f"http://orthanc:{PASSWORD}@127.0.0.1:9/dicom-web/studies"  # port 9: nothing answers


def get(port: int, host_header: str | None = None, path: str = "/status", bind: str = "127.0.0.1", **headers):
    """GET ``path`` on 127.0.0.1:``port`` from ``bind`` with this Host header: the HTTP status and the body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(bind, 0))
    try:
        conn.putrequest("GET", path, skip_host=True)
        conn.putheader("Host", host_header if host_header is not None else f"127.0.0.1:{port}")
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


@pytest.fixture(scope="module")
def node(onnx_model, tmp_path_factory):
    """A node on loopback, its status without a token."""
    state = tmp_path_factory.mktemp("limits") / "state"
    running = Node(state, onnx_model, "--allow-aet", "STORESCU", "--send-to", "DEST@127.0.0.1:9")
    yield running
    assert running.stop() == 0, running.log.read_text()[-3000:]


# --- the status page ----------------------------------------------------------------------------------------


def test_the_status_refuses_a_host_header_that_names_another_host(node):
    port = node.status_port
    for good in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST.:{port}", f"[::1]:{port}"):
        assert get(port, good)[0] == 200, good
    for bad in ("evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}", "127.0.0.1:1", ""):
        code, body = get(port, bad)
        assert code == 421 and "Host" in body["error"] and "instances" not in body, bad
    assert get(port, "evil.example", "/health")[0] == 421
    assert "evil.example" in node.log.read_text()


def test_without_a_token_the_status_shows_no_configuration(node):
    code, status = get(node.status_port)
    assert code == 200 and status["view"] == LOCAL
    assert not {"allow", "state", "destinations"} & set(status["node"])
    assert str(node.state) not in json.dumps(status) and "STORESCU" not in json.dumps(status)


def test_a_token_holder_sees_all_and_a_client_from_elsewhere_counts_only(onnx_model, tmp_path):
    token = "t0ken-" + os.urandom(8).hex()
    node = Node(
        tmp_path / "state", onnx_model, "--allow-aet", "STORESCU", "--status-token-env", TOKEN_ENV,
        env={TOKEN_ENV: token},
    )  # fmt: skip
    try:
        code, status = get(node.status_port, Authorization=f"Bearer {token}")
        assert code == 200 and status["view"] == FULL and status["node"]["allow"] == ["STORESCU"]
        assert status["node"]["state"] == str((tmp_path / "state").resolve())
        assert get(node.status_port, "evil.example", Authorization=f"Bearer {token}")[0] == 421
    finally:
        assert node.stop() == 0
    # A client from another machine, without a token, gets the counts only: no UID, call, title or message.
    study, _ = make_study(tmp_path / "study")
    state = State(tmp_path / "other")
    try:
        state.register(study, "1.2.3.4", tmp_path / "x.dcm", "STORESCU", "10.0.0.5")
        state.refuse("INTRUDER", "10.0.0.6", "calling_aet_not_allowed: 'INTRUDER' is not allowed", "1.2.3.4")
        doc = snapshot(state, {"aet": "DENS", "allow": ["STORESCU"], "state": "/var/lib/dens", "tls": False})
    finally:
        state.close()
    shown = json.dumps(view(doc, COUNTS))
    assert view(doc, COUNTS)["instances_received"] == 1 and view(doc, COUNTS)["refused"]["count"] == 1
    for secret in (study, "1.2.3.4", "INTRUDER", "10.0.0.6", "STORESCU", "/var/lib/dens"):
        assert secret not in shown and secret in json.dumps(view(doc, FULL)), secret


def _threads(pid: int) -> int:
    return int(
        next(
            line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Threads")
        ).split()[1]
    )


def test_the_status_answers_while_hundreds_of_half_sent_requests_are_held(node):
    port = node.status_port
    before = _threads(node.proc.pid)
    held: list[socket.socket] = []
    busy = 0
    try:
        for i in range(300):  # from one address: each sends half a request and waits
            s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0))
            held.append(s)
            if i < MAX_PER_PEER:
                s.sendall(b"GET /status HTTP/1.1\r\nHost: 127.0.0.1")
            else:  # beyond its address's share: refused at once
                busy += s.recv(200).startswith(b"HTTP/1.1 503")
        assert busy == 300 - MAX_PER_PEER
        t0 = time.monotonic()
        assert get(port)[0] == 200  # a real request still answers, at once
        assert time.monotonic() - t0 < 5
        assert _threads(node.proc.pid) <= before + MAX_PER_PEER + 2
        # From many addresses: at most MAX_CONNECTIONS open in all; beyond them, 503 at once, never a hang.
        for i in range(MAX_CONNECTIONS // MAX_PER_PEER + 1):
            for _ in range(MAX_PER_PEER):
                s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(f"127.0.1.{i + 1}", 0))
                s.sendall(b"GET /status HTTP/1.1\r\n")
                held.append(s)
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.2.1", 0)) as s:
            assert s.recv(200).startswith(b"HTTP/1.1 503") and time.monotonic() - t0 < 5
        assert _threads(node.proc.pid) <= before + MAX_CONNECTIONS + 2
    finally:
        for s in held:
            s.close()
    wait_for("the status to answer again", lambda: get(port)[0] == 200)


def test_a_request_trickled_a_byte_at_a_time_is_cut_off(node):
    request = b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Pad: " + b"a" * 200
    with socket.create_connection(("127.0.0.1", node.status_port), timeout=5) as s:
        t0 = time.monotonic()
        for i, byte in enumerate(request):  # bounded: a byte every 0.25 s, well under any per-read timeout
            try:
                s.sendall(bytes([byte]))
            except OSError:  # the node closed it
                break
            time.sleep(0.25)
            if time.monotonic() - t0 > REQUEST_SECONDS + 10:
                pytest.fail(f"the connection was still open after {i} bytes in {time.monotonic() - t0:.0f} s")
        assert REQUEST_SECONDS - 1 < time.monotonic() - t0 < REQUEST_SECONDS + 5
    assert get(node.status_port)[0] == 200


# --- secrets ------------------------------------------------------------------------------------------------


def test_a_url_password_is_refused_on_the_command_line_and_never_shown(tmp_path):
    with pytest.raises(ValueError, match="no credentials in the URL") as refused:
        ServeConfig(state=tmp_path / "state", allow_any=True, stow_urls=(STOW,))
    assert PASSWORD not in str(refused.value) and "***@127.0.0.1" in str(refused.value)
    done = subprocess.run(
        [*DENS_SERVE, str(tmp_path / "state"), "--allow-any-aet", "--stow-url", STOW],
        capture_output=True, text=True, timeout=WAIT,
    )  # fmt: skip
    assert done.returncode == 2 and "--stow-user" in done.stderr and PASSWORD not in done.stderr + done.stdout
    assert redact(f"stow:https://u:p@ss@h:1/x?a=b@c {STOW}") == (
        "stow:https://***@h:1/x?a=b@c http://***@127.0.0.1:9/dicom-web/studies"
    )


def test_an_outbox_entry_with_a_url_password_is_sent_logged_and_shown_without_it(tmp_path, caplog):
    """A state whose outbox names a URL with a password (written before such URLs were refused)."""
    folder = tmp_path / "state"
    state = State(folder)
    sr = tmp_path / "sr.dcm"
    sr.write_bytes(b"not sent anyway")
    study_key = key("study", "1.2.3")
    state.register("1.2.3", "1.2.3.4", tmp_path / "x.dcm")
    (_, generation, _) = state.snapshot(study_key)
    assert state.answer(study_key, generation, "1.2.3.9", sr, "B", [f"stow:{STOW}"])
    sender = Sender(state, "DENS", 60.0)
    with caplog.at_level(logging.INFO, logger="dens.serve.send"):
        sender.start()
        wait_for("a failed send", lambda: state.read("SELECT attempts FROM outbox")[0][0] >= 1)
        sender.stop()
    stored = state.read("SELECT last_error FROM outbox")[0][0]
    live = json.dumps(snapshot(state, {"destinations": [f"stow:{STOW}"]}))
    state.close()
    printed = subprocess.run([*DENS_SERVE, str(folder), "--status"], capture_output=True, text=True, timeout=WAIT)
    assert printed.returncode == 0, printed.stderr
    assert "***@127.0.0.1:9" in caplog.text and "***@127.0.0.1:9" in printed.stdout
    for shown in (caplog.text, stored, live, printed.stdout):
        assert PASSWORD not in shown


# --- a full disk, a read-only folder ------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(where: Path, size: str):
    """A tmpfs of ``size`` mounted at ``where`` (skips, saying why, where that is not allowed)."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root (CI runs as root); never filling the real disk instead")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs at {where} ({done.stderr.strip()})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(folder: Path, leave: int) -> Path:
    """A file that takes all but ``leave`` bytes of ``folder``'s file system."""
    filler = folder / "filler"
    with open(filler, "ab") as f:
        st = os.statvfs(folder)
        grow = st.f_bavail * st.f_frsize - leave
        if grow > 0:
            f.write(b"\0" * grow)
    return filler


def store(port: int, path: Path):
    """C-STORE one file as STORESCU: its status data set (None when no association)."""
    from pynetdicom import AE

    ds = dcmread(path)
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="DENS")
    if not assoc.is_established:
        return None
    try:
        return assoc.send_c_store(ds)
    finally:
        assoc.release()


def test_a_full_disk_refuses_c_stores_with_a_comment_and_the_node_goes_on(onnx_model, tmp_path):
    with tmpfs(tmp_path / "state", "3m") as folder:
        node = Node(folder, onnx_model, "--allow-aet", "STORESCU", "--allow-aet", "ECHOSCU", "--stable-seconds", "1")
        try:
            study, files = make_study(tmp_path / "study")
            more = [make_study(tmp_path / f"more{i}", StudyInstanceUID=study, views=[("L", f"V{i}")])[1][0]
                    for i in range(12)]  # fmt: skip
            size = files[0].stat().st_size
            refused, stored = [], []
            # Room for the instance's file, and from one to 16 pages beyond: SQLite's commit fails, then succeeds.
            for path, leave in zip([*files, *more], range(4096, 17 * 4096, 4096), strict=True):
                filler = fill(folder, size + leave)
                status = store(node.port, path)
                assert status is not None and "Status" in status, leave
                assert status.Status in (0x0000, 0xA700), (leave, hex(status.Status))
                if status.Status == 0xA700:
                    assert status.ErrorComment.startswith("cannot store: "), leave
                    refused.append(path)
                else:
                    stored.append(path)
                filler.unlink()
                assert node.proc.poll() is None, node.log.read_text()[-3000:]
            assert refused, "no C-STORE was refused: the disk was never full"
            filler = fill(folder, 0)  # full while the study is quiet: scoring waits, the node stays up
            time.sleep(3)
            assert node.proc.poll() is None and echoscu(node.port).returncode == 0
            filler.unlink()
            for path in refused:  # the sender sends them again, once there is room
                assert store(node.port, path).Status == 0x0000
            wait_for("the study answered", lambda: (a := node.answered(study)) and a["instances"] == len(files) + 12)
            rows = preds(folder)
            assert len(rows) == len(files) + 12 == rows[labels.PATH].nunique()  # one row each, none twice
        finally:
            code = node.stop()
        log = node.log.read_text()
        assert code == 0, log[-3000:]
        assert "no space left for the state database" in log and "the quiet studies wait" in log
        for crash in ("Exception in thread", "sqlite3.", "StateWriteError"):  # no thread died of the full disk
            assert crash not in log, log[log.index(crash) - 2000 :]


def test_a_disk_that_fills_while_an_instance_streams_in_refuses_it_and_keeps_the_association(onnx_model, tmp_path):
    """No room for the instance: its stream fails, the C-STORE gets 0xA700 with a comment, the same association's
    next C-STORE is answered, and no thread dies of it (closing a file whose buffer cannot be flushed fails too)."""
    from pynetdicom import AE

    with tmpfs(tmp_path / "state", "3m") as folder:
        node = Node(folder, onnx_model, "--allow-aet", "STORESCU", "--stable-seconds", "1")
        try:
            _, files = make_study(tmp_path / "study")
            filler = fill(folder, 0)
            ae = AE(ae_title="STORESCU")
            datasets = [dcmread(p) for p in files[:2]]
            ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
            assoc = ae.associate("127.0.0.1", node.port, ae_title="DENS")
            assert assoc.is_established
            try:
                statuses = [assoc.send_c_store(ds) for ds in datasets]
                for status in statuses:
                    assert "Status" in status and status.Status == 0xA700, status
                    assert status.ErrorComment.startswith("cannot store: "), status
                assert assoc.is_established
            finally:
                assoc.release()
            filler.unlink()
            assert store(node.port, files[0]).Status == 0x0000  # once there is room, it is taken
        finally:
            code = node.stop()
        log = node.log.read_text()
        assert code == 0, log[-3000:]
        assert "Exception in thread" not in log, log[log.index("Exception in thread") - 2000 :]
        assert "No space left" in log


def test_a_state_write_that_cannot_be_made_raises_and_leaves_the_state_usable(tmp_path):
    with tmpfs(tmp_path / "state", "1m") as folder:
        state = State(folder)
        try:
            spool = tmp_path / "a.dcm"
            with pytest.raises(StateWriteError) as full:
                for i in range(100_000):  # bounded: the 1 MiB file system fills long before
                    state.register("1.2", f"1.2.{i}", spool, "STORESCU" * 200, "x" * 2000)
            assert full.value.strerror == "no space left for the state database"
            before = state.read("SELECT COUNT(*) FROM instances")[0][0]
            state.refuse("X", "127.0.0.1", "calling_aet_not_allowed: X")  # logged only, never raised
            subprocess.run(["mount", "-o", "remount,size=8m", str(folder)], check=True)  # room again
            assert state.register("1.2", "1.2.new", spool)  # the failed transaction left nothing open
            assert state.read("SELECT COUNT(*) FROM instances")[0][0] == before + 1
        finally:
            state.close()


@pytest.fixture
def read_only_state(tmp_path):
    """A state folder as a node killed mid-run leaves it (its WAL not checkpointed, no shared-memory file),
    made read-only: remounted so as root, its permissions otherwise."""
    live = tmp_path / "live"
    state = State(live)
    study, _ = make_study(tmp_path / "study")
    state.register(study, "1.2.3.4", live / "x.dcm", "STORESCU", "127.0.0.1")
    copy = tmp_path / "ro"
    with contextlib.ExitStack() as stack:
        if os.geteuid() == 0:
            stack.enter_context(tmpfs(copy, "1m"))
        else:
            copy.mkdir()
        for name in ("serve.db", "serve.db-wal"):
            shutil.copyfile(live / name, copy / name)
        state.close()
        if os.geteuid() == 0:
            subprocess.run(["mount", "-o", "remount,ro", str(copy)], check=True)
        else:
            copy.chmod(0o555)
        yield copy, study
        if os.geteuid() != 0:
            copy.chmod(0o755)


def test_the_status_command_reads_a_read_only_state_folder(read_only_state):
    folder, study = read_only_state
    printed = subprocess.run([*DENS_SERVE, str(folder), "--status"], capture_output=True, text=True, timeout=WAIT)
    assert printed.returncode == 0, printed.stderr
    status = json.loads(printed.stdout)
    assert status["instances_received"] == 1 and status["last_studies"][0]["study_uid"] == study
    assert sorted(p.name for p in folder.iterdir()) == ["serve.db", "serve.db-wal"]  # nothing written there


@pytest.mark.parametrize("uid", ["1.02.3", "1.2.abc"])
def test_an_instance_whose_study_uid_is_invalid_is_refused_at_the_door_not_failed_at_every_start(
    onnx_model, tmp_path, uid
):
    """No SR can name a study whose UID is not valid: the node refuses its instances with the reason, and keeps
    nothing that would fail (and be retried) at every start."""
    node = Node(tmp_path / "state", onnx_model, "--allow-aet", "STORESCU", "--stable-seconds", "1")
    try:
        _, files = make_study(tmp_path / "study", StudyInstanceUID=uid)
        status = store(node.port, files[0])
        assert status is not None and status.Status == 0xA900, status
        assert status.ErrorComment.startswith(f"invalid_uid: the StudyInstanceUID is no valid UID ({uid!r}")
        time.sleep(2)  # past the quiet window: nothing to score
    finally:
        code = node.stop()
    assert code == 0
    state = State(tmp_path / "state")
    assert state.read("SELECT COUNT(*) FROM studies")[0][0] == 0
    assert state.read("SELECT COUNT(*) FROM instances")[0][0] == 0
    assert "invalid_uid" in node.log.read_text()
