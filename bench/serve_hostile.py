"""dens-serve against hostile peers: a real study through the node while each attack runs, and without one.

    python bench/serve_hostile.py [--stable-seconds 2] [--big-mib 512] [--connections 32] [--arch resnet18]

Two nodes run as subprocesses (plain DICOM, and DICOM over TLS), each sending its SRs to a receiving SCP in
this process. For each scenario a new four-view study (dens-synth, as bench/serve.py makes them) is sent by an
allowed caller on 127.0.0.1 over one association, ``--lead-seconds`` after the attack started (longer than the
node's 5 s deadline, so the attack is in its steady state) and while it goes on, from 127.0.0.2 (another peer):

* quiet, quiet_tls, quiet_disk: no attack (the baselines);
* idle: ``--connections`` connections that send nothing, those the node closes reopened twice a second;
* trickle: as many connections sending an A-ASSOCIATE-RQ one byte every half second;
* reconnect: as ``idle``, but each connection the node closes or refuses is opened again at once (as fast as
  the attacker's process can);
* connect_flood: connections opened and closed again at once, one after the other, as fast as it can;
* pdu_500mib: connections announcing a 500 MiB A-ASSOCIATE-RQ and streaming its body, one after the other;
* oversized_instance: an allowed caller sending ``--big-mib`` MiB instances (over ``--max-instance-mib``,
  which is set to half of it), one after the other;
* status_slowloris: ``--status-connections`` connections to the status port, each sending half a request and
  then nothing, reopened at once when closed;
* status_flood: whole status requests without the token, one after the other, as fast as it can;
* silent_tls, half_hello_tls: against the TLS node, connections that send nothing, or a ClientHello's first
  bytes only;
* disk_full (root only: the third node's state folder is a ``--disk-mib`` MiB tmpfs): the folder filled to its
  last byte, the study sent (the node refuses each instance with 0xA700 and a comment), the space freed, and the
  refused instances sent again, as a PACS retries; its latency counts from that second sending.

Each attack runs in a process of its own, as another host's would: it takes a core of the machine (the node
has the other), but none of this process's time, which sends the study and receives the SR.

Measured per scenario: the study's SR latency (first C-STORE sent to its SR received; it includes the quiet
window ``--stable-seconds``), its ratio to the quiet run of the same node, the node process's peak RSS while
the scenario ran (Linux's clear_refs resets the peak before each), its growth over the RSS before and that
growth beyond the quiet run's (what the attack cost), and the study's instances lost (acknowledged but without
exactly one row in preds.csv). Writes bench/results/serve_hostile-<host>-<time>.json.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import multiprocessing
import os
import re
import select
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
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
HALF_REQUEST = b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n"
MIB = 1 << 20
A700 = 0xA700


class Node:
    """dens-serve as a subprocess; its ports from its first line."""

    def __init__(self, root: Path, model: Path, receiver_port: int, args, *extra: str, log: Path | None = None):
        self.log = open(log or root.with_suffix(".log"), "w")  # noqa: SIM115 (closed in stop)
        command = [*DENS_SERVE, str(root), "--model", str(model), "--port", "0", "--allow-aet", "BENCH"]
        command += ["--stable-seconds", str(args.stable_seconds), "--max-instance-mib", str(args.big_mib // 2)]
        command += ["--send-to", f"RECEIVER@127.0.0.1:{receiver_port}", "--status-port", str(free_port()), *extra]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = self.proc.stdout.readline()
        self.port = int(re.search(r"listening on [\d.]+:(\d+)", line)[1])
        self.status_port = int(re.search(r"status on http://[\d.]+:(\d+)/", line)[1])
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def associate(port: int, tls: ssl.SSLContext | None, source: str = "127.0.0.1", timeout: float = 120):
    ae = AE(ae_title="BENCH")
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for syntax in TRANSFER_SYNTAXES:
        ae.add_requested_context(MAMMOGRAPHY_SOP_CLASSES[0], syntax)
    tls_args = (tls, "127.0.0.1") if tls is not None else None
    return ae.associate("127.0.0.1", port, ae_title="DENS", tls_args=tls_args, bind_address=(source, 0))


def send_study(port: int, files: list[Path], tls: ssl.SSLContext | None, timeout: float) -> tuple[list[str], dict]:
    """The study's instances acknowledged (their SOP Instance UIDs), and the refused ones' statuses and comments
    by path."""
    acknowledged, refused = [], {}
    assoc = associate(port, tls, timeout=timeout)
    if not assoc.is_established:
        return acknowledged, {str(p): "no association" for p in files}
    try:
        for path in files:
            ds = dcmread(path)
            answer = assoc.send_c_store(ds)
            if getattr(answer, "Status", None) == 0:
                acknowledged.append(str(ds.SOPInstanceUID))
            else:
                refused[str(path)] = (getattr(answer, "Status", None), str(getattr(answer, "ErrorComment", "")))
    finally:
        assoc.release()
    return acknowledged, refused


# --- the attacks: each runs in its own process until ``stop`` is set ------------------------------------------


def _connect(port: int) -> socket.socket | None:
    s = socket.socket()
    s.bind((ATTACKER, 0))
    try:
        s.connect(("127.0.0.1", port))
        return s
    except OSError:
        s.close()
        return None


def hold(port: int, stop, count: int, first: bytes = b"", trickle: bool = False, pace: float = 0.5) -> None:
    """``count`` connections from the attacker's address, each sending ``first`` (then a byte every half second
    when ``trickle``); those the node closes are opened again every ``pace`` seconds (0: at once)."""
    conns: list[socket.socket] = []
    last: dict[socket.socket, float] = {}  # when each was last sent a byte
    next_round = 0.0
    while not stop.is_set():
        if time.monotonic() >= next_round:
            next_round = time.monotonic() + pace
            while len(conns) < count:
                s = _connect(port)
                try:
                    s is not None and s.sendall(first)
                except OSError:
                    s.close()
                    s = None
                if s is None:
                    break
                conns.append(s)
                last[s] = time.monotonic()
        readable, _, _ = select.select(conns, [], [], 0.1 if pace else 0.01)
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


def connect_flood(port: int, stop) -> None:
    """Connections opened and closed at once, one after the other, as fast as this process can."""
    opened = 0
    while not stop.is_set():
        s = _connect(port)
        if s is not None:
            s.close()
            opened += 1
    print(f"connect_flood: {opened} connections", flush=True)


def status_flood(port: int, stop) -> None:
    """Whole status requests without a token, one after the other, as fast as this process can."""
    answered = 0
    while not stop.is_set():
        s = _connect(port)
        if s is None:
            continue
        try:
            s.settimeout(10)
            s.sendall(HALF_REQUEST + b"\r\n")
            while s.recv(65536):
                pass
            answered += 1
        except OSError:
            pass
        finally:
            s.close()
    print(f"status_flood: {answered} requests answered", flush=True)


def huge_pdu(port: int, stop) -> None:
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


def oversized(port: int, stop, mib: int) -> None:
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


class Attack:
    """``target(port, stop, **options)`` in a process of its own, against the node's DICOM port or, with
    ``status``, its status port."""

    def __init__(self, target: Callable, status: bool = False, **options):
        self.target, self.status, self.options = target, status, options

    def start(self, node: Node) -> Callable[[], None]:
        """Start it against ``node``; the function that stops it."""
        context = multiprocessing.get_context("spawn")
        stop = context.Event()
        port = node.status_port if self.status else node.port
        process = context.Process(target=functools.partial(self.target, port, stop, **self.options), daemon=True)
        process.start()

        def end() -> None:
            stop.set()
            process.join(timeout=120)
            if process.is_alive():
                process.kill()

        return end


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


# --- a full disk: the third node's state folder on a tmpfs of its own ----------------------------------------


class SmallDisk:
    """A ``mib`` MiB tmpfs at ``folder`` (root only), filled to its last byte by :meth:`fill`."""

    def __init__(self, folder: Path, mib: int):
        self.folder = folder
        folder.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(folder)], check=True)
        self.filler = folder / "filler"

    @staticmethod
    def possible() -> str | None:
        """Why a tmpfs cannot be mounted here, or None."""
        if os.geteuid() != 0:
            return "needs root (mount -t tmpfs)"
        try:
            with tempfile.TemporaryDirectory() as probe:
                subprocess.run(
                    ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", probe], check=True, capture_output=True
                )
                subprocess.run(["umount", probe], check=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            return f"cannot mount a tmpfs ({exc})"
        return None

    def fill(self) -> None:
        with open(self.filler, "ab", buffering=0) as f:
            for size in (MIB, 4096, 1):
                try:
                    while True:
                        f.write(bytes(size))
                except OSError:
                    pass

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.folder)], check=False)


def scenario(node: Node, receiver: Receiver, files: list[Path], attack: Attack | None, tls, args) -> dict:
    study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    rss_before = node.reset_peak()
    end = attack.start(node) if attack is not None else None
    if end is not None:
        time.sleep(args.lead_seconds)  # the attack under way, past the node's deadlines
    start = time.perf_counter()
    acknowledged, refused = send_study(node.port, files, tls, args.timeout)
    return finish(node, receiver, study, files, start, acknowledged, refused, rss_before, end, args)


def disk_full(node: Node, receiver: Receiver, files: list[Path], disk: SmallDisk, args) -> dict:
    """The study sent to a node whose disk is full, then again, once space is freed, as a PACS retries."""
    study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    rss_before = node.reset_peak()
    disk.fill()
    acknowledged, refused = send_study(node.port, files, None, args.timeout)
    disk.free()
    start = time.perf_counter()
    again, still = send_study(node.port, [Path(p) for p in refused], None, args.timeout)
    run = finish(node, receiver, study, files, start, acknowledged + again, still, rss_before, None, args)
    run["while_full"] = {
        "acknowledged": len(acknowledged),
        "refused": sorted({f"{s:#06x} {c}" for s, c in refused.values()}),
    }
    return run


def finish(node, receiver, study, files, start, acknowledged, refused, rss_before, end, args) -> dict:
    deadline = time.monotonic() + args.timeout
    while study not in receiver.arrivals and time.monotonic() < deadline:
        time.sleep(0.05)
    arrived = receiver.arrivals.get(study)
    peak = node.memory()["VmHWM"]
    if end is not None:
        end()
    return {
        "study_uid": study,
        "sr_latency_s": round(arrived[0][0] - start, 3) if arrived else None,
        "instances_sent": len(files),
        "instances_acknowledged": len(acknowledged),
        "instances_refused": len(refused),
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
    parser.add_argument("--status-connections", type=int, default=300, help="status_slowloris's connections")
    parser.add_argument("--disk-mib", type=int, default=64, help="disk_full's tmpfs")
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
        "idle": Attack(hold, count=n),
        "trickle": Attack(hold, count=n, first=b"\x01\x00\x00\x00\x00\xc8", trickle=True),
        "reconnect": Attack(hold, count=n, pace=0),
        "connect_flood": Attack(connect_flood),
        "pdu_500mib": Attack(huge_pdu),
        "oversized_instance": Attack(oversized, mib=args.big_mib),
        "status_slowloris": Attack(hold, status=True, count=args.status_connections, first=HALF_REQUEST, pace=0),
        "status_flood": Attack(status_flood, status=True),
    }
    tls_attacks = {
        "warmup_tls": None,
        "quiet_tls": None,
        "silent_tls": Attack(hold, count=n),
        "half_hello_tls": Attack(hold, count=n, first=HALF_HELLO),
    }
    why_no_disk = SmallDisk.possible()
    disk_runs = [] if why_no_disk else ["warmup_disk", "quiet_disk", "disk_full"]
    with tempfile.TemporaryDirectory(prefix="dens-bench-serve-hostile-") as tmp:
        root = Path(tmp)
        studies = iter(make_studies(root / "cohort", len(plain_attacks) + len(tls_attacks) + len(disk_runs), args.seed))
        _, model, _ = export_models(root / "model", args.arch, args.size)
        cert, key = self_signed(root)
        context = ssl.create_default_context(cafile=str(cert))
        receiver = Receiver()
        nodes = {
            "plain": Node(root / "plain", model, receiver.port, args),
            "tls": Node(root / "tls", model, receiver.port, args, "--tls-cert", str(cert), "--tls-key", str(key)),
        }
        disk = None
        if disk_runs:
            disk = SmallDisk(root / "disk", args.disk_mib)
            nodes["disk"] = Node(disk.folder / "state", model, receiver.port, args, log=root / "disk.log")
        runs, quiet = {}, {}
        try:
            plan = [("plain", None, plain_attacks), ("tls", context, tls_attacks)]
            plan += [("disk", None, {name: None for name in disk_runs})] if disk_runs else []
            for kind, tls, attacks in plan:
                node = nodes[kind]
                for name, attack in attacks.items():
                    files = next(studies)
                    if name == "disk_full":
                        runs[name] = disk_full(node, receiver, files, disk, args)
                    else:
                        runs[name] = scenario(node, receiver, files, attack, tls, args)
                    if name.startswith("quiet"):
                        quiet[kind] = runs[name]["sr_latency_s"]
                    runs[name]["node"] = kind
                    runs[name]["quiet_sr_latency_s"] = quiet.get(kind)
                    print(name, json.dumps({k: v for k, v in runs[name].items() if k != "acknowledged"}), flush=True)
            time.sleep(2 * args.stable_seconds)  # a late duplicate SR would arrive by now
        finally:
            for node in nodes.values():
                node.stop()
            receiver.server.shutdown()
            if disk is not None:
                preds = disk.folder / "state" / "preds.csv"
                (root / "disk.preds.csv").write_bytes(preds.read_bytes() if preds.exists() else b"")
                disk.unmount()
        rows = {}
        for kind, node in nodes.items():
            preds = root / "disk.preds.csv" if kind == "disk" else node.state / "preds.csv"
            rows[kind] = pd.read_csv(preds, dtype=str, keep_default_na=False)[labels.SOP_UID].value_counts()
        for run in runs.values():
            counts = rows[run["node"]]
            kept = sum(int(counts.get(s, 0) == 1) for s in run.pop("acknowledged"))
            run["instances_lost"] = run["instances_acknowledged"] - kept
            run["srs_received"] = len(receiver.arrivals.get(run["study_uid"], []))
            q, x = run["quiet_sr_latency_s"], run["sr_latency_s"]
            run["latency_ratio_to_quiet"] = round(x / q, 2) if x is not None and q else None
        for name, run in runs.items():  # what the attack cost the node's memory beyond a quiet study's
            baseline = runs.get("quiet" if run["node"] == "plain" else f"quiet_{run['node']}")
            if baseline is not None and not name.startswith("warmup"):
                growth = run["node_peak_growth_mib"] - baseline["node_peak_growth_mib"]
                run["growth_beyond_quiet_mib"] = round(max(growth, 0.0), 1)
        largest = max(p.stat().st_size for p in (root / "cohort").rglob("*.dcm"))
        checks = {
            "nothing_lost": all(r["instances_lost"] == 0 for r in runs.values()),
            "every_instance_acknowledged": all(
                r["instances_acknowledged"] == r["instances_sent"] for r in runs.values()
            ),
            "one_sr_per_study": all(r["srs_received"] == 1 for r in runs.values()),
            "latency_within_2x_of_quiet": all(
                (r["latency_ratio_to_quiet"] or 99) <= 2 for n, r in runs.items() if not n.startswith("warmup")
            ),
            "growth_beyond_quiet_under_2x_largest_instance": all(
                r.get("growth_beyond_quiet_mib", 0) < 2 * largest / MIB for r in runs.values()
            ),
            "refusals_by_reason": {kind: refusals(root / f"{kind}.log") for kind in nodes},
            "largest_legitimate_instance_mib": round(largest / MIB, 2),
            "disk_full": why_no_disk or "run",
        }
        settings = {
            "stable_seconds": args.stable_seconds,
            "connections": n,
            "status_connections": args.status_connections,
            "oversized_instance_mib": args.big_mib,
            "max_instance_mib": args.big_mib // 2,
            "disk_mib": args.disk_mib,
            "model": f"{args.arch} S={args.size} (random init), ONNX Runtime CPU",
            "cohort": f"dens-synth --size small --seed {args.seed}, one four-view study per scenario",
            "attacker": "a process of its own on this machine, from 127.0.0.2",
        }
        payload = {"settings": settings, "results": runs, "checks": checks}
        print(json.dumps(payload, indent=1))
        print(f"wrote {shown(write_result('serve_hostile', payload))}")
        if not (checks["nothing_lost"] and checks["one_sr_per_study"]):
            sys.exit(1)


if __name__ == "__main__":
    main()
