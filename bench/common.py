"""What every benchmark records: the machine it ran on, versions, and where results go."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import subprocess
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """CPU, core count, memory, GPU (if any) and library versions, for the results file."""
    info = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
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
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_result(name: str, payload: dict) -> Path:
    """Write ``payload`` plus machine info to bench/results/<name>-<host>-<timestamp>.json."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    info = machine()
    path = RESULTS / f"{name}-{info['host']}-{stamp}.json"
    path.write_text(json.dumps({"benchmark": name, "date": stamp, "machine": info, **payload}, indent=2))
    return path
