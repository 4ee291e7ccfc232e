"""What every benchmark records: the machine it ran on, versions, and where results go."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

from dens import usable_cores

REPO = Path(__file__).resolve().parents[1]
# DENS_BENCH_RESULTS: somewhere else to write (the test suite's smoke runs of each benchmark).
RESULTS = Path(os.environ.get("DENS_BENCH_RESULTS") or REPO / "bench" / "results")
# The full-size synthetic cohort `make bench` shares between benchmarks: seed 14 covers all four detector
# sizes of dens.synth (2294x1914, 3328x2560, 4096x3328, 5355x4915) with JPEG 2000 at each, and every transfer
# syntax dens-synth writes, within its first 6 patients; 12 patients (about 50 files) let the end-to-end
# runs last long enough that start-up is a small part of them.
COHORT_SEED, COHORT_PATIENTS = 14, 12
DEFAULT_COHORT = REPO / ".cache" / "bench-cohort"  # git-ignored
# The real mammograms are never in the repository (their terms forbid redistribution): DENS_REAL_MAMMO names
# a folder of them. The default is where CI keeps them, beside the checkout.
REAL_MAMMO_ENV = "DENS_REAL_MAMMO"
REAL_MAMMO = Path(os.environ.get(REAL_MAMMO_ENV) or REPO.parent / "shared" / "data" / "real-mammo")


def ensure_cohort(path: Path, patients: int = COHORT_PATIENTS, seed: int = COHORT_SEED) -> Path:
    """A full-size dens-synth cohort at ``path``. A folder of the user's with a train.csv is used as it is;
    the default folder is (re)made whenever it does not hold this seed and patient count."""
    spec = f"dens-synth --size full --seed {seed} --patients {patients}"
    stamp = path.with_name(path.name + ".spec")  # beside it: dens-synth --overwrite deletes only its own files
    complete = (path / "train.csv").is_file()
    if complete and (path != DEFAULT_COHORT or (stamp.is_file() and stamp.read_text() == spec)):
        return path
    from dens.synth import generate

    print(f"making a full-size synthetic cohort in {path} ({spec}) ...", flush=True)
    generate(path, patients=patients, size="full", seed=seed, overwrite=True, progress=False)
    stamp.write_text(spec)
    return path


def sync(device) -> None:
    """Wait for a CUDA device's queued work, so that a timing covers it (nothing to wait for on a CPU)."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def up_to(n: int) -> list[int]:
    """1, 2, 4 ... below ``n``, then ``n``: the counts a sweep over workers, threads or processes takes."""
    return sorted({2**i for i in range(n.bit_length()) if 2**i < n} | {n})


def export_models(root: Path, arch: str, size: int, fp16: bool = False) -> tuple[Path, Path, Path | None]:
    """A random-init checkpoint (speed does not depend on the weights), its ONNX export and, with ``fp16``,
    the fp16 export: (checkpoint, model.onnx, model-fp16.onnx or None)."""
    import torch

    from dens.artifact.model import build_model, save_checkpoint
    from dens.export.onnx import export_onnx
    from dens.route.config import PreprocessConfig

    torch.manual_seed(0)
    checkpoint = root / "best.pt"
    save_checkpoint(checkpoint, build_model(arch), PreprocessConfig(size=size))
    onnx = export_onnx(checkpoint, root / "model.onnx")
    return checkpoint, onnx, export_onnx(checkpoint, root / "model-fp16.onnx", fp16=True) if fp16 else None


def machine() -> dict:
    """CPU, core count, memory, GPU (if any) and library versions, for the results file."""
    info = {
        # DENS_BENCH_HOST names a machine whose host name says nothing (a cloud machine's is often random).
        "host": os.environ.get("DENS_BENCH_HOST") or socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "affinity": usable_cores(),
        "memory_gib": _memory_gib(),
        "gpu": _gpu_name(),
    }
    for module in ("numpy", "cv2", "PIL", "pydicom", "openjpeg", "torch", "onnxruntime"):
        try:
            info[f"{module}_version"] = __import__(module).__version__
        except Exception:  # a bench that does not need a module still records the rest
            info[f"{module}_version"] = None
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _gpu_name() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def shown(path: Path | str) -> str:
    """``path`` as a results file records it: relative to the repository when inside it, else its name
    alone, so that a committed result names no folder of the machine that ran it."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name


def command() -> str:
    """The command that ran, as a result file records it: an absolute path in its arguments is cut to its
    folder and file name, so that no result names a folder of the machine that made it."""

    def shown(arg: str) -> str:
        option, eq, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        if Path(value).is_absolute():
            value = Path(*Path(value).parts[-2:]).as_posix()
        return f"{option}{eq}{value}"

    return "python bench/" + " ".join([Path(sys.argv[0]).name, *map(shown, sys.argv[1:])])


def write_result(name: str, payload: dict) -> Path:
    """Write ``payload`` plus machine info to bench/results/<name>-<host>-<timestamp>.json."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    info = machine()
    path = RESULTS / f"{name}-{info['host']}-{stamp}.json"
    # The command that made it (for bench/README.md's table) and the load average, which says how much other
    # work shared the machine while it ran.
    record = {
        "benchmark": name,
        "date": stamp,
        "machine": info,
        "command": command(),
        "load_average_end": list(os.getloadavg()),
        **payload,
    }
    path.write_text(json.dumps(record, indent=2))
    return path
