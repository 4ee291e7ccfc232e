"""``dens-merge SHARDS --out preds.csv``: click options -> :func:`dens.preds.merge.merge`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from dens.commands import EXIT_ERRORS, EXIT_FAILED, EXIT_NOTHING_SCORED, EXIT_OK, flag_option

_EPILOG = f"""\b
Exit status: {EXIT_OK} merged; {EXIT_ERRORS} merged, but the merged file holds 'error' rows;
{EXIT_NOTHING_SCORED} merged, but no row of it was scored; {EXIT_FAILED} nothing merged (an incomplete
or mixed set, a shard still being written, empty, cut short or overlapping another).
"""


@click.command(epilog=_EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("shards", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The merged preds.csv.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
@click.option(
    "--allow-incomplete",
    is_flag=True,
    help="Merge a set that lacks shards (missing, unfinished, or without the record a --shard run writes "
    "beside its preds.csv), and say what it lacks; its exams may rest on some of their views only.",
)
@flag_option
def main(shards: tuple[Path, ...], out: Path, overwrite: bool, allow_incomplete: bool, flag: str | None) -> None:
    """Join the preds.csv files of `dens-infer --shard i/N` runs (SHARDS) into one --out, and write its
    breast and exam CSVs from all of them (an exam's views may lie in several shards). The set must be
    whole: every shard i/N of one N, scored by one model over one STUDIES, as each run's record
    (<stem>.shard.json beside its preds.csv) says."""
    from dens.flags import parse_flag
    from dens.preds.merge import MergeError, merge
    from dens.preds.writer import CorruptOutput, OutputExists

    try:
        merged = merge(shards, out, overwrite=overwrite, rule=parse_flag(flag), allow_incomplete=allow_incomplete)
    except (MergeError, CorruptOutput, OutputExists, OSError) as exc:
        click.echo(f"dens-merge: error: {exc}; nothing was merged", err=True)
        sys.exit(EXIT_FAILED)
    click.echo(
        f"dens-merge: {merged.rows} rows from {merged.shards} shards ({merged.errors} errors) into {merged.out}; "
        f"wrote {merged.breast_csv}, {merged.exam_csv}"
    )
    if merged.notes:
        click.echo(
            f"dens-merge: warning: the merged set is incomplete (--allow-incomplete): {'; '.join(merged.notes)}; "
            "its exams may rest on some of their views only",
            err=True,
        )
    if not merged.ok:
        click.echo(f"dens-merge: nothing scored: no row of {merged.out} is 'ok' (exit status {EXIT_NOTHING_SCORED})")
    sys.exit(EXIT_NOTHING_SCORED if not merged.ok else EXIT_ERRORS if merged.errors else EXIT_OK)
