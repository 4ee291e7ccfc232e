"""dens-serve against hostile peers: a real study through the node while each attack runs, and without one.

    python bench/serve_hostile.py [--stable-seconds 2] [--big-mib 512] [--connections 32] [--arch resnet18]

Two nodes run as subprocesses (plain DICOM, and DICOM over TLS), each sending its SRs to a receiving SCP in
this process. For each scenario a new four-view study (dens-synth, as bench/serve.py makes them) is sent by an
allowed caller on 127.0.0.1 over one association, ``--lead-seconds`` after the attack started (longer than the
node's 5 s deadline, so the attack is in its steady state) and while it goes on, from 127.0.0.2 (another peer):

* quiet, quiet_tls: no attack (the baselines);
* idle: ``--connections`` connections that send nothing, those the node closes reopened twice a second;
* trickle: as many connections sending an A-ASSOCIATE-RQ one byte every half second;
* pdu_500mib: connections announcing a 500 MiB A-ASSOCIATE-RQ and streaming its body, one after the other;
* oversized_instance: an allowed caller sending ``--big-mib`` MiB instances (over ``--max-instance-mib``,
  which is set to half of it), one after the other;
* silent_tls, half_hello_tls: against the TLS node, connections that send nothing, or a ClientHello's first
  bytes only.

Measured per scenario: the study's SR latency (first C-STORE sent to its SR received; it includes the quiet
window ``--stable-seconds``), its ratio to the quiet run of the same node, the node process's peak RSS while
the scenario ran (Linux's clear_refs resets the peak before each) and its growth over the RSS before, and the
study's instances lost (sent but not acknowledged with exactly one row in preds.csv). Writes
bench/results/serve_hostile-<host>-<time>.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import select
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pandas as pd
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from common import export_models, shown, write_result
from dens import labels
from dens.serve.scp import MAMMOGRAPHY_SOP_CLASSES, TRANSFER_SYNTAXES
from serve import DENS_SERVE, Receiver, make_studies

ATTACKER = "127.0.0.2"
HALF_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(8)
MIB = 1 << 20


class Node:
    """dens-serve as a subprocess; its port from its first line."""

    def __init__(self, root: Path, model: Path, receiver_port: int, args, *tls: str):
        self.log = open(root.with_suffix(".log"), "w")  # noqa: SIM115 (closed in stop)
        command = [*DENS_SERVE, str(root), "--model", str(model), "--port", "0", "--allow-aet", "BENCH"]
        command += ["--stable-seconds", str(args.stable_seconds), "--max-instance-mib", str(args.big_mib // 2)]
        command += ["--send-to", f"RECEIVER@127.0.0.1:{receiver_port}", *tls]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.port = int(re.search(r"listening on [\d.]+:(\d+)", self.proc.stdout.readline())[1])
        self.state = root

    def memory(self) -> dict[str, int]:
        lines = Path(f"/proc/{self.proc.pid}/status").read_text().splitlines()
        return {k: int(v.split()[0]) << 10 for k, _, v in (x.partition(":") for x in lines) if k in ("VmRSS", "VmHWM")}

    def reset_peak(self) -> int:
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")
        return self.memory()["VmRSS"]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=120)
        self.log.close()


def associate(port: int, tls: ssl.SSLContext | None, source: str = "127.0.0.1", timeout: float = 120):
    ae = AE(ae_title="BENCH")
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for syntax in TRANSFER_SYNTAXES:
        ae.add_requested_context(MAMMOGRAPHY_SOP_CLASSES[0], syntax)
    tls_args = (tls, "127.0.0.1") if tls is not None else None
    return ae.associate("127.0.0.1", port, ae_title="DENS", tls_args=tls_args, bind_address=(source, 0))


def send_study(port: int, files: list[Path], tls: ssl.SSLContext | None, timeout: float) -> list[str]:
    """The study's instances acknowledged (their SOP Instance UIDs)."""
    acknowledged = []
    assoc = associate(port, tls, timeout=timeout)
    if not assoc.is_established:
        return acknowledged
    try:
        for path in files:
            ds = dcmread(path)
            if getattr(assoc.send_c_store(ds), "Status", None) == 0:
                acknowledged.append(str(ds.SOPInstanceUID))
    finally:
        assoc.release()
    return acknowledged


# --- the attacks: each runs until ``stop`` is set -------------------------------------------------------------


