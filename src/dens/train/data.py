"""Training data: the manifest of labelled images, the patient-grouped split, the dataset and sampler the
loaders use, and the training augmentation.

Inputs understood by :func:`read_manifest`:

* the RSNA layout: ``train.csv`` (patient_id, image_id, laterality, view, density) with images at
  ``train_images/<patient_id>/<image_id>.dcm`` beside it;
* ``dens-synth`` output, or any CSV with a ``path`` column (relative to the CSV's folder, or absolute) and
  ``density`` (A-D, or 1-4), optionally ``patient_id``, ``laterality``, ``view``, ``study_uid``.

The images themselves come from the decoded cache (:mod:`dens.train.cache`): every image is decoded once
through the shared route, and epochs, validation and test read the cache.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from dens import exams, labels, modelcard

# Columns that name where an image was taken (CSV columns such as RSNA's, or the file's header): images and
# figures are counted per value of each.
GROUP_COLUMNS = ("site_id", "machine_id", "manufacturer", "manufacturer_model")

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
LABEL = "label"  # the class index of `density`
SPLIT = "split"
MISSING_FILE = "missing_file"  # the reason of a listed file that does not exist
_NUMERIC_DENSITY = {"1": "A", "2": "B", "3": "C", "4": "D"}  # BI-RADS a-d written as 1-4 (CBIS-DDSM and others)


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
        raise ValueError(
            f"{data}: no labels found. Give a folder holding train.csv (RSNA layout or dens-synth "
            "output) or a CSV with columns path,density[,patient_id]."
        )
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
        raise ValueError(
            f"{csv}: needs a '{labels.PATH}' column, or '{labels.PATIENT_ID}' and '{labels.IMAGE_ID}' "
            "(RSNA layout, images under train_images/<patient_id>/<image_id>.dcm)"
        )

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
        log.warning(
            "%s has no patient_id: every image counts as its own patient, so the split cannot keep a "
            "patient's views together",
            csv,
        )
        frame[labels.PATIENT_ID] = frame[labels.PATH]
    if frame.empty:
        raise ValueError(f"{csv}: no row has a density; nothing to train on")
    duplicated = frame[labels.PATH].duplicated()
    if duplicated.any():
        first = frame.loc[duplicated, labels.PATH].iloc[0]
        raise ValueError(f"{csv}: {int(duplicated.sum())} rows repeat a file (first: {first}); list each file once")
    info = {
        "csv": str(csv),
        "source": source,
        "rows": len(frame) + int(missing.sum()),
        "without_density": int(missing.sum()),
        "labelled": len(frame),
        "synthetic": modelcard.synthetic_folder(root),
    }
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


def describe(frame: pd.DataFrame, csv: str | Path) -> dict:
    """Images, patients, exams and classes per split, images per site, machine and manufacturer, the unusable
    files by reason, and a warning for each class a split lacks; ValueError when a split is left with no
    usable image (saying where the files were looked for when not one of them exists)."""
    unusable = frame[frame["npy"].isna()]
    usable = frame[frame["npy"].notna()]
    if usable.empty and (unusable[labels.REASON] == MISSING_FILE).all():
        raise ValueError(_nothing_found(Path(csv), frame[labels.PATH].tolist()))
    out = {"unusable": len(unusable), "unusable_reasons": unusable[labels.REASON].value_counts().to_dict()}
    out["groups"] = {
        column: {str(k): int(v) for k, v in usable[column].astype(str).value_counts().sort_index().items()}
        for column in GROUP_COLUMNS
        if column in usable and (usable[column].astype(str) != "").any()
    }
    for split in SPLITS:
        part = usable[usable[SPLIT] == split]
        if part.empty:
            raise ValueError(
                f"the {split} split has no usable image ({len(frame)} labelled, {len(unusable)} "
                "unusable): give more patients"
            )
        counts = part[labels.DENSITY].value_counts()
        out[split] = {
            "images": len(part),
            "patients": int(part[labels.PATIENT_ID].nunique()),
            "exams": len({exams.exam_key(row) for row in part.to_dict("records")}),
            "classes": {c: int(counts.get(c, 0)) for c in labels.CLASSES},
        }
    out["classes_absent_from_training"] = [c for c in labels.CLASSES if not out["train"]["classes"][c]]
    out["warnings"] = class_warnings(out)
    return out


def _nothing_found(csv: Path, paths: Sequence[str]) -> str:
    """Where the files of a CSV none of whose files exists were looked for: relative to the CSV's folder (as
    they are read), and whether they would exist relative to the working directory (the usual mistake: paths
    written relative to where the CSV's author stood)."""
    listed = [os.path.relpath(p, csv.parent) for p in paths[:1000]]
    from_cwd = sum(os.path.exists(p) for p in listed)
    hint = (
        f"{from_cwd} of the first {len(listed)} exist relative to the working directory {Path.cwd()}: write "
        "them relative to the CSV's folder, or absolute"
        if from_cwd
        else f"nor relative to the working directory {Path.cwd()}"
    )
    return (
        f"{csv}: none of its {len(paths)} files exists. Relative paths are read relative to the CSV's folder "
        f"{csv.parent} (the first: {paths[0]}); {hint}"
    )


def class_warnings(described: dict) -> list[str]:
    """One sentence for each class a split lacks, saying what that does to the model or its figures."""
    warnings = []
    for c in labels.CLASSES:
        present = {split: described[split]["classes"][c] > 0 for split in SPLITS}
        if not present["train"]:
            warnings.append(
                f"class {c} has no usable training image: the model cannot learn to call it, so its {c} calls "
                f"and every figure about {c} mean nothing (add {c} exams, or read its figures with that in mind)"
            )
            continue
        if not present["val"]:
            warnings.append(
                f"class {c} has no validation image: the best epoch and the temperature are chosen without it"
            )
        if not present["test"]:
            warnings.append(f"class {c} has no test image: the test figures say nothing about how {c} is called")
    return warnings


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

    def __init__(self, targets: Sequence[int], *, balanced: bool = False, seed: int = 0, rank: int = 0, world: int = 1):
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
