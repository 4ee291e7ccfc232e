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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

import dens
from dens import labels, runs
from dens.labels import CLASSES
from dens.model import build_model, imagenet_weights_path, load_checkpoint, save_checkpoint
from dens.preprocess import PreprocessConfig
from dens.train import data, inputs, metrics, plots
from dens.train.step import Ranks, resolve_precision, setup_ranks, train_step

log = logging.getLogger("dens.train")

ARCHS = ("resnet50", "resnet18")
OPTIMIZERS = ("adam", "adamw")
BALANCES = ("weighted-loss", "sampler", "none")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run; the defaults are the seed recipe. Written to ``config.yaml``."""

    data: str | None = None
    out: str = "runs/train"
    arch: str = "resnet50"
    # 'auto': ImageNet weights when the torchvision file is in the torch hub cache, else a loud warning and
    # random initialisation; 'imagenet' insists on them; 'none' trains from scratch; or a local file.
    weights: str = "auto"
    size: int = 512
    epochs: int = 15
    batch_size: int = 32  # global: divided between the DDP processes
    lr: float = 1e-5
    weight_decay: float = 3e-3
    optimizer: str = "adam"
    balance: str = "weighted-loss"
    augment: bool = True
    seed: int = 0
    workers: int | None = None  # DataLoader workers per process [min(4, cores)]
    decode_workers: int | None = None  # processes that fill the decoded cache [all cores]
    cache: str | None = None  # [~/.cache/dens]
    device: str = "auto"
    precision: str = "auto"  # CUDA: bf16 where supported, else fp16 + GradScaler; CPU: fp32, or bf16 if asked
    channels_last: bool | None = None  # [on CUDA]
    compile: bool = False
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        for name, allowed in (("arch", ARCHS), ("optimizer", OPTIMIZERS), ("balance", BALANCES),
                              ("precision", PRECISIONS)):  # fmt: skip
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError("epochs and batch_size must be >= 1, lr > 0 and weight_decay >= 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- the model -------------------------------------------------------------------------------------------


def _build(cfg: TrainConfig) -> tuple[torch.nn.Module, str]:
    """The model and a description of its starting weights ('auto' falls back to random, loudly)."""
    if cfg.weights == "none":
        return build_model(cfg.arch, weights=None), "none"
    if cfg.weights != "auto":
        return build_model(cfg.arch, weights=cfg.weights), cfg.weights
    path = imagenet_weights_path(cfg.arch)
    if path.is_file():
        return build_model(cfg.arch, weights="imagenet"), "imagenet"
    log.warning("!! ImageNet weights for %s are not in %s, so the model starts from RANDOM weights: it needs far more "
                "data and epochs, and a higher --lr (about 1e-3).\n!! Copy %s there to fine-tune as the recipe "
                "intends; pass --weights none to train from scratch without this warning, or --weights imagenet to "
                "make their absence an error.", cfg.arch, path.parent, path.name)  # fmt: skip
    return build_model(cfg.arch, weights=None), "none (imagenet unavailable)"


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
        stop = self.flag or bool(self.should_stop and self.should_stop(epoch, step))
        if ranks.world > 1:  # every rank must stop at the same step, or the others hang in all-reduce
            flag = torch.tensor([float(stop)], device=ranks.device)
            dist.all_reduce(flag)
            stop = bool(flag.item())
        return stop


# --- the run ---------------------------------------------------------------------------------------------

HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "kappa_linear", "kappa_quadratic")


class Trainer:
    """One run's model, optimiser, data and progress (``state``, which last.pt carries), built from a config;
    :func:`run` drives it epoch by epoch."""

    def __init__(self, cfg: TrainConfig, ranks: Ranks, out: Path):
        self.cfg, self.ranks, self.out = cfg, ranks, out
        self.pre = PreprocessConfig(size=cfg.size)
        self.amp_dtype = resolve_precision(cfg.precision, ranks.device)
        self.channels_last = ranks.device.type == "cuda" if cfg.channels_last is None else cfg.channels_last
        self.workers = min(4, dens.usable_cores()) if cfg.workers is None else cfg.workers
        if cfg.batch_size % ranks.world:
            raise ValueError(f"--batch-size {cfg.batch_size} does not divide between {ranks.world} processes")
        self.batch = cfg.batch_size // ranks.world
        # The model first: a missing weights file is reported before minutes of decoding, not after.
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank and in every re-run
        last = load_checkpoint(out / "last.pt") if cfg.resume else None
        net, self.weights = (last.model, last.summary["weights"]) if last else _build(cfg)

        frame, self.data_info = inputs.prepare_data(cfg, self.pre, ranks, out)
        usable = frame[frame["npy"].notna()]
        self.parts = {s: usable[usable[data.SPLIT] == s].reset_index(drop=True) for s in data.SPLITS}
        self.sets = {s: data.CachedImages(p["npy"], p[data.LABEL]) for s, p in self.parts.items()}
        if ranks.main:
            frame.drop(columns=["npy", data.LABEL]).to_csv(out / "split.csv", index=False)
            unusable = frame.loc[frame["npy"].isna(), [labels.PATH, labels.REASON, "detail"]]
            unusable.to_csv(out / "unusable.csv", index=False)

        layout = torch.channels_last if self.channels_last else torch.preserve_format
        self.net = net.to(ranks.device, memory_format=layout)
        model = self.net
        if ranks.world > 1:
            ids = [ranks.device.index] if ranks.device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(self.net, device_ids=ids)
        self.model = torch.compile(model) if cfg.compile else model
        self.eval_net = torch.compile(self.net) if cfg.compile else self.net
        optim_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = optim_cls(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=cfg.epochs)
        self.scaler = torch.amp.GradScaler(ranks.device.type, enabled=self.amp_dtype == torch.float16)
        targets = self.parts["train"][data.LABEL].to_numpy()
        weight = data.class_weights(targets).to(ranks.device) if cfg.balance == "weighted-loss" else None
        self.loss_fn = torch.nn.CrossEntropyLoss(weight=weight)
        self.sampler = data.EpochSampler(targets, balanced=cfg.balance == "sampler", seed=cfg.seed,
                                         rank=ranks.rank, world=ranks.world)  # fmt: skip

        self.state = {"epoch": 0, "step": 0, "loss_sum": 0.0, "seen": 0, "seconds": 0.0, "history": [],
                      "best_epoch": -1, "best_kappa": -math.inf}  # fmt: skip
        self.best_weights = None
        if last:
            self.optimizer.load_state_dict(last.extra["optimizer"])
            self.scheduler.load_state_dict(last.extra["scheduler"])
            if last.extra["scaler"]:  # empty when saved without fp16 (CPU, bf16): nothing to carry over
                self.scaler.load_state_dict(last.extra["scaler"])
            torch.set_rng_state(last.extra["rng"]["torch"])
            self.state.update({k: last.extra[k] for k in self.state})
            if (out / "best.pt").exists():
                self.best_weights = load_checkpoint(out / "best.pt").model.state_dict()
            if self.state["epoch"] < cfg.epochs:
                self.log("resuming %s at epoch %d, step %d", out, self.state["epoch"] + 1, self.state["step"])
            else:
                self.log("%s: all %d epochs were done; testing the best epoch again", out, cfg.epochs)
        precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]
        self.resolved = {**cfg.to_dict(), "preprocess": self.pre.to_dict(), "resolved": {
            "weights": self.weights, "device": str(ranks.device), "world_size": ranks.world,
            "batch_per_process": self.batch, "precision": precision, "channels_last": self.channels_last,
            "workers": self.workers, "dens_version": dens.__version__}}  # fmt: skip
        if ranks.main:
            (out / "config.yaml").write_text(yaml.safe_dump(self.resolved, sort_keys=False))
        self.log("%s: %s on %s (%s), train %d / val %d / test %d images", out, cfg.arch, ranks.device, precision,
                 *(len(self.sets[s]) for s in data.SPLITS))  # fmt: skip

    def log(self, message: str, *args) -> None:
        if self.ranks.main:
            log.info(message, *args)

    def summary(self, **extra) -> dict:
        return {"arch": self.cfg.arch, "weights": self.weights, "epochs": self.cfg.epochs,
                "best_epoch": self.state["best_epoch"] + 1, "data": {s: len(self.sets[s]) for s in data.SPLITS},
                **extra}  # fmt: skip

    def save_last(self) -> None:
        if self.ranks.main:
            extra = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "scaler": self.scaler.state_dict(), "rng": _rng_state(self.ranks.device),
                     **self.state}  # fmt: skip
            _save(self.out / "last.pt", self.net, self.pre, self.summary(), extra=_plain(extra))

    def predict(self, split: str, *, autocast: bool = True) -> np.ndarray:
        amp_dtype = self.amp_dtype if autocast else None
        return inputs.predict(self.eval_net, self.sets[split], self.ranks, self.batch, self.workers, amp_dtype,
                              self.channels_last, split, self.cfg.progress)  # fmt: skip

    def train_epoch(self, stop: _StopRequest) -> bool:
        """The rest of the current epoch (all of it, unless resumed mid-way); False when stopped early,
        with last.pt saved at the step where it stopped."""
        cfg, ranks, state = self.cfg, self.ranks, self.state
        epoch, first = state["epoch"], state["step"]
        self.sampler.set_epoch(epoch, start=first * self.batch)
        # Whole batches only (BatchNorm dislikes a batch of one), unless the split is smaller than a batch.
        loader = inputs.loader(self.sets["train"], self.batch, self.workers, ranks.device, self.sampler,
                         drop_last=self.sampler.per_rank > self.batch)  # fmt: skip
        self.model.train()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False,
                   disable=not (cfg.progress and ranks.main))  # fmt: skip
        start, loss_sum, seen = time.perf_counter(), torch.zeros((), device=ranks.device), 0
        for step, (images, targets) in enumerate(bar, start=first):
            images = images.to(ranks.device, non_blocking=True)
            targets = targets.to(ranks.device, non_blocking=True)
            if cfg.augment:  # seeded by (seed, rank, epoch, step): a resumed run draws what it would have
                images = data.augment(images, torch.Generator().manual_seed(_seed(cfg.seed, ranks.rank, epoch, step)))
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            loss = train_step(self.model, (images, targets), self.optimizer, self.scaler, self.loss_fn, self.amp_dtype)
            loss_sum += loss * len(targets)
            seen += len(targets)
            if step % 5 == 0 or step + 1 == first + len(loader):  # .item() waits for the device: not every step
                rate = seen * ranks.world / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{rate:.1f}")
            state.update(step=step + 1)
            last_step = step + 1 == first + len(loader)
            if not last_step and stop(epoch, step, ranks):
                state.update(loss_sum=state["loss_sum"] + float(loss_sum), seen=state["seen"] + seen,
                             seconds=state["seconds"] + time.perf_counter() - start)  # fmt: skip
                self.save_last()
                bar.close()
                return False
        bar.close()
        state.update(loss_sum=state["loss_sum"] + float(loss_sum), seen=state["seen"] + seen,
                     seconds=state["seconds"] + time.perf_counter() - start)  # fmt: skip
        return True

    def end_epoch(self) -> None:
        """Validate, keep the best weights, save best.pt / last.pt and log one line."""
        ranks, state = self.ranks, self.state
        epoch = state["epoch"]
        totals = torch.tensor([state["loss_sum"], float(state["seen"])], device=ranks.device)
        if ranks.world > 1:
            dist.all_reduce(totals)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        logits = self.predict("val")
        val = inputs.report(logits, self.parts["val"])
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": float(totals[0] / totals[1]),
               "train_img_s": float(totals[1]) / max(state["seconds"], 1e-9),
               "val_loss": metrics.nll(metrics.softmax(logits), self.parts["val"][data.LABEL].to_numpy()),
               **{f"val_{k}": val["image"][k] for k in HEADLINE}, "val": val}  # fmt: skip
        state["history"].append(row)
        kappa = val["image"]["kappa_quadratic"]
        kappa = kappa if math.isfinite(kappa) else -1.0  # one class only in validation: kappa is undefined
        best = kappa > state["best_kappa"]
        if best:
            state.update(best_kappa=kappa, best_epoch=epoch)
            self.best_weights = _cpu_copy(self.net.state_dict())
            if ranks.main:
                _save(self.out / "best.pt", self.net, self.pre, self.summary(val_kappa_quadratic=kappa))
        state.update(epoch=epoch + 1, step=0, loss_sum=0.0, seen=0, seconds=0.0)
        self.save_last()
        self.log("epoch %d/%d: train loss %.4f, %.1f img/s; val loss %.4f, acc %.3f, kappa %.3f%s", epoch + 1,
                 self.cfg.epochs, row["train_loss"], row["train_img_s"], row["val_loss"], row["val_accuracy"], kappa,
                 " (best)" if best else "")  # fmt: skip

    def finish(self) -> dict:
        """With the best epoch's weights: temperature fitted on validation, the test split once, every
        artifact written (rank 0). Returns what metrics.json holds. In fp32 whatever the training precision:
        the temperature and the figures are those of the float32 model that dens-export ships."""
        self.net.load_state_dict(self.best_weights)
        val_logits, test_logits = self.predict("val", autocast=False), self.predict("test", autocast=False)
        y_val, y_test = (self.parts[s][data.LABEL].to_numpy() for s in ("val", "test"))
        t = metrics.fit_temperature(val_logits, y_val)
        result = metrics.jsonable({
            "config": self.resolved, "data": self.data_info, "history": self.state["history"],
            "best": {"epoch": self.state["best_epoch"] + 1, "val_kappa_quadratic": self.state["best_kappa"]},
            "validation": inputs.report(val_logits, self.parts["val"], t),
            "test": inputs.report(test_logits, self.parts["test"], t),
            "calibration": {"validation": metrics.calibration(val_logits, y_val, t),
                            "test": metrics.calibration(test_logits, y_test, t)},
        })  # fmt: skip
        if self.ranks.main:
            out = self.out
            headline = {level: {k: result["test"][level][k] for k in HEADLINE} for level in ("image", "breast")}
            _save(out / "best.pt", self.net, self.pre, self.summary(val_kappa_quadratic=self.state["best_kappa"],
                                                                    test=headline), temperature=t)  # fmt: skip
            (out / "metrics.json").write_text(json.dumps(result, indent=1))
            for level in ("image", "breast"):
                test = result["test"][level]
                plots.confusion_png(test["confusion"], out / f"confusion_{level}.png", normalised=False,
                                    title=f"test, {level} level (counts)")  # fmt: skip
                plots.confusion_png(test["confusion_normalised"], out / f"confusion_{level}_normalised.png",
                                    normalised=True, title=f"test, {level} level (row-normalised)")  # fmt: skip
            plots.curves_png(self.state["history"], out)
            runs.update_latest(out)
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
    if ranks.main:
        _check_out(out, cfg.resume)
        out.mkdir(parents=True, exist_ok=True)
    ranks.barrier()
    trainer = Trainer(cfg, ranks, out)
    state = trainer.state
    with _StopRequest(should_stop) as stop:
        while state["epoch"] < cfg.epochs:
            if not trainer.train_epoch(stop):
                return {"interrupted": True, "epoch": state["epoch"], "step": state["step"], "out": str(out)}
            trainer.end_epoch()
            if state["epoch"] < cfg.epochs and stop(state["epoch"] - 1, -1, ranks):
                return {"interrupted": True, "epoch": state["epoch"], "step": 0, "out": str(out)}
    return trainer.finish()


def _seed(*key: int) -> int:
    return int(np.random.SeedSequence(list(key)).generate_state(1)[0])


def _check_out(out: Path, resume: bool) -> None:
    if resume and not (out / "last.pt").exists():
        raise ValueError(f"--resume: {out / 'last.pt'} does not exist; nothing to resume")
    if not resume and (out / "last.pt").exists():
        raise ValueError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")


def _cpu_copy(state: dict) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def _plain(value):
    """Checkpoint ``extra`` must load with weights_only=True: numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    return value
