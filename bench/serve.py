"""dens-serve under load: concurrent associations send screening studies; how fast the node takes them, how
long a study waits for its SR, and whether every instance and study is answered exactly once.

    python bench/serve.py [--studies 50] [--associations 4] [--stable-seconds 2] [--arch resnet18] [--size 224]

The studies are a small dens-synth cohort's (four views each, JPEG 2000, JPEG-LS, RLE and uncompressed, as
dens-synth mixes them); the first ``--studies`` four-view studies are sent, dealt round-robin to
``--associations`` pynetdicom SCU threads, each sending its studies one after the other over one association.
dens-serve runs as a subprocess (a random-init model of ``--arch`` at ``--size``, exported by dens-export's
code: speed does not depend on the weights) and sends each SR by C-STORE to a receiving SCP in this process,
which records when each SR arrives.

Measured: instances/s received (acknowledged instances over the time from the first send to the last
acknowledgement, all associations together); per study, the latency from its last instance's acknowledgement
to its SR's arrival (this includes the quiet-time window ``--stable-seconds``, by design; the figure without
it is given too). Checked: every acknowledged instance has exactly one row in preds.csv, every study exactly
one SR (after a further wait of twice the window, so a late duplicate would be seen).
Writes bench/results/serve-<host>-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pandas as pd
from pydicom import dcmread
from pynetdicom import AE, evt

from common import export_models, shown, write_result
from dens import labels
from dens.serve.scp import MAMMOGRAPHY_SOP_CLASSES, TRANSFER_SYNTAXES
from dens.serve.send import COMPREHENSIVE_3D_SR

DENS_SERVE = [sys.executable, "-c", "from dens.serve.cli import main; main()"]


def make_studies(root: Path, studies: int, seed: int) -> list[list[Path]]:
    """The first ``studies`` four-view studies of a dens-synth cohort made in ``root``: their files."""
    from dens.synth import generate

    patients = studies  # dens-synth gives each patient one or two studies
    generate(root, patients, size="small", seed=seed, progress=False)
    by_study: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(root.rglob("*.dcm")):
        by_study[path.parent.name].append(path)
    found = [files for _, files in sorted(by_study.items()) if len(files) == 4]
    if len(found) < studies:
        raise SystemExit(f"dens-synth made {len(found)} four-view studies, {studies} asked for")
    return found[:studies]


class Receiver:
    """A C-STORE SCP recording when each SR arrives, by study."""

    def __init__(self):
        self.arrivals: dict[str, list[tuple[float, str]]] = defaultdict(list)
        self.lock = threading.Lock()
        ae = AE(ae_title="RECEIVER")
        ae.add_supported_context(COMPREHENSIVE_3D_SR)
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = self.server.server_address[1]

    def _store(self, event) -> int:
        ds = event.dataset
        with self.lock:
            self.arrivals[str(ds.StudyInstanceUID)].append((time.perf_counter(), str(ds.SOPInstanceUID)))
        return 0x0000

    def count(self) -> int:
        with self.lock:
            return len(self.arrivals)


def send(port: int, studies: list[list[Path]], acks: dict, errors: list) -> None:
    """One association sending ``studies`` one after the other; each acknowledged instance's time."""
    ae = AE(ae_title="BENCH")
    for syntax in TRANSFER_SYNTAXES:  # one context per syntax: each file goes as it is stored
        ae.add_requested_context(MAMMOGRAPHY_SOP_CLASSES[0], syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="DENS")
    if not assoc.is_established:
        errors.append("association not established")
        return
    try:
        for files in studies:
            for path in files:
                ds = dcmread(path)
                status = assoc.send_c_store(ds)
                if getattr(status, "Status", None) == 0x0000:
                    acks[str(ds.SOPInstanceUID)] = (str(ds.StudyInstanceUID), time.perf_counter())
                else:
                    errors.append(f"{path.name}: {status}")
    finally:
        assoc.release()