def hold(port: int, stop: threading.Event, count: int, first: bytes = b"", trickle: bool = False) -> None:
    """``count`` connections from the attacker's address, each sending ``first`` (then a byte every half second
    when ``trickle``); those the node closes are opened again, twice a second (a hold, not a connection flood)."""
    conns: list[socket.socket] = []
    last: dict[socket.socket, float] = {}  # when each was last sent a byte
    next_round = 0.0
    while not stop.is_set():
        if time.monotonic() >= next_round:
            next_round = time.monotonic() + 0.5
            while len(conns) < count:
                s = socket.socket()
                s.bind((ATTACKER, 0))
                try:
                    s.connect(("127.0.0.1", port))
                    s.sendall(first)
                except OSError:
                    s.close()
                    break
                conns.append(s)
                last[s] = time.monotonic()
        readable, _, _ = select.select(conns, [], [], 0.1)
        for s in list(conns):
            try:
                if s in readable and not s.recv(65536):
                    raise OSError
                if trickle and time.monotonic() - last[s] >= 0.5:
                    s.send(b"\x00")
                    last[s] = time.monotonic()
            except OSError:
                s.close()
                conns.remove(s)
                del last[s]
    for s in conns:
        s.close()


def huge_pdu(port: int, stop: threading.Event) -> None:
    """One connection after another announcing a 500 MiB A-ASSOCIATE-RQ and streaming its body (64 MiB at most)."""
    chunk = bytes(MIB)
    while not stop.is_set():
        s = socket.socket()
        s.bind((ATTACKER, 0))
        s.settimeout(10)
        try:
            s.connect(("127.0.0.1", port))
            s.sendall(b"\x01\x00" + struct.pack(">L", 500 * MIB))
            for _ in range(64):
                s.sendall(chunk)
        except OSError:
            pass
        finally:
            s.close()


