"""The decoded cache: every labelled image decoded once through :func:`dens.preprocess.load` into ``.npy``
files keyed by the file (path, size, mtime), the :class:`PreprocessConfig` and the route's code (and the
versions of the libraries it decodes and resizes with). Epochs, validation and test read the cache, so
validation and test see exactly the canonical image inference sees. The cache lives in ``--cache``
(default ``~/.cache/dens``, shared by every run on the machine) as
``<PreprocessConfig key>-<route digest>/<xx>/<key>.npy`` with the file's ImageInfo in ``<key>.json``, or
``<key>.err.json`` for a file that yields no image; deleting the folder only costs one decode.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import multiprocessing as mp
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

import dens
import dens.config
import dens.decode
import dens.dicom
import dens.errors
import dens.preprocess
from dens import labels
from dens.dicom import UnusableFile
from dens.files import atomic_write
from dens.preprocess import PreprocessConfig, load

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/dens`` or ``~/.cache/dens``: shared by every run on the machine."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dens"


@dataclass(frozen=True)
class CacheEntry:
    """Where one file's canonical image lives in the cache (``npy``) or why it has none (``reason``)."""

    path: str
    npy: str | None
    info: dict
    reason: str = ""
    detail: str = ""


def cache_dir_for(root: str | Path, cfg: PreprocessConfig) -> Path:
    """The folder of one PreprocessConfig and one version of the route's code: a changed route must never
    serve images the old one made."""
    return Path(root).expanduser() / f"{cfg.key()}-{route_version()}"


# The libraries whose output is the canonical image's input: an upgraded codec or resize must not serve
# images the old one made.
_ROUTE_LIBRARIES = ("numpy", "opencv-python-headless", "Pillow", "pydicom", "pylibjpeg", "pylibjpeg-openjpeg",
                    "pylibjpeg-libjpeg", "pylibjpeg-rle", "pyjpegls", "python-gdcm")  # fmt: skip


@functools.cache
def route_version() -> str:
    """A digest of the code that turns a file into the canonical image (preprocess, dicom, decode, errors,
    config) and of the versions of the libraries it decodes and resizes with."""
    digest = hashlib.sha256(dens.__version__.encode())
    for module in (dens.preprocess, dens.dicom, dens.decode, dens.errors, dens.config):
        digest.update(Path(module.__file__).read_bytes())
    for name in _ROUTE_LIBRARIES:
        try:
            digest.update(f"{name}={importlib.metadata.version(name)}".encode())
        except importlib.metadata.PackageNotFoundError:
            digest.update(f"{name}=absent".encode())
    return digest.hexdigest()[:12]


def _entry_base(folder: Path, path: str) -> Path | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    digest = hashlib.sha256(f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:32]
    return folder / digest[:2] / digest


def _read_entry(path: str, base: Path) -> CacheEntry | None:
    ok, err = base.with_suffix(".json"), base.with_suffix(".err.json")
    if ok.exists() and base.with_suffix(".npy").exists():
        return CacheEntry(path, str(base.with_suffix(".npy")), json.loads(ok.read_text()))
    if err.exists():
        e = json.loads(err.read_text())
        return CacheEntry(path, None, {}, e["reason"], e["detail"])
    return None


def _decode_job(job: tuple[str, str, PreprocessConfig]) -> CacheEntry:
    """Decode one file into the cache (runs in a worker; only the small entry travels back)."""
    path, base_str, cfg = job
    base = Path(base_str)
    base.parent.mkdir(parents=True, exist_ok=True)
    try:
        image, info = load(path, cfg)
    except UnusableFile as exc:
        # Cached too: an unusable file stays unusable until it changes (and its key with it).
        record = {"reason": exc.reason.value, "detail": exc.detail}
        with atomic_write(base.with_suffix(".err.json")) as fh:
            fh.write(json.dumps(record).encode())
        return CacheEntry(path, None, {}, exc.reason.value, exc.detail)
    except Exception as exc:  # a bug or a transient failure: listed, not cached, never fatal to the run
        return CacheEntry(path, None, {}, "unexpected_error", f"{type(exc).__name__}: {exc}")
    with atomic_write(base.with_suffix(".npy")) as fh:
        np.save(fh, image, allow_pickle=False)
    blob = json.dumps(info.to_dict())
    with atomic_write(base.with_suffix(".json")) as fh:
        fh.write(blob.encode())
    return CacheEntry(path, str(base.with_suffix(".npy")), json.loads(blob))  # as a cache hit reads it


def _init_worker() -> None:
    # One image per process: library thread pools would only fight over the cores.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"  # for libraries not yet initialised; the loaded ones are set below
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def build_cache(paths: Sequence[str], cfg: PreprocessConfig, root: str | Path, workers: int | None = None,
                progress: bool = True) -> tuple[list[CacheEntry], int]:  # fmt: skip
    """Decode every file not yet in the cache, in parallel; returns one entry per path and how many were
    decoded now. Missing and unusable files come back with a reason, never as an exception."""
    folder = cache_dir_for(root, cfg)
    entries: dict[str, CacheEntry] = {}
    jobs = []
    for path in paths:
        base = _entry_base(folder, path)
        if base is None:
            entries[path] = CacheEntry(path, None, {}, "missing_file", "file not found or not readable")
            continue
        entry = _read_entry(path, base)
        if entry is None:
            jobs.append((path, str(base), cfg))
        else:
            entries[path] = entry
    workers = max(1, min(workers or dens.usable_cores(), len(jobs)))
    if jobs:
        log.info("decoding %d of %d images into %s (%d workers)", len(jobs), len(paths), folder, workers)
    with tqdm(total=len(jobs), unit="img", desc="decode", disable=not progress or not jobs) as bar:
        if workers == 1:
            results = map(_decode_job, jobs)
        else:
            # Not fork: a parent that already ran OpenCV (a test suite, a notebook) leaves its thread pool
            # locked in forked children. A fork server starts clean and imports this module once.
            context = mp.get_context("forkserver")
            context.set_forkserver_preload([__name__])
            pool = context.Pool(workers, initializer=_init_worker)
            results = pool.imap_unordered(_decode_job, jobs, chunksize=4)
        for entry in results:
            entries[entry.path] = entry
            bar.update()
        if workers > 1:
            pool.close()
            pool.join()
    return [entries[p] for p in paths], len(jobs)


def attach_cache(frame: pd.DataFrame, entries: Sequence[CacheEntry]) -> pd.DataFrame:
    """The manifest with each image's cache file (``npy``, None when unusable), ``reason`` and ``detail``.

    A breast is (patient, study, laterality): study, laterality and view come from the CSV where it gives
    them, else from the file's header (or, for laterality, its pixels) as the shared route read it.
    """
    frame = frame.copy()
    frame["npy"] = [e.npy for e in entries]
    frame[labels.REASON] = [e.reason for e in entries]
    frame["detail"] = [e.detail for e in entries]
    for column in (labels.STUDY_UID, labels.LATERALITY, labels.VIEW):
        from_file = pd.Series([e.info.get(column, "") for e in entries], index=frame.index)
        frame[column] = frame[column].where(frame[column] != "", from_file) if column in frame else from_file
    return frame
