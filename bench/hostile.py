"""What a hostile file costs, alone and in a run: no file may stall or sink a run.

    python bench/hostile.py [--patients 25] [--workers 2]

The hostile files (made here, in a temporary folder; tests/test_hostile.py checks the same files): a header
claiming 60000x60000 pixels over 100 KB of native pixel data, the same header over a small JPEG 2000
codestream, a JPEG 2000 codestream whose own header claims 60000x60000, a JP2 file under the JPEG Lossless
transfer syntax with another size than the header's, a 1000-frame 2 GB tomosynthesis-like file and 256 MB
of zeros (both sparse: they cost no disk).

1. Each hostile file alone, in a fresh process as a decode worker runs it (``dens.route.preprocess.load`` under the
   engine's memory budget): seconds, bytes read from disk, and the peak RSS against the process's RSS before
   the file (the imports).
2. The decode engine (:class:`dens.engine.DecodePool`) over a small dens-synth cohort (``--patients`` x 4
   images) alone, then with the hostile files mixed in, then with those and one slow file (a full-size
   5355x4915 RLE image, decoded in full) placed first: wall seconds and the ratio to the cohort alone, in
   the same run. The slow file's own decode time is measured alone too, so the ratio can be read against the
   work it adds (the pool cannot make that work vanish; it must not wait on it).
3. dens-infer end to end (a fresh process, as a user runs it; a random resnet18 at 256) over the cohort
   alone and over a folder holding the cohort and the hostile files, taking turns, best of ``--repeat``:
   the issue's aim, a run with hostile files among good ones within 1.10 of the good ones alone.

Writes bench/results/hostile.json (with the machine it ran on).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import openjpeg
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, RLELossless, generate_uid

from common import REPO, RESULTS, command, export_models, machine

MAMMO_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
HUGE = 60000
# Who the hostile files say they are: a failing file's row must still say it.
PATIENT_ID = "HOSTILE-1"


def _dataset(rows: int, cols: int, syntax: str = "1.2.840.10008.1.2.1", **tags) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MAMMO_FOR_PRESENTATION
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPClassUID, ds.SOPInstanceUID = MAMMO_FOR_PRESENTATION, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.AccessionNumber, ds.Modality = PATIENT_ID, "ACC-HOSTILE", "MG"
    ds.Manufacturer, ds.ManufacturerModelName = "GE MEDICAL SYSTEMS", "Senographe Essential"
    ds.ImageLaterality, ds.ViewPosition = "L", "CC"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


def _small_image(rows: int = 300, cols: int = 240) -> np.ndarray:
    """A 12-bit image with a bright half-disc on the left edge (a breast, roughly)."""
    yy, xx = np.mgrid[:rows, :cols]
    inside = np.hypot(yy - rows / 2, xx) < 0.42 * rows
    noise = np.random.default_rng(0).integers(0, 200, (rows, cols))
    return (np.where(inside, 2600, 150) + noise).astype(np.uint16)


def _with_sparse_pixels(path: Path, ds: Dataset, length: int) -> Path:
    """``ds`` without pixel data, then a native Pixel Data element header declaring ``length`` bytes, the file
    extended to hold them as a hole (sparse: no disk used, reads as zeros)."""
    ds.save_as(path, enforce_file_format=True)
    with open(path, "ab") as fh:
        fh.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length))
        fh.truncate(fh.tell() + length)
    return path


def make_hostile(folder: Path) -> dict[str, Path]:
    """The hostile files, by name, written into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    small = _small_image()
    codestream = openjpeg.encode(small, bits_stored=12)
    files: dict[str, Path] = {}

    ds = _dataset(HUGE, HUGE)
    ds.PixelData = bytes(100_000)
    files["native_60000x60000"] = folder / "native_60000x60000.dcm"
    ds.save_as(files["native_60000x60000"], enforce_file_format=True)

    ds = _dataset(HUGE, HUGE, JPEG2000Lossless)
    ds.PixelData = encapsulate([codestream])
    files["j2k_header_60000x60000"] = folder / "j2k_header_60000x60000.dcm"
    ds.save_as(files["j2k_header_60000x60000"], enforce_file_format=True)

    # The codestream's own SIZ says 60000x60000 too (Xsiz, Ysiz at bytes 8-16): only the size tells.
    claimed = codestream[:8] + struct.pack(">II", HUGE, HUGE) + codestream[16:]
    ds = _dataset(HUGE, HUGE, JPEG2000Lossless)
    ds.PixelData = encapsulate([claimed])
    files["j2k_codestream_60000x60000"] = folder / "j2k_codestream_60000x60000.dcm"
    ds.save_as(files["j2k_codestream_60000x60000"], enforce_file_format=True)

    # A GE-like file: a JP2 file under JPEG Lossless, its frame another size than the header's 2294x1914.
    ds = _dataset(2294, 1914, JPEGLosslessSV1)
    ds.PixelData = encapsulate([openjpeg.encode(small, bits_stored=12, codec_format=1)])
    files["jp2_under_jpeg_lossless"] = folder / "jp2_under_jpeg_lossless.dcm"
    ds.save_as(files["jp2_under_jpeg_lossless"], enforce_file_format=True)

    ds = _dataset(1000, 1000, NumberOfFrames=1000)
    files["dbt_1000_frames_2gb"] = _with_sparse_pixels(folder / "dbt_1000_frames_2gb.dcm", ds, 1000 * 1000 * 2 * 1000)

    files["zeros_256mb"] = folder / "zeros_256mb.dcm"
    with open(files["zeros_256mb"], "wb") as fh:
        fh.truncate(256 << 20)
    return files


