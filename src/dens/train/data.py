"""Training data: the manifest of labelled images, the patient-grouped split, the decoded cache, the dataset
and sampler the loaders use, and the training augmentation.

Inputs understood by :func:`read_manifest`:

* the RSNA layout: ``train.csv`` (patient_id, image_id, laterality, view, density) with images at
  ``train_images/<patient_id>/<image_id>.dcm`` beside it;
* ``dens-synth`` output, or any CSV with a ``path`` column (relative to the CSV's folder, or absolute) and
  ``density`` (A-D, or 1-4), optionally ``patient_id``, ``laterality``, ``view``, ``study_uid``.

Every image is decoded once through :func:`dens.preprocess.load` into a cache of ``.npy`` files keyed by the
file (path, size, mtime), the :class:`PreprocessConfig` and the route's code; epochs, validation and test
read the cache, so validation and test see exactly the canonical image inference sees. The cache lives in
``--cache`` (default ``~/.cache/dens``, shared by every run on the machine) as
``<PreprocessConfig key>-<route code digest>/<xx>/<key>.npy`` with the file's ImageInfo in ``<key>.json``,
or ``<key>.err.json`` for a file that yields no image; deleting the folder only costs one decode.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import multiprocessing as mp
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
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

SPLITS = ("train", "val", "test")
LABEL = "label"  # the class index of `density`
SPLIT = "split"
_NUMERIC_DENSITY = {"1": "A", "2": "B", "3": "C", "4": "D"}  # BI-RADS a-d written as 1-4 (CBIS-DDSM and others)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/dens`` or ``~/.cache/dens``: shared by every run on the machine."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dens"


# --- manifest ------------------------------------------------------------------------------------------


def read_manifest(data: str | Path) -> tuple[pd.DataFrame, dict]:
    """The labelled images under ``data`` (a folder holding ``train.csv``, or a CSV file).

    Returns one row per labelled image with absolute ``path``, ``density`` (A-D), ``label`` (0-3),
    ``patient_id`` and whichever identity columns the CSV has, plus counts of what was left out.
    Raises ValueError with a message naming the file and what to fix.
    """
    data = Path(data)
    csv = data / "train.csv" if data.is_dir() else data
    if not csv.is_file():
        raise ValueError(f"{data}: no labels found. Give a folder holding train.csv (RSNA layout or dens-synth "
                         "output) or a CSV with columns path,density[,patient_id].")  # fmt: skip
    frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    root = csv.parent
    if labels.DENSITY not in frame.columns:
        raise ValueError(f"{csv}: no '{labels.DENSITY}' column (columns: {', '.join(frame.columns)})")
    if labels.PATH in frame.columns:
        source = "csv"
        frame[labels.PATH] = [str(p if Path(p).is_absolute() else root / p) for p in frame[labels.PATH]]
    elif {labels.PATIENT_ID, labels.IMAGE_ID} <= set(frame.columns):
        source = "rsna"
        pairs = zip(frame[labels.PATIENT_ID], frame[labels.IMAGE_ID], strict=True)
        frame[labels.PATH] = [str(root / "train_images" / p / f"{i}.dcm") for p, i in pairs]
    else:
        raise ValueError(f"{csv}: needs a '{labels.PATH}' column, or '{labels.PATIENT_ID}' and '{labels.IMAGE_ID}' "
                         "(RSNA layout, images under train_images/<patient_id>/<image_id>.dcm)")  # fmt: skip

    density = frame[labels.DENSITY].str.strip().str.upper().str.replace(r"\.0$", "", regex=True)
    density = density.map(lambda d: _NUMERIC_DENSITY.get(d, d))
    missing = density == ""
    bad = ~missing & ~density.isin(labels.CLASSES)
    if bad.any():
        rows = ", ".join(f"line {i + 2}: {v!r}" for i, v in frame.loc[bad, labels.DENSITY].head(5).items())
        raise ValueError(f"{csv}: {int(bad.sum())} rows have a density that is not A-D or 1-4 ({rows})")
    frame[labels.DENSITY] = density
    frame = frame.loc[~missing].reset_index(drop=True)
    frame[LABEL] = frame[labels.DENSITY].map(labels.CLASSES.index).astype(np.int64)
    if labels.PATIENT_ID not in frame.columns or (frame[labels.PATIENT_ID] == "").all():
        log.warning("%s has no patient_id: every image counts as its own patient, so the split cannot keep a "
                    "patient's views together", csv)  # fmt: skip
        frame[labels.PATIENT_ID] = frame[labels.PATH]
    if frame.empty:
        raise ValueError(f"{csv}: no row has a density; nothing to train on")
    duplicated = frame[labels.PATH].duplicated()
    if duplicated.any():
        first = frame.loc[duplicated, labels.PATH].iloc[0]
        raise ValueError(f"{csv}: {int(duplicated.sum())} rows repeat a file (first: {first}); list each file once")
    info = {"csv": str(csv), "source": source, "rows": len(frame) + int(missing.sum()),
            "without_density": int(missing.sum()), "labelled": len(frame)}  # fmt: skip
    return frame, info


# --- split ---------------------------------------------------------------------------------------------


def assign_split(frame: pd.DataFrame, fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0) -> pd.Series:
    """'train' / 'val' / 'test' per row, grouped by patient and stratified by the patient's density.

    Each stratum (patients whose most common label is the same) gives every split the floor or the ceiling
    of its share; the patients left over go to the splits furthest behind their share of the whole cohort.
    So every class lands within one patient of the fractions in every split, and the totals match them.
    With three patients or more, validation and test each get at least one.
    """
    fractions = np.asarray(fractions, np.float64) / np.sum(fractions)
    rng = np.random.default_rng(seed)
    per_patient = frame.groupby(labels.PATIENT_ID, sort=True)[LABEL].agg(lambda s: s.value_counts().idxmax())
    counts, seen, chosen = np.zeros(len(SPLITS)), 0, {}
    for c in sorted(per_patient.unique()):
        patients = rng.permutation(per_patient.index[per_patient == c].to_numpy())
        quota = fractions * len(patients)
        take = np.floor(quota + 1e-9)
        seen += len(patients)
        lag = fractions * seen - (counts + take)
        can = np.flatnonzero(quota - take > 1e-9)
        for s in can[np.argsort(-lag[can], kind="stable")][: len(patients) - int(take.sum())]:
            take[s] += 1
        bounds = np.cumsum(take).astype(int)
        for i, patient in enumerate(patients):
            chosen[patient] = int(np.searchsorted(bounds, i, side="right"))
        counts += take
    order = per_patient.index.tolist()
    for s in (1, 2):  # a tiny cohort still needs something to validate and test on
        if counts[s] == 0 and counts[0] > 1:
            patient = next(p for p in reversed(order) if chosen[p] == 0)
            chosen[patient], counts[0], counts[s] = s, counts[0] - 1, 1
    return frame[labels.PATIENT_ID].map(lambda p: SPLITS[chosen[p]]).rename(SPLIT)


# --- decoded cache -------------------------------------------------------------------------------------


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


def describe(frame: pd.DataFrame) -> dict:
    """Images, patients and classes per split, and the unusable files by reason; ValueError when a split is
    left with no usable image."""
    unusable = frame[frame["npy"].isna()]
    usable = frame[frame["npy"].notna()]
    out = {"unusable": len(unusable), "unusable_reasons": unusable[labels.REASON].value_counts().to_dict()}
    for split in SPLITS:
        part = usable[usable[SPLIT] == split]
        if part.empty:
            raise ValueError(f"the {split} split has no usable image ({len(frame)} labelled, {len(unusable)} "
                             "unusable): give more patients")  # fmt: skip
        counts = part[labels.DENSITY].value_counts()
        out[split] = {"images": len(part), "patients": int(part[labels.PATIENT_ID].nunique()),
                      "classes": {c: int(counts.get(c, 0)) for c in labels.CLASSES}}  # fmt: skip
    return out


# --- loading -------------------------------------------------------------------------------------------


class CachedImages(torch.utils.data.Dataset):
    """Canonical images from the cache: ``(uint8 [1, S, S], label)`` per item, no transformation."""

    def __init__(self, files: Sequence[str], targets: Sequence[int]):
        self.files, self.targets = list(files), np.asarray(targets, np.int64)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(np.load(self.files[i]))[None], int(self.targets[i])


class EpochSampler(torch.utils.data.Sampler[int]):
    """Training order for one rank: a permutation (or, balanced, class-weighted draws with replacement)
    fixed by (seed, epoch), padded to a multiple of the world size and dealt rank by rank.

    The order depends only on (seed, epoch), so a resumed run sees the same batches; ``start`` skips the
    samples an interrupted epoch had already used.
    """

    def __init__(self, targets: Sequence[int], *, balanced: bool = False, seed: int = 0, rank: int = 0,
                 world: int = 1):  # fmt: skip
        self.targets = np.asarray(targets, np.int64)
        self.balanced, self.seed, self.rank, self.world = balanced, seed, rank, world
        self.epoch, self.start = 0, 0
        self.per_rank = -(-len(self.targets) // world)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        n = len(self.targets)
        if self.balanced:
            counts = np.bincount(self.targets, minlength=labels.NUM_CLASSES)
            weights = torch.as_tensor(1.0 / counts[self.targets], dtype=torch.float64)
            order = torch.multinomial(weights, n, replacement=True, generator=g)
        else:
            order = torch.randperm(n, generator=g)
        order = order.tolist()
        order += order[: self.per_rank * self.world - n]  # every rank gets the same number of samples
        return iter(order[self.rank :: self.world][self.start :])


def class_weights(targets: Sequence[int], k: int = labels.NUM_CLASSES) -> torch.Tensor:
    """Inverse-frequency loss weights, normalised so the average weight over the training images is 1."""
    counts = np.bincount(np.asarray(targets, np.int64), minlength=k).astype(np.float64)
    weights = np.divide(1.0, counts, out=np.zeros(k), where=counts > 0)
    weights *= counts.sum() / max((weights * counts).sum(), 1e-12)
    return torch.as_tensor(weights, dtype=torch.float32)


# --- augmentation --------------------------------------------------------------------------------------

ROTATION_DEG, SCALE, TRANSLATE, GAMMA, GAIN = 7.0, (0.9, 1.1), 0.03, (0.8, 1.25), (0.9, 1.1)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Training augmentation on a uint8 batch ``[N, 1, S, S]`` (any device), after the shared route.

    A small affine (rotation ±7°, scale 0.9-1.1, shift ±3%) and a gamma/gain jitter. No horizontal flip:
    the canonical image has the chest wall on the left, and inference never sees it elsewhere. Draws come
    from ``generator`` (CPU), so the sequence is reproducible and can be resumed.
    """
    n = images.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)

    angle = torch.deg2rad(uniform(-ROTATION_DEG, ROTATION_DEG))
    scale = uniform(*SCALE)
    shift = uniform(-2 * TRANSLATE, 2 * TRANSLATE), uniform(-2 * TRANSLATE, 2 * TRANSLATE)  # grid spans [-1, 1]
    gamma = torch.exp(uniform(np.log(GAMMA[0]), np.log(GAMMA[1])))
    gain = uniform(*GAIN)
    # affine_grid maps output to input coordinates: the inverse of "rotate by angle, zoom by scale".
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[0]], 1), torch.stack([sin, cos, shift[1]], 1)], 1)
    x = images.float() / 255.0
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp_(0, 1)
    x = x.pow(gamma.to(x).view(n, 1, 1, 1)).mul_(gain.to(x).view(n, 1, 1, 1))
    return x.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
