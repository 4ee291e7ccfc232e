"""dens-serve against hostile peers on loopback: a silent or half-spoken TLS connection, idle and trickling
connections from one address, a PDU announcing 500 MiB, and instances larger than the node accepts. Each test
runs a live node (test_serve's Node) and stops its peers itself; every loop is bounded."""

from __future__ import annotations

import gc
import select
import socket
import ssl
import struct
import threading
import time
from pathlib import Path

import numpy as np
from pydicom import dcmread

from conftest import write_dicom
from test_serve import Node, certificate, echoscu  # noqa: F401 (certificate: a fixture)

HALF_HELLO = b"\x16\x03\x01\x02\x00" + b"\x01\x00\x01\xfc\x03\x03" + bytes(8)  # a ClientHello's first bytes
DEADLINE = 5.0  # dens.serve.transport.ASSOCIATE_SECONDS
GRACE = 5.0  # what a loaded 2-core machine may add to it


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    s = socket.socket()
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def watch(sockets: list[socket.socket], seconds: float, trickle: bool = False) -> dict[socket.socket, float]:
    """When the node closed each socket (seconds from now; absent if it did not within ``seconds``), sending
    one byte to each every half second when ``trickle``."""
    start, closed = time.monotonic(), {}
    while len(closed) < len(sockets) and time.monotonic() - start < seconds:
        open_ = [s for s in sockets if s not in closed]
        if trickle:
            for s in open_:
                try:
                    s.send(b"\x00")
                except OSError:
                    closed[s] = time.monotonic() - start
        readable, _, _ = select.select([s for s in open_ if s not in closed], [], [], 0.5)
        for s in readable:
            try:
                if not s.recv(65536):
                    closed[s] = time.monotonic() - start
            except OSError:
                closed[s] = time.monotonic() - start
    return closed


def memory(pid: int) -> dict[str, int]:
    """The process's current and peak resident memory (VmRSS, VmHWM) in bytes."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {
        k: int(v.split()[0]) << 10 for k, _, v in (line.partition(":") for line in lines) if k in ("VmRSS", "VmHWM")
    }


def reset_peak(pid: int) -> int:
    """Reset the process's peak resident memory to its current one (Linux's clear_refs); that value."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return memory(pid)["VmHWM"]


def tls_echo(port: int, cert: Path) -> bool:
    from pynetdicom import AE

    ae = AE(ae_title="PYNETDICOM")
    ae.connection_timeout = ae.acse_timeout = ae.network_timeout = 15
    ae.add_requested_context("1.2.840.10008.1.1")
    context = ssl.create_default_context(cafile=str(cert))
    assoc = ae.associate("127.0.0.1", port, ae_title="DENS", tls_args=(context, "127.0.0.1"))
    try:
        return assoc.is_established and assoc.send_c_echo().Status == 0
    finally:
        assoc.release()


def test_a_silent_or_half_hello_tls_connection_does_not_stop_a_tls_echo(onnx_model, certificate, tmp_path):  # noqa: F811
    cert, key_ = certificate
    node = Node(
        tmp_path / "state", onnx_model, "--allow-aet", "PYNETDICOM", "--tls-cert", str(cert), "--tls-key", str(key_)
    )
    attackers = [connect(node.port) for _ in range(3)]
    try:
        attackers[0].sendall(HALF_HELLO)
        time.sleep(0.5)  # the attackers are accepted first
        start = time.monotonic()
        assert tls_echo(node.port, cert)
        assert time.monotonic() - start < DEADLINE  # not after the attackers' deadline: beside them
        closed = watch(attackers, DEADLINE + GRACE)
        assert len(closed) == len(attackers), "the node kept a silent TLS connection past its deadline"
    finally:
        for s in attackers:
            s.close()
        assert node.stop() == 0
    log = node.log.read_text()
    assert log.count(f"tls_failed: no TLS handshake within {DEADLINE:g} s") == len(attackers), log[-3000:]


def test_idle_and_trickling_connections_from_one_peer_take_neither_every_slot_nor_long(onnx_model, tmp_path):
    node = Node(tmp_path / "state", onnx_model, "--allow-aet", "ECHOSCU", "--max-peer-connections", "4")
    idle = [connect(node.port, "127.0.0.3") for _ in range(4)]
    trickling = [connect(node.port, "127.0.0.2") for _ in range(20)]  # an A-ASSOCIATE-RQ, a byte at a time
    try:
        for s in trickling:
            s.send(b"\x01\x00\x00\x00\x00\xc8")  # a header announcing 200 bytes, then a byte every half second
        start = time.monotonic()
        echo = echoscu(node.port, "ECHOSCU")
        assert echo.returncode == 0, echo.stdout + echo.stderr
        assert time.monotonic() - start < DEADLINE
        closed = {**watch(trickling, DEADLINE + GRACE, trickle=True), **watch(idle, DEADLINE + GRACE)}
        assert len(closed) == len(trickling) + len(idle), "the node kept a connection past its deadline"
        # the trickling peer's others are closed at once (it holds 4), or reset by the kernel (the listen queue)
        assert sum(1 for s in trickling if closed[s] < DEADLINE / 2) >= 12
    finally:
        for s in trickling + idle:
            s.close()
        assert node.stop() == 0
    log = node.log.read_text()
    assert log.count("too_many_connections: 127.0.0.2 already holds 4") >= 8, log[-3000:]  # 8 a second at most
    assert log.count("slow: the A-ASSOCIATE-RQ did not arrive whole") == 4, log[-3000:]
    assert log.count("idle: no A-ASSOCIATE-RQ within") == 4, log[-3000:]
    assert "calling_aet_not_allowed" not in log  # the allow-list is not blamed for what it did not do


