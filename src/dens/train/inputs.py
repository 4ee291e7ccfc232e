"""What a training run feeds the model and reads back: the run's split and decoded cache, the loaders, and a
split's logits and figures. :mod:`dens.train.loop` drives them."""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from dens import labels, manifest
from dens.figures import evaluation
from dens.labels import CLASSES
from dens.route import families
from dens.route.preprocess import PreprocessConfig
from dens.train import cache, data
from dens.train.config import TrainConfig
from dens.train.distributed import Ranks

log = logging.getLogger("dens.train")

# split.csv's columns for version 3: the image's acquisition family, its in-breast 2nd and 98th percentile
# greys after VOI (what the family's line is fitted on), and how its greys were mapped (dens.route.families).
FAMILY, FAT, DENSE, HARMONISATION = labels.FAMILY, "breast_fat", "breast_dense", labels.HARMONISATION


# --- data ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Splits:
    """The run's usable images by split (train, val, test): their rows, which hold the labels and breast keys
    the figures need, and the cached-image datasets the loaders read."""

    frames: dict[str, pd.DataFrame]
    sets: dict[str, data.CachedImages]
    info: dict  # where the data came from and how much of it was usable: metrics.json's "data"
    preprocess: PreprocessConfig  # the run's route, with version 3's family grey maps fitted on its train split


def prepare_data(cfg: TrainConfig, pre: PreprocessConfig, ranks: Ranks, out: Path) -> Splits:
    """Manifest, split and decoded cache, by split, and (version 3) the family grey maps fitted on the train
    split. Rank 0 writes the split (``split.csv``, every labelled image with its family and how its greys were
    mapped) and the images left out with their reasons (``unusable.csv``) into the run directory ``out``."""
    frame, info = _split_and_cache(cfg, pre.unfitted(), ranks, out)
    pre = _fit_families(frame, pre, info)
    if ranks.main:
        frame.drop(columns=["npy", data.LABEL]).to_csv(out / "split.csv", index=False)
        unusable = frame.loc[frame["npy"].isna(), [labels.PATH, labels.REASON, "detail"]]
        unusable.to_csv(out / "unusable.csv", index=False)
    usable = frame[frame["npy"].notna()]
    frames = {s: usable[usable[data.SPLIT] == s].reset_index(drop=True) for s in data.SPLITS}
    sets = {s: data.CachedImages(f["npy"], f[data.LABEL], _tables(f, pre)) for s, f in frames.items()}
    return Splits(frames, sets, info, pre)


def _fit_families(frame: pd.DataFrame, pre: PreprocessConfig, info: dict) -> PreprocessConfig:
    """Version 3: fit each acquisition family's grey line on the usable train images (the cache holds the
    canvases before the maps), note in ``frame`` how every image's greys are mapped, and count the families in
    ``info`` (metrics.json's data section)."""
    if pre.version < 3:
        return pre
    usable = frame["npy"].notna()
    train = frame[usable & (frame[data.SPLIT] == "train")]
    pre = pre.fitted(families.fit(zip(train[FAMILY], zip(train[FAT], train[DENSE], strict=True), strict=True)))
    frame[HARMONISATION] = [
        families.lookup(pre.families, f)[1] if ok else "" for f, ok in zip(frame[FAMILY], usable, strict=True)
    ]
    info["families"] = {
        "fitted": {key: {"fat": lo, "dense": hi} for key, lo, hi in pre.families},
        "images": frame[usable].groupby([data.SPLIT, FAMILY]).size().unstack(fill_value=0).to_dict(),
        "fallback": int((frame[HARMONISATION] == families.FALLBACK).sum()),
    }
    if not pre.families:
        log.warning(
            "warning: too few usable training images (%d) to fit the acquisition families' grey maps: greys are "
            "left as VOI gives them",
            len(train),
        )
    return pre


def _tables(frame: pd.DataFrame, pre: PreprocessConfig) -> list[np.ndarray] | None:
    """Each image's grey table (version 3), applied to its cached canvas."""
    if pre.version < 3:
        return None
    return [families.lookup(pre.families, family)[0] for family in frame[FAMILY]]


