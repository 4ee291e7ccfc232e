"""Run directories: where `dens-train` writes, and how later stages find the newest run."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_ROOT = Path("runs")
LATEST = "latest"


def update_latest(run_dir: str | Path) -> Path:
    """Point ``<root>/latest`` at ``run_dir`` (a relative symlink, replaced atomically)."""
    run_dir = Path(run_dir).resolve()
    link = run_dir.parent / LATEST
    tmp = run_dir.parent / f".{LATEST}.tmp{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(run_dir.name, target_is_directory=True)
    os.replace(tmp, link)
    return link


def latest_run(root: str | Path = DEFAULT_ROOT) -> Path:
    """The newest run directory under ``root`` (``root/latest``), with a clear error when there is none."""
    link = Path(root) / LATEST
    if not link.exists():
        raise FileNotFoundError(
            f"no run found: {link} does not exist. Train one with `dens-train --data ... --out {root}/NAME`, "
            "or name the file explicitly (--checkpoint / --model)."
        )
    return link.resolve()


def latest_file(name: str, root: str | Path = DEFAULT_ROOT) -> Path:
    """A file in the newest run (``best.pt``, ``model.onnx``), with an error saying how to make it."""
    path = latest_run(root) / name
    if not path.exists():
        hint = "run `dens-export --onnx` first" if name.endswith(".onnx") else "the run may not have finished"
        raise FileNotFoundError(f"{path} does not exist: {hint}, or name the file explicitly.")
    return path
