"""What the commands share, defined once: the exit statuses of the scoring commands (dens-infer, dens-merge),
and the options several take: where and how the model runs (dens-infer, dens-serve), which calls are
flagged, the progress bar, and how a pull from a PACS authenticates (dens-infer, dens-serve).

click only at import: a spawned decode worker imports its command's module, and with it this one.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import click

from dens.scoring import DEVICES

# Exit statuses: 3 means the run finished but its output holds error rows; 4 that it finished with no file scored
# (every file skipped or failed: a folder of plain images without --plain-images, of reports, of bad files);
# 130: Ctrl-C; 143: SIGTERM.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ERRORS, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 3, 130, 143
EXIT_NOTHING_SCORED = 4


def check_flag(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A click callback: ``value`` when it is a flag rule (:func:`dens.flags.parse_flag`), else a usage error."""
    from dens.flags import parse_flag

    try:
        parse_flag(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    return value


_SCORING = (
    click.option(
        "--device",
        type=click.Choice(DEVICES),
        default="auto",
        show_default=True,
        help="auto: TensorRT, then CUDA, then CPU (GPU ones only where a GPU is present). An explicit GPU "
        "choice that cannot be honoured is an error.",
    ),
    click.option(
        "--batch-size",
        type=click.IntRange(min=1),
        default=None,
        help="Images per model call [default: 4 on CPU, 64 on CUDA/TensorRT].",
    ),
    click.option(
        "--workers",
        type=click.IntRange(min=1),
        default=None,
        help="Decode processes [default: CPU: all cores, at a lower priority than the model, which uses "
        "all of them too; GPU: cores - 1].",
    ),
    click.option(
        "--threads",
        type=click.IntRange(min=1),
        default=None,
        help="ONNX Runtime intra-op threads [default: CPU: all cores; GPU: 1].",
    ),
)

flag_option = click.option(
    "--flag",
    "flag",
    default=None,
    metavar="RULE",
    callback=check_flag,
    help="Which calls are flagged for review: classes ('C,D', the default) or a threshold ('p_dense>=0.5', 'p_D>0.3').",
)

progress_option = click.option(
    "--progress/--no-progress", default=None, help="Progress bar [default: when stderr is a terminal]."
)


# How a pull from a PACS (dens.pull.Access) authenticates to a DICOMweb server: dens-infer's and dens-serve's.
PULL_AUTH_OPTIONS = (
    click.option(
        "--pull-token-env",
        default=None,
        metavar="NAME",
        help="DICOMweb: send 'Authorization: Bearer TOKEN', TOKEN read from the environment variable NAME.",
    ),
    click.option("--pull-user", default=None, metavar="USER", help="DICOMweb: HTTP basic authentication as USER."),
    click.option(
        "--pull-password-env",
        default=None,
        metavar="NAME",
        help="DICOMweb: the password for --pull-user, read from the environment variable NAME.",
    ),
    click.option(
        "--pull-ca",
        type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path),
        default=None,
        help="DICOMweb over https://: check the server's certificate against these CA certificates (PEM) "
        "[default: the system's].",
    ),
)


def scoring_options(command: Callable) -> Callable:
    """--device, --batch-size, --workers and --threads: the model's device and the decode processes."""
    for option in reversed(_SCORING):
        command = option(command)
    return command
