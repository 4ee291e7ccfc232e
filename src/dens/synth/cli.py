"""dens-synth: click options -> :class:`SynthConfig` -> :func:`dens.synth.runner.run`, then a one-line summary."""

from __future__ import annotations

import time
from pathlib import Path

import click

from dens import counted, show_progress
from dens.synth.runner import MAX_SEED, SIZES, SynthConfig, run


@click.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--patients", type=click.IntRange(min=1), required=True, help="Number of patients.")
@click.option(
    "--size",
    type=click.Choice(SIZES),
    default="small",
    show_default=True,
    help="full: real detector sizes; small: about 4x smaller on each side.",
)
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True, help="Same seed, same bytes.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Processes [default: all CPUs].")
@click.option("--overwrite", is_flag=True, help="Replace an earlier cohort in OUT.")
@click.option("--progress/--no-progress", default=None, help="Progress bars [default: when stderr is a terminal].")
def main(progress: bool | None, **options) -> None:
    """Write a synthetic screening cohort (DICOM files + train.csv) to OUT."""
    start = time.perf_counter()
    try:
        cfg = SynthConfig(**options, progress=show_progress(progress))
        table = run(cfg)
    except (ValueError, FileExistsError) as exc:
        raise click.UsageError(str(exc)) from exc
    elapsed = time.perf_counter() - start
    click.echo(
        f"dens-synth: {counted(len(table), 'file')}, {counted(cfg.patients, 'patient')} in {elapsed:.1f} s "
        f"({len(table) / elapsed:.1f} img/s); labels in {cfg.out / 'train.csv'}"
    )
