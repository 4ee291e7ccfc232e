"""The training run: data -> model -> epochs (AMP, DDP) -> validation -> test, calibration and every artifact.

:func:`run` is what ``dens-train`` calls; tests call it directly. Under ``torchrun --nproc-per-node N`` it
trains with DistributedDataParallel (NCCL on CUDA, gloo on CPU); rank 0 alone writes files and logs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

import dens
from dens import labels, runs
from dens.artifact import modelcard
from dens.artifact.model import Checkpoint, build_model, load_checkpoint, save_checkpoint
from dens.figures import evaluation, metrics, plots
from dens.figures.metrics import softmax
from dens.labels import CLASSES
from dens.route.preprocess import PreprocessConfig
from dens.train import card, data, distributed, inputs
from dens.train.config import TrainConfig
from dens.train.distributed import Ranks, setup_ranks
from dens.train.step import resolve_precision, train_step

log = logging.getLogger("dens.train")

HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "kappa_linear", "kappa_quadratic")
PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# --- the model -------------------------------------------------------------------------------------------


def start_model(cfg: TrainConfig, ranks: Ranks) -> tuple[torch.nn.Module, str]:
    """The model a new run starts from, seeded so that every rank and every re-run starts alike, and its
    starting weights ('imagenet', 'none' or the file's path). ImageNet weights are downloaded on the first
    run (rank 0 alone; the other ranks then read its cached file); a download that cannot happen stops the
    run here, before any image is decoded."""
    weights = "imagenet" if cfg.weights == "auto" else cfg.weights
    if not ranks.main:
        ranks.barrier()
    torch.manual_seed(cfg.seed)
    net = build_model(cfg.arch, weights=None if weights == "none" else weights, progress=cfg.progress and ranks.main)
    if ranks.main:
        ranks.barrier()
    return net, weights


def from_scratch(weights: str) -> bool:
    """Whether a run's starting weights (:func:`start_model`'s description) are random ones."""
    return weights.startswith("none")


# --- progress --------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """Where a run is and what it has seen: last.pt carries these fields (beside the optimiser's state) as
    plain values in its ``extra``, under these names, so that ``--resume`` continues from them."""

    epoch: int = 0  # epochs completed
    step: int = 0  # steps completed in the current epoch
    loss_sum: float = 0.0  # this epoch's training loss, summed over its images so far (this rank's share)
    seen: int = 0  # this epoch's training images so far (this rank's)
    correct: int = 0  # of which the forward pass called right (the running train accuracy)
    seconds: float = 0.0  # this epoch's training time so far
    history: list[dict] = field(default_factory=list)  # one row per completed epoch: metrics.json's history
    best_epoch: int = -1  # the completed epoch with the best validation kappa (0-based)
    best_kappa: float = -math.inf

    def add_steps(self, loss_sum: float, seen: int, correct: int, seconds: float) -> None:
        self.loss_sum, self.seen, self.correct = self.loss_sum + loss_sum, self.seen + seen, self.correct + correct
        self.seconds += seconds

    def next_epoch(self) -> None:
        self.epoch, self.step, self.loss_sum, self.seen, self.correct, self.seconds = self.epoch + 1, 0, 0.0, 0, 0, 0.0

    def to_extra(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_extra(cls, extra: dict) -> Progress:
        # A field a last.pt from an older dens lacks starts from its default.
        return cls(**{f.name: extra[f.name] for f in dataclasses.fields(cls) if f.name in extra})


# --- checkpoints -----------------------------------------------------------------------------------------


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _save(path: Path, net, pre, summary: dict, temperature: float = 1.0, extra: dict | None = None) -> None:
    # save_checkpoint writes atomically: a crash mid-write leaves the previous file whole.
    save_checkpoint(path, net, pre, classes=CLASSES, summary=summary, temperature=temperature, extra=extra or {})


class _StopRequest:
    """Ctrl-C asks the loop to stop at the next step boundary (and save last.pt); a second one aborts."""

    def __init__(self, should_stop: Callable[[int, int], bool] | None):
        self.flag, self.should_stop, self.previous = False, should_stop, None

    def __enter__(self):
        def handler(signum, frame):
            if self.flag:
                raise KeyboardInterrupt
            self.flag = True
            log.warning("interrupted: finishing this step and saving last.pt (Ctrl-C again to abort)")

        try:
            self.previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread: no handler, Ctrl-C behaves as usual
            self.previous = None
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def __call__(self, epoch: int, step: int, ranks: Ranks) -> bool:
        # Every rank must stop at the same step, or the others hang in their next all-reduce.
        return ranks.any(self.flag or bool(self.should_stop and self.should_stop(epoch, step)))


# --- the run ---------------------------------------------------------------------------------------------


class Trainer:
    """One run's model, optimiser, data and :class:`Progress`, built from a config; :func:`run` drives it
    epoch by epoch."""

    def __init__(self, cfg: TrainConfig, ranks: Ranks, out: Path):
        self.cfg, self.ranks, self.out = cfg, ranks, out
        canvas = {"size": cfg.size} if cfg.size else {"height": cfg.height, "width": cfg.width}
        self.pre = PreprocessConfig(version=cfg.preprocess_version, **canvas)
        self.amp_dtype = resolve_precision(cfg.precision, ranks.device)
        self.channels_last = ranks.device.type == "cuda" if cfg.channels_last is None else cfg.channels_last
        self.workers = min(4, dens.usable_cores()) if cfg.workers is None else cfg.workers
        self.batch = ranks.per_rank(cfg.batch_size)
        # The model first: weights that cannot be had are reported before minutes of decoding, not after.
        last = load_checkpoint(out / "last.pt") if cfg.resume else None
        net, self.weights = (last.model, last.summary["weights"]) if last else start_model(cfg, ranks)
        self.splits = inputs.prepare_data(cfg, self.pre, ranks, out)
        self.pre = self.splits.preprocess  # with the family grey maps fitted on the train split (version 3)
        self._place_model(net)
        self._setup_optimisation()
        self.progress, self.best_weights = Progress(), None
        if last:
            self._resume(last)
        self.resolved = self._write_config()
        for warning in self.splits.info["warnings"] if ranks.main else ():
            log.warning("warning: %s", warning)
        self.log(
            "%s: %s from %s weights on %s (%s), train %d / val %d / test %d images",
            out,
            cfg.arch,
            "RANDOM" if from_scratch(self.weights) else self.weights,
            ranks.device,
            PRECISION_NAMES[self.amp_dtype],
            *(len(self.splits.sets[s]) for s in data.SPLITS),
        )

    def _place_model(self, net: torch.nn.Module) -> None:
        """``net`` on this rank's device and memory layout; ``model`` is what training steps call (under DDP
        with several processes), ``eval_net`` what predictions call; both compiled when asked."""
        layout = torch.channels_last if self.channels_last else torch.preserve_format
        self.net = net.to(self.ranks.device, memory_format=layout)
        model = distributed.wrap(self.net, self.ranks)
        self.model = torch.compile(model) if self.cfg.compile else model
        self.eval_net = torch.compile(self.net) if self.cfg.compile else self.net

    def _setup_optimisation(self) -> None:
        """Optimiser, cosine schedule, fp16 gradient scaler, and the class balance (loss weights or sampler)."""
        cfg, ranks = self.cfg, self.ranks
        optim_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = optim_cls(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=cfg.epochs)
        self.scaler = torch.amp.GradScaler(ranks.device.type, enabled=self.amp_dtype == torch.float16)
        targets = self.splits.frames["train"][data.LABEL].to_numpy()
        weight = data.class_weights(targets).to(ranks.device) if cfg.balance == "weighted-loss" else None
        self.loss_fn = torch.nn.CrossEntropyLoss(weight=weight)
        self.sampler = data.EpochSampler(
            targets, balanced=cfg.balance == "sampler", seed=cfg.seed, rank=ranks.rank, world=ranks.world
        )

    def _resume(self, last: Checkpoint) -> None:
        """Optimiser, schedule, scaler, random state and progress from last.pt; the best weights from best.pt."""
        self.optimizer.load_state_dict(last.extra["optimizer"])
        self.scheduler.load_state_dict(last.extra["scheduler"])
        if last.extra["scaler"]:  # empty when saved without fp16 (CPU, bf16): nothing to carry over
            self.scaler.load_state_dict(last.extra["scaler"])
        torch.set_rng_state(last.extra["rng"]["torch"])
        self.progress = Progress.from_extra(last.extra)
        if (self.out / "best.pt").exists():
            self.best_weights = load_checkpoint(self.out / "best.pt").model.state_dict()
        if self.progress.epoch < self.cfg.epochs:
            self.log("resuming %s at epoch %d, step %d", self.out, self.progress.epoch + 1, self.progress.step)
        else:
            self.log("%s: all %d epochs were done; testing the best epoch again", self.out, self.cfg.epochs)

    def _write_config(self) -> dict:
        """The config and what it resolved to here (device, processes, precision...); rank 0 writes config.yaml."""
        ranks = self.ranks
        resolved = {
            "weights": self.weights,
            "device": str(ranks.device),
            "world_size": ranks.world,
            "batch_per_process": self.batch,
            "precision": PRECISION_NAMES[self.amp_dtype],
            "channels_last": self.channels_last,
            "workers": self.workers,
            "dens_version": dens.__version__,
        }
        written = {**self.cfg.to_dict(), "preprocess": self.pre.to_dict(), "resolved": resolved}
        if ranks.main:
            (self.out / "config.yaml").write_text(yaml.safe_dump(written, sort_keys=False))
        return written

    def log(self, message: str, *args) -> None:
        if self.ranks.main:
            log.info(message, *args)

    def summary(self, **extra) -> dict:
        return {
            "arch": self.cfg.arch,
            "weights": self.weights,
            "from_scratch": from_scratch(self.weights),
            "epochs": self.cfg.epochs,
            "best_epoch": self.progress.best_epoch + 1,
            "data": {s: len(self.splits.sets[s]) for s in data.SPLITS},
            **extra,
        }

    def save_last(self) -> None:
        if self.ranks.main:
            extra = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": _rng_state(self.ranks.device),
                **self.progress.to_extra(),
            }
            _save(self.out / "last.pt", self.net, self.pre, self.summary(), extra=extra)

    def predict(self, split: str, *, autocast: bool = True) -> np.ndarray:
        amp_dtype = self.amp_dtype if autocast else None
        return inputs.predict(
            self.eval_net,
            self.splits.sets[split],
            self.ranks,
            self.batch,
            self.workers,
            amp_dtype,
            self.channels_last,
            split,
            self.cfg.progress,
        )

    def train_epoch(self, stop: _StopRequest) -> bool:
        """The rest of the current epoch (all of it, unless resumed mid-way); False when stopped early,
        with last.pt saved at the step where it stopped."""
        cfg, ranks, progress = self.cfg, self.ranks, self.progress
        epoch, first = progress.epoch, progress.step
        self.sampler.set_epoch(epoch, start=first * self.batch)
        # Whole batches only (BatchNorm dislikes a batch of one), unless the split is smaller than a batch.
        loader = inputs.loader(
            self.splits.sets["train"],
            self.batch,
            self.workers,
            ranks.device,
            self.sampler,
            drop_last=self.sampler.per_rank > self.batch,
        )
        self.model.train()
        bar = tqdm(
            loader,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            unit="batch",
            leave=False,
            disable=not (cfg.progress and ranks.main),
        )
        start, loss_sum, seen = time.perf_counter(), torch.zeros((), device=ranks.device), 0
        correct = torch.zeros((), dtype=torch.int64, device=ranks.device)
        for step, (images, targets) in enumerate(bar, start=first):
            images = images.to(ranks.device, non_blocking=True)
            targets = targets.to(ranks.device, non_blocking=True)
            if cfg.augment:  # seeded by (seed, rank, epoch, step): a resumed run draws what it would have
                images = data.augment(images, torch.Generator().manual_seed(_seed(cfg.seed, ranks.rank, epoch, step)))
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            loss, right = train_step(
                self.model, (images, targets), self.optimizer, self.scaler, self.loss_fn, self.amp_dtype
            )
            loss_sum += loss * len(targets)
            correct += right
            seen += len(targets)
            if step % 5 == 0 or step + 1 == first + len(loader):  # .item() waits for the device: not every step
                rate = seen * ranks.world / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{rate:.1f}")
            progress.step = step + 1
            last_step = step + 1 == first + len(loader)
            if not last_step and stop(epoch, step, ranks):
                progress.add_steps(float(loss_sum), seen, int(correct), time.perf_counter() - start)
                self.save_last()
                bar.close()
                return False
        bar.close()
        progress.add_steps(float(loss_sum), seen, int(correct), time.perf_counter() - start)
        return True

    def end_epoch(self) -> None:
        """Validate, keep the best weights, save best.pt / last.pt and log one line."""
        ranks, progress = self.ranks, self.progress
        epoch = progress.epoch
        totals = ranks.sum(
            torch.tensor([progress.loss_sum, float(progress.seen), float(progress.correct)], device=ranks.device)
        )
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        logits = self.predict("val")
        frame = self.splits.frames["val"]
        val = inputs.report(logits, frame, resamples=0, groups=False)  # intervals only for the final figures
        row = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": float(totals[0] / totals[1]),
            "train_accuracy": float(totals[2] / totals[1]),
            "train_img_s": float(totals[1]) / max(progress.seconds, 1e-9),
            "val_loss": metrics.nll(softmax(logits), frame[data.LABEL].to_numpy()),
            **{f"val_{k}": val["image"][k] for k in HEADLINE},
            "val": val,
        }
        progress.history.append(metrics.jsonable(row))  # plain values: last.pt carries the history
        kappa = float(val["image"]["kappa_quadratic"])
        kappa = kappa if math.isfinite(kappa) else -1.0  # one class only in validation: kappa is undefined
        best = kappa > progress.best_kappa
        if best:
            progress.best_kappa, progress.best_epoch = kappa, epoch
            self.best_weights = _cpu_copy(self.net.state_dict())
            if ranks.main:
                _save(self.out / "best.pt", self.net, self.pre, self.summary(val_kappa_quadratic=kappa))
        progress.next_epoch()
        self.save_last()
        self.log(
            "epoch %d/%d: train loss %.4f, %.1f img/s; val loss %.4f, acc %.3f, kappa %.3f%s",
            epoch + 1,
            self.cfg.epochs,
            row["train_loss"],
            row["train_img_s"],
            row["val_loss"],
            row["val_accuracy"],
            kappa,
            " (best)" if best else "",
        )

    def _write_results(self, result: dict, test_logits: np.ndarray, temperature: float) -> None:
        """best.pt with its temperature, headline figures and model card; metrics.json, model_card.md and
        the plots."""
        out, test = self.out, result["test"]
        headline = {level: {k: test[level][k] for k in HEADLINE} for level in evaluation.LEVELS}
        summary = self.summary(
            val_kappa_quadratic=self.progress.best_kappa, test=headline, **{modelcard.CARD_KEY: result["model_card"]}
        )
        _save(out / "best.pt", self.net, self.pre, summary, temperature=temperature)
        (out / "metrics.json").write_text(json.dumps(result, indent=1))
        (out / "model_card.md").write_text(modelcard.render(result["model_card"]))
        frame = self.splits.frames["test"]
        predictions = frame[[labels.PATH, labels.PATIENT_ID, labels.DENSITY]].copy()
        predictions[list(labels.PROB_COLUMNS)] = np.round(softmax(test_logits, temperature), 6)
        predictions.to_csv(out / "test_predictions.csv", index=False)  # what each test image was called
        plots.split_pngs(out, test, frame, test_logits, frame[data.LABEL].to_numpy(), temperature, name="test")
        plots.classes_png({s: result["data"][s]["classes"] for s in data.SPLITS}, out / "classes.png")
        plots.curves_png(self.progress.history, out, best_epoch=self.progress.best_epoch + 1)
        runs.update_latest(out)

    def finish(self) -> dict:
        """With the best epoch's weights: the temperature chosen on validation, the test split once, every
        artifact written (rank 0). Returns what metrics.json holds. In fp32 whatever the training precision:
        the temperature and the figures are those of the float32 model that dens-export ships."""
        self.net.load_state_dict(self.best_weights)
        val_logits, test_logits = self.predict("val", autocast=False), self.predict("test", autocast=False)
        frames, progress = self.splits.frames, self.progress
        y_val, y_test = (frames[s][data.LABEL].to_numpy() for s in ("val", "test"))
        choice = metrics.choose_temperature(val_logits, y_val, frames["val"][labels.PATIENT_ID].tolist())
        t = choice["temperature"]
        if not choice["kept"]:
            self.log("temperature 1.0 (no calibration): %s", choice["reason"])
        test = inputs.report(test_logits, frames["test"], t, resamples=self.cfg.bootstrap, seed=self.cfg.seed)
        calibration = {
            **choice,
            "min_images": metrics.MIN_CALIBRATION_IMAGES,
            "min_classes": metrics.MIN_CALIBRATION_CLASSES,
            "bounds": list(metrics.TEMPERATURE_BOUNDS),
            "validation": metrics.calibration(val_logits, y_val, t),
            "test": metrics.calibration(test_logits, y_test, t),
        }
        result = metrics.jsonable(
            {
                "config": self.resolved,
                "weights": {"start": self.weights, "from_scratch": from_scratch(self.weights)},
                "data": self.splits.info,
                "warnings": self.splits.info["warnings"],
                "history": progress.history,
                "best": {"epoch": progress.best_epoch + 1, "val_kappa_quadratic": progress.best_kappa},
                "validation": inputs.report(val_logits, frames["val"], t, resamples=0, groups=False),
                "test": test,
                "calibration": calibration,
            }
        )
        result["model_card"] = metrics.jsonable(
            card.facts(
                self.resolved,
                self.splits.info,
                progress.best_epoch + 1,
                result["test"],
                {**{k: choice[k] for k in ("temperature", "kept", "reason")}, **calibration["test"]},
            )
        )
        if self.ranks.main:
            self._write_results(result, test_logits, t)
        self.ranks.barrier()
        return result


def run(cfg: TrainConfig, *, should_stop: Callable[[int, int], bool] | None = None) -> dict:
    """Train, validate, test and write the run directory; returns what metrics.json holds.

    ``should_stop(epoch, step)``, asked after every step (``step`` -1: after an epoch), lets tests and
    embedding code interrupt a run as Ctrl-C does: last.pt is saved and ``{"interrupted": True, ...}``
    returned; ``--resume`` continues from there with the same state.
    """
    if cfg.data is None:
        raise ValueError("no --data given: name a dens-synth folder, an RSNA folder or a labels CSV")
    ranks = setup_ranks(cfg.device)
    out = Path(cfg.out)
    made: list[Path] = []  # the folders this run creates, the run folder first
    if ranks.main:
        _check_out(out, cfg.resume)
        made = [p for p in (out, *out.parents) if not p.exists()]
        out.mkdir(parents=True, exist_ok=True)
    ranks.barrier()
    try:
        trainer = Trainer(cfg, ranks, out)
    except BaseException:
        _remove_empty(made)
        raise
    progress = trainer.progress
    with _StopRequest(should_stop) as stop:
        while progress.epoch < cfg.epochs:
            if not trainer.train_epoch(stop):
                return {"interrupted": True, "epoch": progress.epoch, "step": progress.step, "out": str(out)}
            trainer.end_epoch()
            if progress.epoch < cfg.epochs and stop(progress.epoch - 1, -1, ranks):
                return {"interrupted": True, "epoch": progress.epoch, "step": 0, "out": str(out)}
    return trainer.finish()


def _remove_empty(made: list[Path]) -> None:
    """Remove the folders a failed run made (the run folder, then those above it) while they are empty: never
    one that holds anything, or that was there before."""
    for folder in made:
        try:
            folder.rmdir()  # only an empty folder goes
        except OSError:
            return


def _seed(*key: int) -> int:
    return int(np.random.SeedSequence(list(key)).generate_state(1)[0])


def _check_out(out: Path, resume: bool) -> None:
    if resume and not (out / "last.pt").exists():
        raise ValueError(f"--resume: {out / 'last.pt'} does not exist; nothing to resume")
    if not resume and (out / "last.pt").exists():
        raise ValueError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")


def _cpu_copy(state: dict) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