def test_a_500_mib_pdu_from_a_stranger_is_refused_from_its_header(onnx_model, tmp_path):
    node = Node(tmp_path / "state", onnx_model, "--allow-aet", "ECHOSCU")
    baseline = reset_peak(node.proc.pid)
    attacker = connect(node.port)
    attacker.settimeout(10)
    sent, chunk = 0, bytes(1 << 20)
    try:
        attacker.sendall(b"\x01\x00" + struct.pack(">L", 500 << 20))
        while sent < 64 << 20:  # the body, as far as the node takes it
            attacker.sendall(chunk)
            sent += len(chunk)
    except OSError:
        pass
    finally:
        attacker.close()
    try:
        assert sent < 64 << 20, "the node read on into a 500 MiB PDU"
        assert echoscu(node.port, "ECHOSCU").returncode == 0
        grew = memory(node.proc.pid)["VmHWM"] - baseline
        assert grew < 16 << 20, f"the node grew by {grew >> 20} MiB"
    finally:
        assert node.stop() == 0
    assert "pdu_too_large: a PDU of 524288000 bytes announced" in node.log.read_text()


def store(port: int, path: Path):
    """C-STORE ``path`` to the node as PYNETDICOM: the response's status."""
    from pynetdicom import AE

    ae = AE(ae_title="PYNETDICOM")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    ds = dcmread(path)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="DENS")
    assert assoc.is_established
    try:
        return assoc.send_c_store(ds)
    finally:
        assoc.release()


def test_instances_stream_to_the_spool_and_one_over_the_limit_is_refused_with_its_reason(onnx_model, tmp_path):
    mib = 1 << 20
    fits = write_dicom(tmp_path / "fits.dcm", np.full((4096, 4096), 7, np.uint16))  # 32 MiB of pixels
    over = write_dicom(tmp_path / "over.dcm", np.full((4096, 8192), 7, np.uint16))  # 64 MiB
    node = Node(tmp_path / "state", onnx_model, "--allow-aet", "PYNETDICOM", "--max-instance-mib", "48")
    try:
        baseline = reset_peak(node.proc.pid)
        assert store(node.port, fits).Status == 0
        grew = memory(node.proc.pid)["VmHWM"] - baseline
        assert grew < 16 * mib, f"the node grew by {grew // mib} MiB receiving a 32 MiB instance"
        refused = store(node.port, over)
        assert refused.Status == 0xA700
        assert refused.ErrorComment.startswith("instance_too_large: 64.0 MiB, over --max-instance-mib 48")
    finally:
        assert node.stop() == 0
    spooled = [p for p in (tmp_path / "state" / "spool").rglob("*") if p.is_file()]
    assert len(spooled) == 1  # the one that fits, nothing of the other, no temporary left
    assert dcmread(spooled[0]).PixelData == dcmread(fits).PixelData
    assert "instance_too_large" in node.log.read_text()


def test_a_flood_of_refused_connections_runs_no_garbage_collection_per_connection(monkeypatch):
    """pynetdicom's accept loop collects garbage every 60 turns: a peer reconnecting 1,500 times a second made
    that 25 full collections a second, each holding every thread of the node. The node's server collects on a
    clock (dens.serve.transport.GC_SECONDS) instead."""
    from pynetdicom import AE

    from dens.serve import transport

    collections_run = []
    monkeypatch.setattr(gc, "collect", lambda *a: collections_run.append(a) or 0)  # pynetdicom's calls too
    ae = AE(ae_title="DENS")
    ae.add_supported_context("1.2.840.10008.1.1")
    server = ae.make_server(("127.0.0.1", 0), server_class=transport.Server)
    ae._servers.append(server)  # as AE.start_server does (and StorageSCP.start): shutdown() takes it out
    server.addresses = frozenset({"192.0.2.1"})  # no loopback peer is allowed: each connection refused at accept
    dropped = []
    server.dropped = lambda address, reason: dropped.append(reason)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        for _ in range(240):
            connect(server.server_address[1]).close()
        deadline = time.monotonic() + 30
        while len(dropped) < 240 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(dropped) == 240 and all(r.startswith("address_not_allowed") for r in dropped)
        assert collections_run == []  # pynetdicom's own loop would have run 4
    finally:
        server.shutdown()
