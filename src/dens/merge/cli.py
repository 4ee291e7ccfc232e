"""``dens-merge SHARDS --out preds.csv``: click options -> :func:`dens.preds.merge.merge`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from dens.commands import EXIT_ERRORS, EXIT_FAILED, flag_option


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("shards", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The merged preds.csv.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@flag_option
def main(shards: tuple[Path, ...], out: Path, overwrite: bool, flag: str | None) -> None:
    """Join the preds.csv files of `dens-infer --shard i/N` runs (SHARDS) into one --out, and write its
    breast and exam CSVs from all of them (an exam's views may lie in several shards). Exit status as
    dens-infer's: 3 when the merged file holds error rows."""
    from dens.flags import parse_flag
    from dens.preds.merge import MergeError, merge
    from dens.preds.writer import CorruptOutput, OutputExists

    try:
        merged = merge(shards, out, overwrite=overwrite, rule=parse_flag(flag))
    except (MergeError, CorruptOutput, OutputExists, OSError) as exc:
        click.echo(f"dens-merge: error: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    click.echo(
        f"dens-merge: {merged.rows} rows from {merged.shards} shards ({merged.errors} errors) into {merged.out}; "
        f"wrote {merged.breast_csv}, {merged.exam_csv}"
    )
    sys.exit(EXIT_ERRORS if merged.errors else 0)
