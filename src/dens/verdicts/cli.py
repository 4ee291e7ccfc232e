"""dens-verdicts: click arguments -> :class:`VerdictsConfig` -> :func:`dens.verdicts.runner.run`."""

from __future__ import annotations

from pathlib import Path

import click

from dens.verdicts.runner import VerdictsConfig, VerdictsError, run


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("exams_csv", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("verdicts_csv", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write EXAMS_CSV with the columns verdict, reviewer_density, reviewed_at and reviewer here "
    "[default: report only].",
)
def main(exams_csv: Path, verdicts_csv: Path, out: Path | None) -> None:
    """Merge a reviewer's verdicts (the review page's 'Export verdicts' CSV) into EXAMS_CSV (dens-infer's
    preds.exam.csv) and report how far model and reviewer agree: the share of calls accepted, dense/non-dense
    agreement and Cohen's kappa over A-D, with their counts. A verdict for an exam EXAMS_CSV lacks, or made on
    another call or identity than EXAMS_CSV's, is an error and nothing is merged (exit 1)."""
    try:
        result = run(VerdictsConfig(exams_csv, verdicts_csv, out))
    except VerdictsError as exc:
        raise click.ClickException(str(exc)) from exc
    for line in result.lines():
        click.echo(line)
    if out is not None:
        click.echo(f"merged: {out}")