def oversized(port: int, stop: threading.Event, mib: int) -> None:
    """An allowed caller sending ``mib`` MiB instances, one after the other."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.Modality = MAMMOGRAPHY_SOP_CLASSES[0], "MG"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = mib * MIB // 16384, 8192, 16, 16, 15
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    ds.PixelData = bytes(mib * MIB)
    while not stop.is_set():
        assoc = associate(port, None, ATTACKER)
        while assoc.is_established and not stop.is_set():
            ds.SOPInstanceUID = generate_uid()
            assoc.send_c_store(ds)
        if assoc.is_established:
            assoc.release()


def self_signed(root: Path) -> tuple[Path, Path]:
    cert, key = root / "cert.pem", root / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def scenario(node: Node, receiver: Receiver, files: list[Path], attack: Callable | None, tls, args) -> dict:
    study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    stop = threading.Event()
    thread = threading.Thread(target=attack, args=(node.port, stop), daemon=True) if attack else None
    rss_before = node.reset_peak()
    if thread is not None:
        thread.start()
        time.sleep(args.lead_seconds)  # the attack under way, past the node's deadlines
    start = time.perf_counter()
    acknowledged = send_study(node.port, files, tls, args.timeout)
    deadline = time.monotonic() + args.timeout
    while study not in receiver.arrivals and time.monotonic() < deadline:
        time.sleep(0.05)
    arrived = receiver.arrivals.get(study)
    peak = node.memory()["VmHWM"]
    stop.set()
    if thread is not None:
        thread.join(timeout=120)
    return {
        "study_uid": study,
        "sr_latency_s": round(arrived[0][0] - start, 3) if arrived else None,
        "instances_sent": len(files),
        "instances_acknowledged": len(acknowledged),
        "acknowledged": acknowledged,
        "node_rss_before_mib": round(rss_before / MIB, 1),
        "node_peak_rss_mib": round(peak / MIB, 1),
        "node_peak_growth_mib": round((peak - rss_before) / MIB, 1),
    }


def refusals(log: Path) -> dict[str, int]:
    """How many connections, associations and instances the node's log says it refused, by reason code."""
    found = re.findall(r"dens-serve: refused .*?: ([a-z_]+): ", log.read_text())
    return dict(sorted(collections.Counter(found).items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stable-seconds", type=float, default=2.0)
    parser.add_argument("--big-mib", type=int, default=512, help="the oversized instance (the limit is half)")
    parser.add_argument("--connections", type=int, default=32, help="connections each holding attack keeps open")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for a study's SR")
    parser.add_argument("--lead-seconds", type=float, default=8.0, help="the attack runs this long before the study")
    args = parser.parse_args()
    n = args.connections
    plain_attacks = {
        "warmup": None,  # the node's first study warms its session up: not a baseline
        "quiet": None,
        "idle": lambda port, stop: hold(port, stop, n),
        "trickle": lambda port, stop: hold(port, stop, n, b"\x01\x00\x00\x00\x00\xc8", trickle=True),
        "pdu_500mib": huge_pdu,
        "oversized_instance": lambda port, stop: oversized(port, stop, args.big_mib),
    }
    tls_attacks = {
        "warmup_tls": None,
        "quiet_tls": None,
        "silent_tls": lambda port, stop: hold(port, stop, n),
        "half_hello_tls": lambda port, stop: hold(port, stop, n, HALF_HELLO),
    }
    with tempfile.TemporaryDirectory(prefix="dens-bench-serve-hostile-") as tmp:
        root = Path(tmp)
        studies = make_studies(root / "cohort", len(plain_attacks) + len(tls_attacks), args.seed)
        _, model, _ = export_models(root / "model", args.arch, args.size)
        cert, key = self_signed(root)
        context = ssl.create_default_context(cafile=str(cert))
        receiver = Receiver()
        plain = Node(root / "plain", model, receiver.port, args)
        secure = Node(root / "tls", model, receiver.port, args, "--tls-cert", str(cert), "--tls-key", str(key))
        runs, quiet = {}, {}
        try:
            plan = [(plain, None, plain_attacks), (secure, context, tls_attacks)]
            for (node, tls, attacks), offset in zip(plan, (0, len(plain_attacks)), strict=True):
                for i, (name, attack) in enumerate(attacks.items()):
                    runs[name] = scenario(node, receiver, studies[offset + i], attack, tls, args)
                    if name.startswith("quiet"):
                        quiet[node] = runs[name]["sr_latency_s"]
                    runs[name]["node"] = "tls" if tls else "plain"
                    runs[name]["quiet_sr_latency_s"] = quiet.get(node)
                    print(name, json.dumps({k: v for k, v in runs[name].items() if k != "acknowledged"}), flush=True)
            time.sleep(2 * args.stable_seconds)  # a late duplicate SR would arrive by now
        finally:
            plain.stop()
            secure.stop()
            receiver.server.shutdown()
        rows = {
            name: pd.read_csv(node / "preds.csv", dtype=str, keep_default_na=False)[labels.SOP_UID].value_counts()
            for name, node in (("plain", root / "plain"), ("tls", root / "tls"))
        }
        for run in runs.values():
            counts = rows[run["node"]]
            kept = sum(int(counts.get(s, 0) == 1) for s in run.pop("acknowledged"))
            run["instances_lost"] = run["instances_sent"] - kept
            run["srs_received"] = len(receiver.arrivals.get(run["study_uid"], []))
            q, x = run["quiet_sr_latency_s"], run["sr_latency_s"]
            run["latency_ratio_to_quiet"] = round(x / q, 2) if x is not None and q else None
        largest = max(p.stat().st_size for files in studies for p in files)
        checks = {
            "nothing_lost": all(r["instances_lost"] == 0 for r in runs.values()),
            "one_sr_per_study": all(r["srs_received"] == 1 for r in runs.values()),
            "latency_within_2x_of_quiet": all(
                (r["latency_ratio_to_quiet"] or 99) <= 2 for n, r in runs.items() if not n.startswith("warmup")
            ),
            "refusals_by_reason": {name: refusals(root / f"{name}.log") for name in ("plain", "tls")},
            "largest_legitimate_instance_mib": round(largest / MIB, 2),
        }
        settings = {
            "stable_seconds": args.stable_seconds,
            "connections": n,
            "oversized_instance_mib": args.big_mib,
            "max_instance_mib": args.big_mib // 2,
            "model": f"{args.arch} S={args.size} (random init), ONNX Runtime CPU",
            "cohort": f"dens-synth --size small --seed {args.seed}, one four-view study per scenario",
        }
        payload = {"settings": settings, "results": runs, "checks": checks}
        print(json.dumps(payload, indent=1))
        print(f"wrote {shown(write_result('serve_hostile', payload))}")
        if not (checks["nothing_lost"] and checks["one_sr_per_study"]):
            sys.exit(1)


if __name__ == "__main__":
    main()