def _split_and_cache(cfg: TrainConfig, pre: PreprocessConfig, ranks: Ranks, out: Path) -> tuple[pd.DataFrame, dict]:
    """One row per labelled image with its split and cache file (none when unusable), and a description."""
    frame, info = manifest.read_manifest(cfg.data)
    previous = out / "split.csv"
    if cfg.resume and previous.exists():  # the split of the interrupted run, even if the CSV changed since
        kept = pd.read_csv(previous, dtype=str, keep_default_na=False).set_index(labels.PATH)[data.SPLIT]
        frame = frame[frame[labels.PATH].isin(kept.index)].reset_index(drop=True)
        frame[data.SPLIT] = frame[labels.PATH].map(kept)
    elif data.SPLIT in frame and frame[data.SPLIT].isin(data.SPLITS).all():
        log.info("the split is the CSV's own (its '%s' column)", data.SPLIT)  # e.g. a set's official test split
    else:
        if data.SPLIT in frame:
            bad = sorted(set(frame[data.SPLIT]) - set(data.SPLITS))
            raise ValueError(
                f"{info['csv']}: its '{data.SPLIT}' column holds {', '.join(map(repr, bad[:5]))}; every row needs "
                f"one of {', '.join(data.SPLITS)} (or drop the column to have dens-train split by patient)"
            )
        frame[data.SPLIT] = data.assign_split(frame, seed=cfg.seed)
    root = Path(cfg.cache).expanduser() if cfg.cache else cache.default_cache_dir()
    paths = frame[labels.PATH].tolist()
    decoded = 0
    if ranks.main:  # rank 0 fills the cache; the others then find every file in it
        entries, decoded = cache.build_cache(paths, pre, root, cfg.decode_workers, cfg.progress)
    ranks.barrier()
    if not ranks.main:
        entries, _ = cache.build_cache(paths, pre, root, 1, progress=False)
    agreed = as_rank_zero_saw(entries, ranks, root)
    frame = cache.attach_cache(frame, agreed)
    frame[FAMILY] = [e.info.get(FAMILY, "") for e in agreed]
    frame[FAT], frame[DENSE] = zip(*(e.info.get("breast_levels") or (0.0, 0.0) for e in agreed), strict=True)
    info.update(cache=str(cache.cache_dir_for(root, pre)), decoded_now=decoded, **data.describe(frame, info["csv"]))
    if info["unusable"] and ranks.main:
        reasons = ", ".join(f"{k}: {v}" for k, v in info["unusable_reasons"].items())
        log.warning(
            "%d of %d images are unusable and left out (%s); listed in %s",
            info["unusable"],
            len(frame),
            reasons,
            out / "unusable.csv",
        )
    return frame, info


def as_rank_zero_saw(entries: list[cache.CacheEntry], ranks: Ranks, root: Path) -> list[cache.CacheEntry]:
    """Every rank keeps the files rank 0 could use, and only those. A file another rank sees differently (a
    read that failed on one side only: failures other than an unusable file are not cached, so the other
    ranks try again) would give the ranks datasets of different lengths, and DDP would hang at its next
    collective instead of failing."""
    verdicts = ranks.broadcast([(e.reason, e.detail) for e in entries] if ranks.main else None)
    agreed = []
    for entry, (reason, detail) in zip(entries, verdicts, strict=True):
        if reason and not entry.reason:  # rank 0 could not use it: left out here too, for rank 0's reason
            entry = cache.CacheEntry(entry.path, None, {}, reason, detail)
        elif entry.reason and not reason:
            raise ValueError(
                f"rank {ranks.rank} cannot use {entry.path} ({entry.reason}: {entry.detail}), "
                f"which rank 0 decoded into the cache under {root}: every rank must read the data "
                "and that cache (put both on filesystems all the ranks share), or the file is "
                "failing to read"
            )
        agreed.append(entry)
    return agreed


def loader(dataset, batch: int, workers: int, device: torch.device, sampler=None, drop_last=False):
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=drop_last,
        worker_init_fn=_ignore_sigint if workers else None,
    )


def _ignore_sigint(_worker_id: int) -> None:
    # Ctrl-C reaches the whole process group: the main process stops the run; workers just wait to be closed.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# --- evaluation ------------------------------------------------------------------------------------------


@torch.no_grad()
def predict(
    net: torch.nn.Module,
    dataset: data.CachedImages,
    ranks: Ranks,
    batch: int,
    workers: int,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    desc: str,
    progress: bool,
) -> np.ndarray:
    """Logits for every item of ``dataset`` (fp32, dataset order); under DDP each rank does a share."""
    net.eval()
    shard = list(range(ranks.rank, len(dataset), ranks.world))
    batches = loader(torch.utils.data.Subset(dataset, shard), batch, workers, ranks.device)
    out = []
    for images, _ in tqdm(batches, desc=desc, unit="batch", leave=False, disable=not (progress and ranks.main)):
        images = images.to(ranks.device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(ranks.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out.append(net(images).float().cpu())
    mine = torch.cat(out).numpy() if out else np.zeros((0, len(CLASSES)), np.float32)
    logits = np.zeros((len(dataset), len(CLASSES)), np.float32)
    for rank, part in enumerate(ranks.gather(mine)):
        logits[rank :: ranks.world] = part
    return logits


def report(logits: np.ndarray, frame: pd.DataFrame, temperature: float = 1.0, **kwargs) -> dict:
    """Image-, breast- and exam-level figures for one split's logits (:func:`dens.figures.evaluation.report`;
    ``kwargs``: its resamples, seed, groups), its breasts and exams as dens-infer forms them."""
    return evaluation.report(frame, logits, frame[data.LABEL].to_numpy(), temperature, **kwargs)
