"""Training data: the patient-grouped split of the labelled images (:func:`dens.manifest.read_manifest`),
the dataset and sampler the loaders use, and the training augmentation.

The images themselves come from the decoded cache (:mod:`dens.train.cache`): every image is decoded once
through the shared route, and epochs, validation and test read the cache.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from dens import labels
from dens.manifest import LABEL, MISSING_FILE, counts, group_counts, nothing_found

SPLITS = ("train", "val", "test")
SPLIT = "split"


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
        raise ValueError(nothing_found(Path(csv), frame[labels.PATH].tolist()))
    out = {"unusable": len(unusable), "unusable_reasons": unusable[labels.REASON].value_counts().to_dict()}
    out["groups"] = group_counts(usable)
    for split in SPLITS:
        part = usable[usable[SPLIT] == split]
        if part.empty:
            raise ValueError(
                f"the {split} split has no usable image ({len(frame)} labelled, {len(unusable)} "
                "unusable): give more patients"
            )
        out[split] = counts(part)
    out["classes_absent_from_training"] = [c for c in labels.CLASSES if not out["train"]["classes"][c]]
    out["warnings"] = class_warnings(out)
    return out


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
    """Canonical images from the cache: ``(uint8 [1, H, W], label)`` per item, no transformation. ``tables``:
    each item's grey table (version 3's family map, :func:`dens.route.families.lookup`), applied to the cached
    canvas as :func:`dens.route.preprocess.load` applies it; None: the cached canvas is the canonical image."""

    def __init__(self, files: Sequence[str], targets: Sequence[int], tables: Sequence[np.ndarray] | None = None):
        self.files, self.targets = list(files), np.asarray(targets, np.int64)
        self.tables = None if tables is None else list(tables)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = np.load(self.files[i])
        if self.tables is not None:
            image = self.tables[i][image]
        return torch.from_numpy(image)[None], int(self.targets[i])


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
