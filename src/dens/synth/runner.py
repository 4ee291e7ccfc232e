"""SynthConfig -> :func:`run`: plan the cohort, write its files in worker processes, then ``train.csv``.

Every random draw comes from a generator seeded by (seed, patient, image), never from the clock: the same
seed gives the same bytes whatever the worker count.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

import dens
from dens.artifact.modelcard import SYNTH_MARKER
from dens.synth.cohort import COLUMNS, plan_patient
from dens.synth.image import write_image

SIZES = ("small", "full")
MAX_SEED = 2**32 - 1  # the seed is part of every UID, which may not exceed 64 characters


@dataclass(frozen=True)
class SynthConfig:
    """One dens-synth run. ``size``: ``"small"`` (detector sizes / 4) or ``"full"``; ``workers`` None: all
    CPUs (the count never changes the output); ``overwrite`` replaces an earlier cohort in ``out`` (and
    nothing else)."""

    out: Path
    patients: int
    size: str = "small"
    seed: int = 0
    workers: int | None = None
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        patients, seed, workers = self.patients, self.seed, self.workers
        if isinstance(patients, bool) or not isinstance(patients, (int, np.integer)) or patients < 1:
            raise ValueError(f"patients must be a whole number >= 1, got {patients!r}")
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {', '.join(SIZES)}, got {self.size!r}")
        if not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed must be a whole number in 0..{MAX_SEED}, got {seed!r}")
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers!r}")


def run(cfg: SynthConfig) -> pd.DataFrame:
    """Write the cohort ``cfg`` describes and return its ``train.csv`` rows.

    ``train.csv`` is written last, so its presence means the cohort is complete. Workers are started by a
    fork server, so a script that runs this with ``workers > 1`` needs the usual
    ``if __name__ == "__main__":`` guard.
    """
    out = Path(cfg.out)
    _prepare(out, cfg.overwrite)
    patients, seed = int(cfg.patients), int(cfg.seed)
    planned = [item for index in range(patients) for item in plan_patient(seed, index, cfg.size)]
    specs = [spec for spec, _ in planned]
    write = functools.partial(write_image, str(out))
    workers = min(cfg.workers or dens.usable_cores(), len(specs))
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(specs), unit="img", desc="dens-synth", disable=not cfg.progress) as bar:
        if workers == 1:
            for spec in specs:
                write(spec)
                bar.update()
        else:
            # Not fork: a parent that already ran OpenCV (a test, a notebook) leaves its thread pool
            # locked in forked children. A fork server starts clean and imports the writer once.
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([write_image.__module__])
            with context.Pool(workers, initializer=_init_worker) as pool:
                for _ in pool.imap_unordered(write, specs):
                    bar.update()
    table = pd.DataFrame([row for _, row in planned], columns=list(COLUMNS))
    # The marker that says these are phantoms: a model trained on them says so in its card and in dens-infer.
    marker = {"generator": "dens-synth", "dens_version": dens.__version__, "patients": patients, "seed": seed}
    (out / SYNTH_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    table.to_csv(out / "train.csv", index=False)
    return table


def generate(
    out_dir: str | Path,
    patients: int,
    size: str = "small",
    seed: int = 0,
    workers: int | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """Write a synthetic screening cohort under ``out_dir`` and return its ``train.csv`` rows: :func:`run`
    for callers that have no :class:`SynthConfig` (tests, benchmarks, notebooks)."""
    cfg = SynthConfig(Path(out_dir), patients, size, seed, workers, overwrite=overwrite, progress=progress)
    return run(cfg)


def _prepare(out: Path, overwrite: bool) -> None:
    """Make sure writing to ``out`` loses nothing of the user's: empty, or an earlier cohort to replace."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; give a folder for the cohort")
    entries = list(out.iterdir()) if out.exists() else []
    if entries and not overwrite:
        raise FileExistsError(f"{out} is not empty; choose an empty folder or pass --overwrite")
    if entries:
        # Only ever delete what looks like an earlier cohort: train.csv, its marker and patient folders.
        ours = ("train.csv", SYNTH_MARKER)
        foreign = [e.name for e in entries if not (e.name in ours or (e.is_dir() and e.name.isdigit()))]
        if foreign:
            raise FileExistsError(
                f"{out} holds files dens-synth did not write ({', '.join(foreign[:3])}); choose an empty folder"
            )
        for entry in entries:
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one image per process; threads would only fight over the cores
