"""dens-infer pulling from a PACS, beside a folder run of the same files: what fetching over DICOMweb, C-MOVE and
C-GET costs a run, on one machine.

    python bench/pull.py [--studies 50] [--arch resnet18] [--size 224] [--seed 21] [--repeat 3]

The bench starts Orthanc (Debian packages orthanc and orthanc-dicomweb) on loopback ports, with dens's AE title
among its modalities for C-MOVE, and loads into it, through its REST API, the first ``--studies`` four-view
studies of a small dens-synth cohort (200 instances by default: JPEG 2000, JPEG-LS, RLE and uncompressed, as
dens-synth mixes them). Then, in one process, one after the other (after an untimed warm-up run; each
``--repeat`` times, the order rotated, the median kept), it runs dens-infer's ``run`` over the cohort's folder
and over the PACS by DICOMweb (QIDO-RS, WADO-RS), C-FIND with C-MOVE, and C-FIND with C-GET, each into a fresh
output and pull folder; and the pull alone (``dens.pull.Pull`` without scoring) for each protocol, which says
how fast the network side could go.
The model is a random-init ``--arch`` at ``--size`` (speed does not depend on the weights).

Measured: wall seconds and instances per second of each run (its ok rows over its seconds, start-up
included, as a user waits for it), the ratio to the folder run, and the pull's own figures (its seconds from
the first query to the last file, MB). Checked: each pull's rows are the folder run's but for their path.
Writes bench/results/pull-<host>-<time>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import pandas as pd

from common import export_models, shown, write_result
from dens import labels
from dens.infer import InferConfig
from dens.infer.runner import run
from dens.pull import Access, Pull, Query, parse_source

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
MODES = ("folder", "dicomweb", "c-move", "c-get")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_studies(root: Path, studies: int, seed: int) -> list[list[Path]]:
    """The first ``studies`` four-view studies of a small dens-synth cohort made in ``root``: their files."""
    from dens.synth import generate

    generate(root, studies, size="small", seed=seed, progress=False)
    by_study: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(root.rglob("*.dcm")):
        by_study[path.parent.name].append(path)
    found = [files for _, files in sorted(by_study.items()) if len(files) == 4]
    if len(found) < studies:
        raise SystemExit(f"dens-synth made {len(found)} four-view studies, {studies} asked for")
    return found[:studies]


@contextlib.contextmanager
def orthanc(root: Path, move_port: int):
    """Orthanc on loopback ports, dens (AE title DENS, ``move_port``) among its modalities: (REST URL, DICOM
    port)."""
    if not Path(ORTHANC).is_file() or not DICOMWEB_PLUGIN.is_file():
        raise SystemExit(f"needs Orthanc ({ORTHANC}) and its DICOMweb plugin: apt-get install orthanc orthanc-dicomweb")
    http, dicom = free_port(), free_port()
    config = {
        "Name": "dens-bench",
        "StorageDirectory": str(root / "db"),
        "IndexDirectory": str(root / "db"),
        "HttpPort": http,
        "DicomPort": dicom,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomModalities": {"dens": ["DENS", "127.0.0.1", move_port]},
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "orthanc.json").write_text(json.dumps(config))
    with open(root / "orthanc.log", "w") as log:
        proc = subprocess.Popen([ORTHANC, str(root / "orthanc.json")], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/system", timeout=5):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"Orthanc did not start: {(root / 'orthanc.log').read_text()[-2000:]}") from None
                time.sleep(0.2)
        yield url, dicom
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def load(url: str, studies: list[list[Path]]) -> float:
    """Upload every file to Orthanc (POST /instances); the seconds it took."""
    start = time.perf_counter()
    for files in studies:
        for path in files:
            request = urllib.request.Request(f"{url}/instances", data=path.read_bytes())
            with urllib.request.urlopen(request, timeout=120) as answer:
                answer.read()
    return time.perf_counter() - start


PROBABILITIES = [*labels.PROB_COLUMNS, labels.P_DENSE]


def rows_of(out: Path) -> pd.DataFrame:
    rows = pd.read_csv(out, dtype=str, keep_default_na=False)
    return rows.drop(columns=[labels.PATH]).sort_values(labels.SOP_UID).reset_index(drop=True)


def same_rows(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    """The same rows (paths left out): every cell equal, the probabilities to float noise."""
    if len(a) != len(b) or not a.drop(columns=PROBABILITIES).equals(b.drop(columns=PROBABILITIES)):
        return False
    return bool(np.allclose(a[PROBABILITIES].astype(float), b[PROBABILITIES].astype(float), atol=2e-6))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=50, help="four-view studies (200 instances at 50)")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each mode (the order rotated each time)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dens-bench-pull-") as tmp:
        root = Path(tmp)
        studies = make_studies(root / "cohort", args.studies, args.seed)
        instances = sum(len(files) for files in studies)
        megabytes = round(sum(p.stat().st_size for files in studies for p in files) / 1e6, 1)
        folder = root / "folder"  # the chosen studies alone, as a folder run reads them
        for files in studies:
            (folder / files[0].parent.name).mkdir(parents=True)
            for path in files:
                (folder / path.parent.name / path.name).symlink_to(path)
        _, model, _ = export_models(root / "model", args.arch, args.size)
        move_port = free_port()
        with orthanc(root / "orthanc", move_port) as (url, dicom_port):
            load_s = load(url, studies)
            dimse = f"dicom://ORTHANC@127.0.0.1:{dicom_port}"
            sources = {
                "folder": (folder, {}),
                "dicomweb": (f"{url}/dicom-web", {"since": "30000d"}),
                "c-move": (dimse, {"since": "30000d", "move_port": move_port}),
                "c-get": (dimse, {"since": "30000d", "retrieve": "get"}),
            }
            # Untimed: the first run in a process pays for the files' first read and ONNX Runtime's first session.
            run(InferConfig(folder, root / "warm-up" / "preds.csv", model=model, progress=False))
            runs: dict[str, list[dict]] = defaultdict(list)
            reference = None
            for repeat in range(args.repeat):
                order = MODES[repeat % len(MODES) :] + MODES[: repeat % len(MODES)]
                for mode in order:
                    studies_arg, options = sources[mode]
                    out = root / f"{mode}-{repeat}" / "preds.csv"
                    start = time.perf_counter()
                    summary = run(InferConfig(studies_arg, out, model=model, progress=False, **options))
                    seconds = time.perf_counter() - start
                    rows = rows_of(out)
                    reference = rows if mode == "folder" and reference is None else reference
                    record = {
                        "seconds": round(seconds, 2),
                        "ok": summary.ok,
                        "instances_per_s": round(summary.ok / seconds, 2),
                        "model_s": round(summary.model_s, 2),
                        "waiting_for_decode_s": round(summary.wait_s, 2),
                        "rows": rows,
                    }
                    if summary.pull is not None:
                        pull = summary.pull
                        record["pull"] = {
                            "fetched": pull.fetched,
                            "failed": pull.failed,
                            "megabytes": round(pull.bytes / 1e6, 1),
                            "seconds": round(pull.seconds, 2),
                        }
                    runs[mode].append(record)
                    print(f"{mode}: {record['instances_per_s']} instances/s in {seconds:.1f} s", flush=True)
            alone = {}
            for mode in MODES[1:]:
                studies_arg, options = sources[mode]
                access = Access(retrieve=options.get("retrieve"), move_port=options.get("move_port"))
                start = time.perf_counter()
                with Pull(parse_source(studies_arg), Query.parse(since="30000d"), access, root / f"alone-{mode}") as p:
                    fetched = sum(not pulled.problem for pulled in p.instances())
                seconds = time.perf_counter() - start
                alone[mode] = {
                    "fetched": fetched,
                    "seconds": round(seconds, 2),
                    "instances_per_s": round(fetched / seconds, 2),
                    "megabytes_per_s": round(p.summary.bytes / 1e6 / seconds, 1),
                }
                print(f"{mode} pull alone: {alone[mode]['instances_per_s']} instances/s", flush=True)

    folder_rate = statistics.median(r["instances_per_s"] for r in runs["folder"])
    results = {}
    for mode in MODES:
        rate = statistics.median(r["instances_per_s"] for r in runs[mode])
        same = all(same_rows(r["rows"], reference) for r in runs[mode])
        results[mode] = {
            "instances_per_s": rate,
            "ratio_to_folder": round(rate / folder_rate, 3),
            "same_rows_as_folder": same,
            "runs": [{k: v for k, v in r.items() if k != "rows"} for r in runs[mode]],
        }
        if mode in alone:
            results[mode]["pull_alone"] = alone[mode]
    settings = {
        "studies": len(studies),
        "instances": instances,
        "megabytes": megabytes,
        "model": f"{args.arch} S={args.size} (random init), ONNX Runtime CPU",
        "cohort": f"dens-synth --size small --seed {args.seed} (first {len(studies)} four-view studies)",
        "pacs": "Orthanc (Debian package) with its DICOMweb plugin, on loopback ports",
        "orthanc_load_seconds": round(load_s, 1),
        "repeat": args.repeat,
    }
    payload = {"settings": settings, "results": results}
    print(json.dumps(payload, indent=1))
    out = write_result("pull", payload)
    print(f"wrote {shown(out)}")
    if not all(r["same_rows_as_folder"] for r in results.values()):
        sys.exit("a pull's rows differ from the folder run's")


if __name__ == "__main__":
    main()
