"""dens-train: click options -> :class:`~dens.train.config.TrainConfig` -> :func:`dens.train.loop.run`.

Where a setting comes from, lowest first: the seed recipe (TrainConfig's defaults), the run's own
``config.yaml`` when resuming, ``--config FILE.yaml``, then the flags on the command line.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
import time
from pathlib import Path

import click
import yaml
from click.core import ParameterSource

from dens import runs, show_progress
from dens.train import config, report
from dens.train.config import TrainConfig

DEFAULTS: dict = TrainConfig().to_dict()  # the recipe lives in one place


def _read_yaml(path: Path, ctx: click.Context) -> dict:
    """Options from a YAML file, checked and converted by the same click types as the flags."""
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise click.UsageError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(values, dict):
        raise click.UsageError(f"{path}: expected a mapping of option: value")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    # A run's config.yaml also records what was resolved at run time; only the options are read back.
    values = {k: v for k, v in values.items() if k not in ("preprocess", "resolved")}
    unknown = sorted(set(values) - set(DEFAULTS))
    if unknown:
        raise click.UsageError(f"{path}: unknown options {', '.join(unknown)}; known: {', '.join(sorted(DEFAULTS))}")
    params = {p.name: p for p in ctx.command.params}
    try:  # YAML reads 1e-3 as a string, and a typo'd choice must fail here as it would on the command line
        return {k: v if k not in params or v is None else params[k].type_cast_value(ctx, v) for k, v in values.items()}
    except click.BadParameter as exc:
        raise click.UsageError(f"{path}: {exc.format_message()}") from exc


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option(
    "--data",
    type=click.Path(exists=True, path_type=str),
    help="A dens-synth folder, an RSNA folder (train.csv + train_images/), or a CSV of path,density[,patient_id].",
)
@click.option("--out", type=str, help="Run directory [default: runs/<date-time>; with --resume: runs/latest].")
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="YAML file of options (flags on the command line win).",
)
@click.option("--arch", type=click.Choice(config.ARCHS), default=DEFAULTS["arch"], show_default=True)
@click.option(
    "--weights",
    default=DEFAULTS["weights"],
    show_default=True,
    help="Starting weights. imagenet: torchvision's ImageNet file, downloaded once (with its hash checked) into "
    "the torch hub cache ($TORCH_HOME/hub/checkpoints) and reused after; without network access the run stops "
    "before decoding and says what to do. PATH: a local state dict (e.g. that file, copied). none: random "
    "initialisation, which needs --lr >= 1e-4 (e.g. 1e-3). auto: the same as imagenet.",
)
@click.option(
    "--height", type=click.IntRange(16, 4096), default=DEFAULTS["height"], show_default=True, help="Canvas height H."
)
@click.option(
    "--width", type=click.IntRange(16, 4096), default=DEFAULTS["width"], show_default=True, help="Canvas width W."
)
@click.option("--size", type=click.IntRange(16, 4096), default=None, help="A square S x S canvas instead of H x W.")
@click.option(
    "--preprocess-version",
    type=click.IntRange(min(config.VERSIONS), max(config.VERSIONS)),
    default=DEFAULTS["preprocess_version"],
    show_default=True,
    help="The canonical image's route. 3: grey levels mapped per acquisition family, fitted on the training "
    "images; 2: each image's own in-breast range stretched; 1: the square route of the first models.",
)
@click.option("--epochs", type=click.IntRange(min=1), default=DEFAULTS["epochs"], show_default=True)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=DEFAULTS["batch_size"],
    show_default=True,
    help="Global batch, divided between torchrun processes.",
)
@click.option(
    "--lr",
    type=float,
    default=DEFAULTS["lr"],
    show_default=True,
    help="Peak learning rate (cosine-annealed per epoch). From scratch (--weights none) it must be at least "
    "1e-4; use about 1e-3.",
)
@click.option("--weight-decay", type=float, default=DEFAULTS["weight_decay"], show_default=True)
@click.option("--optimizer", type=click.Choice(config.OPTIMIZERS), default=DEFAULTS["optimizer"], show_default=True)
@click.option(
    "--balance",
    type=click.Choice(config.BALANCES),
    default=DEFAULTS["balance"],
    show_default=True,
    help="Class imbalance: inverse-frequency loss weights, balanced sampling, or none.",
)
@click.option(
    "--augment/--no-augment",
    default=DEFAULTS["augment"],
    show_default=True,
    help="Small affine + gamma/gain jitter on training images (never a horizontal flip).",
)
@click.option("--seed", type=int, default=DEFAULTS["seed"], show_default=True, help="Split, initial weights and order.")
@click.option(
    "--bootstrap",
    type=click.IntRange(min=0),
    default=DEFAULTS["bootstrap"],
    show_default=True,
    help="Bootstrap draws of the test patients for the 95% confidence intervals (0: none).",
)
@click.option("--workers", type=click.IntRange(min=0), default=None, help="DataLoader workers [min(4, cores)].")
@click.option(
    "--decode-workers",
    type=click.IntRange(min=1),
    default=None,
    help="Processes that fill the decoded cache [all cores].",
)
@click.option("--cache", type=str, default=None, help="Decoded-image cache folder [~/.cache/dens].")
@click.option("--device", type=click.Choice(config.DEVICES), default=DEFAULTS["device"], show_default=True)
@click.option(
    "--precision",
    type=click.Choice(config.PRECISIONS),
    default=DEFAULTS["precision"],
    show_default=True,
    help="Autocast dtype. CUDA: auto is bf16 where supported, else fp16. CPU: auto "
    "is fp32; bf16 runs CPU autocast (1.5x to 2.7x faster, measured on two AVX512-BF16 CPUs).",
)
@click.option("--channels-last/--no-channels-last", default=None, help="[on CUDA]")
@click.option("--compile", is_flag=True, help="torch.compile the model.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last.pt.")
@click.option("--progress/--no-progress", default=None, help="Progress bars [default: when stderr is a terminal].")
@click.pass_context
def main(ctx: click.Context, config_file: Path | None, **options) -> None:
    """Fine-tune a density classifier and write a run directory: best.pt, last.pt, metrics.json, split.csv,
    config.yaml and plots."""
    from dens.train import loop  # here: torch is imported once the options are known to be good

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    options["progress"] = show_progress(options["progress"])  # a display choice, never taken from a config
    given = {k: v for k, v in options.items() if ctx.get_parameter_source(k) is not ParameterSource.DEFAULT}
    values: dict = {}
    if options["resume"]:
        out = Path(given.get("out") or _latest())
        saved = out / "config.yaml"
        if saved.exists():
            values.update(_read_yaml(saved, ctx))
        values["out"] = str(out)
    if config_file:
        values.update(_read_yaml(config_file, ctx))
    values.pop("progress", None)  # how a run was watched, in its config.yaml, says nothing about this one
    values.update(given)
    values.setdefault("out", f"runs/{dt.datetime.now():%Y%m%d-%H%M%S}")
    values["resume"] = options["resume"]
    try:
        cfg = TrainConfig(**{**{k: v for k, v in options.items() if k in DEFAULTS}, **values})
        start = time.perf_counter()
        result = loop.run(cfg)
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    except KeyboardInterrupt:  # a second Ctrl-C: no traceback, and say what survives
        click.echo(f"dens-train: aborted; the last completed epoch's last.pt (if any) is in {values['out']}", err=True)
        sys.exit(130)
    if rank != 0:
        return
    if result.get("interrupted"):
        click.echo(
            f"dens-train: interrupted at epoch {result['epoch'] + 1}, step {result['step']}; last.pt saved. "
            f"Continue with: dens-train --out {cfg.out} --resume",
            err=True,
        )
        sys.exit(130)
    report.print_result(cfg, result, time.perf_counter() - start)


def _latest() -> Path:
    try:
        return runs.latest_run()
    except FileNotFoundError as exc:
        raise click.UsageError(f"--resume without --out: {exc}") from exc


if __name__ == "__main__":
    main()