def make_slow(folder: Path) -> Path:
    """A legitimate full-size image that takes a while: 5355x4915 in RLE, which decodes only in full."""
    rows, cols = 5355, 4915
    stored = np.repeat(np.repeat(_small_image(rows // 15 + 1, cols // 15 + 1), 15, 0), 15, 1)[:rows, :cols]
    folder.mkdir(parents=True, exist_ok=True)
    ds = _dataset(rows, cols, RLELossless)
    ds.compress(RLELossless, np.ascontiguousarray(stored), encoding_plugin="pylibjpeg", generate_instance_uid=False)
    path = folder / "slow_rle_5355x4915.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


# What a decode worker does with one file, in a fresh process: imports first, then the file under the budget.
_ONE_FILE = """
import json, resource, sys, time
from dens.engine import DEFAULT_MEMORY_BUDGET
from dens.route.decode import data_memory
from dens.route.errors import UnusableFile
from dens.route.preprocess import load

def status(field):
    with open("/proc/self/" + ("io" if field == "rchar" else "status")) as fh:
        return int(next(line for line in fh if line.startswith(field)).split()[1])

# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent at fork and exec.
before_kib, before_read = status("VmHWM"), status("rchar")
resource.setrlimit(resource.RLIMIT_DATA, (data_memory() + DEFAULT_MEMORY_BUDGET, resource.RLIM_INFINITY))
start = time.perf_counter()
try:
    load(sys.argv[1])
    outcome, reason = "ok", ""
except UnusableFile as exc:
    outcome, reason = exc.status, f"{exc.reason.value}: {exc.detail}"
seconds = time.perf_counter() - start
print(json.dumps({
    "status": outcome,
    "reason": reason,
    "seconds": round(seconds, 4),
    "bytes_read": status("rchar") - before_read,
    "rss_before_mib": round(before_kib / 1024, 1),
    "peak_rss_mib": round(status("VmHWM") / 1024, 1),
}))
"""


def file_cost(path: Path) -> dict:
    """One file through ``load`` in a fresh process, as a decode worker runs it (see ``_ONE_FILE``)."""
    proc = subprocess.run([sys.executable, "-c", _ONE_FILE, str(path)], capture_output=True, text=True, timeout=600)
    if proc.returncode:
        return {"status": "process failed", "returncode": proc.returncode, "stderr": proc.stderr[-2000:]}
    cost = json.loads(proc.stdout.strip().splitlines()[-1])
    cost["peak_over_imports_mib"] = round(cost["peak_rss_mib"] - cost["rss_before_mib"], 1)
    return cost


def pool_run(files: list[Path], workers: int) -> dict:
    """The decode engine over ``files``: wall seconds from the pool's start (worker start-up included, as a
    run has it) and from its first result to its last, the seconds summed over the workers, and the
    statuses it gave."""
    from dens.engine import DecodePool
    from dens.route.config import PreprocessConfig

    statuses: dict[str, int] = {}
    worker_seconds = 0.0
    start = time.perf_counter()
    first = None
    with DecodePool(workers, PreprocessConfig()) as pool:
        for decoded in pool.map((str(p), "") for p in files):
            first = first or time.perf_counter()
            statuses[decoded.status] = statuses.get(decoded.status, 0) + 1
            worker_seconds += decoded.seconds
        end = time.perf_counter()
    return {
        "files": len(files),
        "seconds": round(end - start, 3),
        "seconds_after_first": round(end - first, 3) if first else None,
        "worker_seconds": round(worker_seconds, 3),  # summed time in the workers: less noisy than wall time
        "statuses": statuses,
    }


def infer_run(studies: Path, model: Path, out: Path) -> dict:
    """dens-infer over ``studies`` as a user runs it (a fresh process, start-up included): wall seconds, and
    its rows by status. Exit status 3 (error rows) is what hostile files give."""
    command = [sys.executable, "-c", "from dens.infer.cli import main; main()", str(studies)]
    start = time.perf_counter()
    proc = subprocess.run(
        [*command, "--model", str(model), "--out", str(out), "--overwrite", "--no-progress"],
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if proc.returncode not in (0, 3):
        raise SystemExit(f"dens-infer failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    statuses: dict[str, int] = {}
    with open(out, newline="") as f:
        for row in csv.DictReader(f):
            statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    return {"seconds": round(seconds, 3), "statuses": statuses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=25, help="dens-synth patients (4 images each)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="pool runs per mix; the best is kept")
    args = parser.parse_args()

    from dens.synth import generate

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hostile = make_hostile(tmp / "hostile")
        costs = {name: file_cost(path) for name, path in hostile.items()}
        for name, cost in costs.items():
            print(f"{name}: {cost}", flush=True)
        slow = make_slow(tmp / "slow")
        slow_cost = file_cost(slow)
        print(f"slow file alone: {slow_cost}", flush=True)

        generate(tmp / "cohort", args.patients, size="small", seed=3, progress=False)
        good = sorted((tmp / "cohort").rglob("*.dcm"))
        middle = len(good) // 2
        mixes = {
            "good": good,
            "good+hostile": good[:middle] + list(hostile.values()) + good[middle:],
            "slow first+good+hostile": [slow, *good[:middle], *hostile.values(), *good[middle:]],
        }
        runs: dict[str, dict] = {}
        for _ in range(args.repeat):  # interleaved, so a burst of other work on the machine hits every mix
            for name, files in mixes.items():
                run = pool_run(files, args.workers)
                print(f"{name}: {run}", flush=True)
                if name not in runs or run["seconds"] < runs[name]["seconds"]:
                    runs[name] = run
        # dens-infer end to end, as the aim is put: the good files alone, and with the hostile files
        # among them (linked into a second folder), taking turns; a small model so decoding weighs.
        (tmp / "model").mkdir()
        _, model, _ = export_models(tmp / "model", "resnet18", 256)
        mixed = tmp / "mixed"
        mixed.mkdir()
        (mixed / "cohort").symlink_to(tmp / "cohort", target_is_directory=True)
        for name, path in hostile.items():
            (mixed / f"hostile-{name}{path.suffix}").symlink_to(path)
        infer_runs: dict[str, dict] = {}
        for _ in range(args.repeat):
            for name, folder in (("good", tmp / "cohort"), ("good+hostile", mixed)):
                run = infer_run(folder, model, tmp / f"{name}.csv")
                print(f"dens-infer {name}: {run}", flush=True)
                if name not in infer_runs or run["seconds"] < infer_runs[name]["seconds"]:
                    infer_runs[name] = run
        infer_runs["good+hostile"]["ratio_to_good"] = round(
            infer_runs["good+hostile"]["seconds"] / infer_runs["good"]["seconds"], 3
        )
    base = runs["good"]["seconds"]
    for run in runs.values():
        run["ratio_to_good"] = round(run["seconds"] / base, 3)
        run["worker_seconds_ratio_to_good"] = round(run["worker_seconds"] / runs["good"]["worker_seconds"], 3)
    # What the slow file adds as work, spread over the workers: the least its mix can take.
    slow_share = slow_cost.get("seconds", 0.0) / args.workers
    runs["slow first+good+hostile"]["work_bound_ratio"] = round((base + slow_share) / base, 3)

    # No "benchmark" key: bench/summarize.py has no figures for this one (it holds no img/s) and skips a
    # record without that key, so README's table stays what it is.
    record = {
        "name": "hostile",
        "date": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
        "machine": machine(),
        "command": command(),
        "load_average_end": list(os.getloadavg()),
        "settings": {"patients": args.patients, "good_files": len(good), "workers": args.workers},
        "hostile_file_costs": costs,
        "slow_file_cost": slow_cost,
        "pool_runs": runs,
        "dens_infer_runs": {"model": "resnet18 S=256, random init", **infer_runs},
        "aim": "a hostile-geometry file under 1 s and 200 MB; good+hostile within 1.10 of good alone",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "hostile.json"
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")


if __name__ == "__main__":
    main()
