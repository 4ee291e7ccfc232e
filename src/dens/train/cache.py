"""The decoded cache: every labelled image decoded once through :func:`dens.route.preprocess.load` into ``.npy``
files keyed by the file (path, size, mtime), the :class:`PreprocessConfig` and the route's code (and the
versions of the libraries it decodes and resizes with). Epochs, validation and test read the cache, so
validation and test see exactly the canonical image inference sees. The cache lives in ``--cache``
(default ``~/.cache/dens``, shared by every run on the machine) as
``<PreprocessConfig key>-<route digest>/<xx>/<key>.npy`` with the file's ImageInfo in ``<key>.json``, or
``<key>.err.json`` for a file that yields no image; deleting the folder only costs one decode. The cache is
filled by the decode engine (:mod:`dens.engine`), as dens-infer decodes.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

import dens
import dens.route
from dens import labels
from dens.engine import Decoded, DecodePool
from dens.files import atomic_write
from dens.manifest import MISSING_FILE, with_identity
from dens.route.errors import Reason
from dens.route.preprocess import PreprocessConfig

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
_ROUTE_LIBRARIES = (
    "numpy",
    "opencv-python-headless",
    "Pillow",
    "pydicom",
    "pylibjpeg",
    "pylibjpeg-openjpeg",
    "pylibjpeg-libjpeg",
    "pylibjpeg-rle",
    "pyjpegls",
    "python-gdcm",
)


@functools.cache
def route_version() -> str:
    """A digest of the code that turns a file into the canonical image (every module of :mod:`dens.route`) and
    of the versions of the libraries it decodes and resizes with."""
    digest = hashlib.sha256(dens.__version__.encode())
    for module in sorted(Path(dens.route.__file__).parent.glob("*.py")):
        digest.update(module.read_bytes())
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


def _store(decoded: Decoded, base: Path) -> CacheEntry:
    """Write one decoded file's entry into the cache, or say why it has none. A file's own verdict (not a
    mammogram, corrupt pixel data) is cached too: it stays unusable until it changes, and its key with it.
    A failure of the machinery (a codec that crashed or hung its worker, a bug) is listed, never cached."""
    base.parent.mkdir(parents=True, exist_ok=True)
    if decoded.status != "ok":
        if Reason(decoded.code).is_verdict:
            with atomic_write(base.with_suffix(".err.json")) as fh:
                fh.write(json.dumps({"reason": decoded.code, "detail": decoded.detail}).encode())
        return CacheEntry(decoded.path, None, {}, decoded.code, decoded.detail)
    with atomic_write(base.with_suffix(".npy")) as fh:
        np.save(fh, decoded.image, allow_pickle=False)
    blob = json.dumps(decoded.info)
    with atomic_write(base.with_suffix(".json")) as fh:
        fh.write(blob.encode())
    return CacheEntry(decoded.path, str(base.with_suffix(".npy")), json.loads(blob))  # as a cache hit reads it


def build_cache(
    paths: Sequence[str], cfg: PreprocessConfig, root: str | Path, workers: int | None = None, progress: bool = True
) -> tuple[list[CacheEntry], int]:
    """Decode every file not yet in the cache on the decode engine; returns one entry per path and how many
    were decoded now. Missing and unusable files come back with a reason, never as an exception, and a file
    that crashes or hangs a codec costs its own entry only."""
    folder = cache_dir_for(root, cfg)
    entries: dict[str, CacheEntry] = {}
    jobs: list[tuple[str, Path]] = []
    for path in paths:
        base = _entry_base(folder, path)
        if base is None:
            entries[path] = CacheEntry(path, None, {}, MISSING_FILE, "file not found or not readable")
            continue
        entry = _read_entry(path, base)
        if entry is None:
            jobs.append((path, base))
        else:
            entries[path] = entry
    if not jobs:
        return [entries[p] for p in paths], 0
    workers = max(1, min(workers or dens.usable_cores(), len(jobs)))
    log.info("decoding %d of %d images into %s (%d workers)", len(jobs), len(paths), folder, workers)
    with (
        DecodePool(workers, cfg, buffer=4 * workers) as pool,
        tqdm(total=len(jobs), unit="img", desc="decode", disable=not progress) as bar,
    ):
        for decoded in pool.map((path, "") for path, _ in jobs):
            entries[decoded.path] = _store(decoded, jobs[decoded.index][1])
            bar.update()
    return [entries[p] for p in paths], len(jobs)


def attach_cache(frame: pd.DataFrame, entries: Sequence[CacheEntry]) -> pd.DataFrame:
    """The manifest with each image's cache file (``npy``, None when unusable), ``reason`` and ``detail``,
    and the identity that forms breasts and exams (:func:`dens.manifest.with_identity`)."""
    frame = frame.copy()
    frame["npy"] = [e.npy for e in entries]
    frame[labels.REASON] = [e.reason for e in entries]
    frame["detail"] = [e.detail for e in entries]
    return with_identity(frame, [e.info for e in entries])