def percentiles(values: list[float]) -> dict:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]  # noqa: E731
    return {
        "min": round(ordered[0], 3),
        "median": round(statistics.median(ordered), 3),
        "p95": round(pick(0.95), 3),
        "max": round(ordered[-1], 3),
        "mean": round(statistics.fmean(ordered), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=50)
    parser.add_argument("--associations", type=int, default=4)
    parser.add_argument("--stable-seconds", type=float, default=2.0)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for every SR")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dens-bench-serve-") as tmp:
        root = Path(tmp)
        studies = make_studies(root / "cohort", args.studies, args.seed)
        _, model, _ = export_models(root / "model", args.arch, args.size)
        receiver = Receiver()
        state = root / "state"
        log = open(root / "node.log", "w")  # noqa: SIM115 (closed below)
        node = subprocess.Popen(
            [
                *(*DENS_SERVE, str(state), "--model", str(model), "--port", "0", "--allow-aet", "BENCH"),
                *("--stable-seconds", str(args.stable_seconds), "--send-to", f"RECEIVER@127.0.0.1:{receiver.port}"),
            ],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        try:
            line = node.stdout.readline()
            port = int(re.search(r"listening on [\d.]+:(\d+)", line)[1])
            acks: dict[str, tuple[str, float]] = {}
            errors: list[str] = []
            shares = [studies[i :: args.associations] for i in range(args.associations)]
            threads = [threading.Thread(target=send, args=(port, share, acks, errors)) for share in shares]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            received_s = max(t for _, t in acks.values()) - start
            deadline = time.monotonic() + args.timeout
            while receiver.count() < len(studies) and time.monotonic() < deadline:
                time.sleep(0.1)
            all_in = time.perf_counter()
            time.sleep(2 * args.stable_seconds)  # a late duplicate SR would arrive by now
        finally:
            node.terminate()
            node.wait(timeout=120)
            log.close()
            receiver.server.shutdown()

        last_ack: dict[str, float] = defaultdict(float)
        for study, t in acks.values():
            last_ack[study] = max(last_ack[study], t)
        latencies = [arrivals[0][0] - last_ack[study] for study, arrivals in receiver.arrivals.items()]
        rows = pd.read_csv(state / "preds.csv", dtype=str, keep_default_na=False)
        per_instance = rows[labels.SOP_UID].value_counts()
        sr_counts = {study: len(a) for study, a in receiver.arrivals.items()}
        expected_studies = {dcmread(files[0], stop_before_pixels=True).StudyInstanceUID for files in studies}
        checks = {
            "instances_sent": sum(len(f) for f in studies),
            "instances_acknowledged": len(acks),
            "send_errors": errors,
            "acknowledged_with_one_row": int(sum(per_instance.get(sop, 0) == 1 for sop in acks)),
            "rows": len(rows),
            "rows_by_status": rows[labels.STATUS].value_counts().to_dict(),
            "studies_with_one_sr": sum(sr_counts.get(s, 0) == 1 for s in expected_studies),
            "studies_with_more_than_one_sr": sum(sr_counts.get(s, 0) > 1 for s in expected_studies),
            "studies_without_sr": sum(sr_counts.get(s, 0) == 0 for s in expected_studies),
        }
        checks["every_acknowledged_instance_one_row"] = checks["acknowledged_with_one_row"] == len(acks) == len(rows)
        checks["every_study_exactly_one_sr"] = checks["studies_with_one_sr"] == len(studies)
        settings = {
            "studies": len(studies),
            "instances": checks["instances_sent"],
            "associations": args.associations,
            "stable_seconds": args.stable_seconds,
            "model": f"{args.arch} S={args.size} (random init), ONNX Runtime CPU",
            "cohort": f"dens-synth --size small --seed {args.seed} (first {len(studies)} four-view studies)",
            "megabytes_sent": round(sum(p.stat().st_size for f in studies for p in f) / 2**20, 1),
        }
        results = {
            "receive_seconds": round(received_s, 3),
            "instances_per_s": round(len(acks) / received_s, 2),
            "megabytes_per_s": round(settings["megabytes_sent"] / received_s, 2),
            "all_srs_in_seconds_after_first_send": round(all_in - start, 2),
            "study_latency_s": percentiles(latencies) if latencies else None,
            "study_latency_beyond_quiet_window_s": percentiles([x - args.stable_seconds for x in latencies])
            if latencies
            else None,
        }
        print(json.dumps({"settings": settings, "results": results, "checks": checks}, indent=1))
        out = write_result("serve", {"settings": settings, "results": results, "checks": checks})
        print(f"wrote {shown(out)}")
        if not (checks["every_acknowledged_instance_one_row"] and checks["every_study_exactly_one_sr"]):
            print((root / "node.log").read_text()[-5000:], file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    main()
