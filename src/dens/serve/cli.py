"""``dens-serve STATE --model model.onnx --allow-aet PACS --send-to PACS@host:104``: click options ->
:class:`ServeConfig` -> :func:`dens.serve.node.start` and :meth:`Node.serve`."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

import click

from dens.commands import PULL_AUTH_OPTIONS, flag_option, scoring_options
from dens.serve.config import (
    DEFAULT_AET,
    DEFAULT_AUDIT_KEEP,
    DEFAULT_AUDIT_MAX_MIB,
    DEFAULT_DRIFT_WINDOW,
    DEFAULT_MAX_INSTANCE_MIB,
    DEFAULT_MAX_PEER_CONNECTIONS,
    DEFAULT_MOVE_PORT,
    DEFAULT_PORT,
    DEFAULT_PULL_EVERY,
    DEFAULT_PULL_SINCE,
    DEFAULT_RETRY_SECONDS,
    DEFAULT_STABLE_SECONDS,
    EXIT_FAILED,
    MIN_DRIFT_WINDOW,
    RETRIEVES,
    Allowed,
    Destination,
    ServeConfig,
    parse_duration,
)

_EPILOG = f"""\b
Exit status: 0 stopped (SIGTERM, Ctrl-C) after the studies being scored; {EXIT_FAILED} could not start
(no model, a port in use, a state folder of another model or kept by another node) or could not go on
(the decode engine broke down: restart it); 2 bad options. A --pull PACS that cannot be reached stops
nothing: the poll is logged, counted and tried again at the next one.
"""


def _parse(kind):
    def parse(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]):
        try:
            return tuple(kind.parse(v) for v in values)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from exc

    return parse


def _duration(ctx: click.Context, param: click.Parameter, value: str) -> float:
    try:
        return parse_duration(value, f"--{param.name.replace('_', '-')}")
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


_PULL = (
    click.option(
        "--pull",
        default=None,
        metavar="URL",
        help="Pull studies from a PACS on a schedule, into the same spool as C-STOREs: a DICOMweb base URL "
        "(https://HOST/dicom-web: QIDO-RS, WADO-RS) or dicom://AET@HOST:PORT (C-FIND, then C-MOVE or C-GET). Each "
        "poll asks for the studies of --pull-since and fetches those not answered yet; a study dated today is "
        "fetched once its instance count is the same at two polls --stable-seconds apart (one dated before today "
        "at once), then scored as a C-STORE'd study is.",
    ),
    click.option(
        "--pull-every",
        default=f"{DEFAULT_PULL_EVERY / 60:g}m",
        show_default=True,
        metavar="DURATION",
        callback=_duration,
        help="Poll this often (30s, 10m, 1h); the first poll runs at start.",
    ),
    click.option(
        "--pull-since",
        default=DEFAULT_PULL_SINCE,
        show_default=True,
        metavar="Nh|Nd",
        help="Each poll asks for the studies of the last N hours or days (a StudyDate range ending today).",
    ),
    click.option(
        "--pull-modality",
        default=None,
        metavar="CODE",
        help="Only studies holding this modality (ModalitiesInStudy) [default: MG].",
    ),
    click.option(
        "--pull-query",
        multiple=True,
        metavar="KEY=VALUE",
        help="One more matching key of the search (repeatable), a DICOM keyword: InstitutionName=..., "
        "ReferringPhysicianName=...",
    ),
    *PULL_AUTH_OPTIONS,
    click.option(
        "--pull-ae-title",
        default=None,
        metavar="AET",
        help="DIMSE: the node's AE title calling the PACS and receiving its C-MOVE [default: --aet].",
    ),
    click.option(
        "--pull-retrieve",
        type=click.Choice(RETRIEVES),
        default=None,
        help="DIMSE: move (C-MOVE to a storage SCP of the node's own on --pull-move-port, open while a poll fetches; "
        "the PACS must know the pull's AE title, this address and that port) or get (C-GET on the query's "
        "association; nothing to register) [default: move].",
    ),
    click.option(
        "--pull-move-port",
        type=click.IntRange(1, 65535),
        default=None,
        help=f"DIMSE, --pull-retrieve move: the port the node receives the C-MOVE on [default: {DEFAULT_MOVE_PORT}].",
    ),
)


def pull_options(command):
    """The options of a scheduled pull from a PACS (dens.pull): where, how often, which studies, how."""
    for option in reversed(_PULL):
        command = option(command)
    return command


@click.command(epilog=_EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("state", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--status",
    "show_status",
    is_flag=True,
    help="Print the status of the node that keeps STATE (JSON, read from the folder: no token) and exit.",
)
@click.option(
    "--model",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="ONNX model from dens-export [default: runs/latest/model.onnx]. A state folder serves one model.",
)
@click.option(
    "--allow-modified-model",
    is_flag=True,
    help="Serve a model whose graph or metadata was edited after dens-export signed it, with a loud warning "
    "[default: refuse it; re-export instead].",
)
@click.option("--aet", default=DEFAULT_AET, show_default=True, help="The node's AE title (callers must call it).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=DEFAULT_PORT,
    show_default=True,
    help="DICOM port (0: any free one).",
)
@click.option(
    "--allow-aet",
    "allow",
    multiple=True,
    metavar="AET[@ADDRESS]",
    callback=_parse(Allowed),
    help="A calling AE title allowed to associate, from any address or only from ADDRESS (repeatable).",
)
@click.option("--allow-any-aet", "allow_any", is_flag=True, help="Accept any calling AE title (no allow-list).")
@click.option(
    "--stable-seconds",
    type=click.FloatRange(min=0),
    default=DEFAULT_STABLE_SECONDS,
    show_default=True,
    help="A study is complete once no instance of it arrived for this long.",
)
@click.option(
    "--send-to",
    "send_to",
    multiple=True,
    metavar="AET@HOST:PORT",
    callback=_parse(Destination),
    help="C-STORE each study's SR to this AE (repeatable).",
)
@click.option(
    "--stow-url", "stow_urls", multiple=True, metavar="URL", help="STOW-RS each SR to this DICOMweb URL (repeatable)."
)
@click.option(
    "--retry-seconds",
    type=click.FloatRange(min=0.01),
    default=DEFAULT_RETRY_SECONDS,
    show_default=True,
    help="Wait before retrying a failed send; doubled each time, up to 10 minutes.",
)
@click.option(
    "--max-instance-mib",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_INSTANCE_MIB,
    show_default=True,
    help="Refuse an instance whose data set is larger (0xA700, the reason in Error Comment); it is received "
    "to the spool's disk, never to memory, and past this it is no longer kept.",
)
@click.option(
    "--max-peer-connections",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_PEER_CONNECTIONS,
    show_default=True,
    help="Connections one peer address may hold at once (the node has 16 association slots).",
)
@click.option(
    "--status-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve the status as JSON over HTTP on --host at this port (GET /status, /status?studies=N, /health; "
    "GET /metrics for Prometheus, with --status-token-env).",
)
@click.option(
    "--status-token-env",
    default=None,
    metavar="NAME",
    help="Every status request must carry 'Authorization: Bearer TOKEN', TOKEN read from the environment "
    "variable NAME (never on the command line); 401 otherwise. Give one whenever --host is not loopback.",
)
@click.option(
    "--audit-log",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Append one JSON line per event (associations, refusals, studies received and scored, SRs sent) to "
    "this file [default: STATE/audit.jsonl].",
)
@click.option(
    "--audit-max-mib",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_AUDIT_MAX_MIB,
    show_default=True,
    help="Rotate the audit log before it grows past this (audit.jsonl -> audit.jsonl.1 -> ...).",
)
@click.option(
    "--audit-keep",
    type=click.IntRange(min=1),
    default=DEFAULT_AUDIT_KEEP,
    show_default=True,
    help="Rotated audit logs kept besides the current one (the oldest goes).",
)
@click.option(
    "--drift-window",
    type=click.IntRange(min=MIN_DRIFT_WINDOW),
    default=DEFAULT_DRIFT_WINDOW,
    show_default=True,
    help="Exams per manufacturer and model whose mix of calls is compared with the model card's test split "
    "(/status, /metrics; a warning when the dense share leaves the expected range).",
)
@click.option(
    "--tls-cert",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="TLS certificate (PEM): DICOM over TLS only.",
)
@click.option(
    "--tls-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="The certificate's private key (PEM).",
)
@click.option(
    "--tls-ca",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="CA certificates (PEM): callers must present a certificate one of them signed.",
)
@click.option(
    "--send-tls-ca",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="CA certificates (PEM): every --send-to association uses TLS, the destination's certificate checked "
    "against them and its HOST.",
)
@click.option(
    "--send-tls-cert",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="The node's client certificate (PEM) for --send-to destinations that ask for one (with --send-tls-ca).",
)
@click.option(
    "--send-tls-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="The client certificate's private key (PEM).",
)
@click.option(
    "--stow-token-env",
    default=None,
    metavar="NAME",
    help="STOW-RS with 'Authorization: Bearer TOKEN', TOKEN read from the environment variable NAME.",
)
@click.option("--stow-user", default=None, metavar="USER", help="STOW-RS with HTTP basic authentication as USER.")
@click.option(
    "--stow-password-env",
    default=None,
    metavar="NAME",
    help="The --stow-user password, read from the environment variable NAME.",
)
@click.option(
    "--stow-ca",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="CA certificates (PEM) for https:// --stow-url servers [default: the system's].",
)
@pull_options
@scoring_options
@flag_option
@click.option("-v", "--verbose", is_flag=True, help="Log pynetdicom's protocol messages too.")
def main(state: Path, show_status: bool, verbose: bool, **options) -> None:
    """A DICOM node that scores breast density: it receives mammograms by C-STORE (and answers C-ECHO),
    spools each instance durably before acknowledging it, scores each study once it has been quiet for
    --stable-seconds, appends the rows to STATE/preds.csv and sends the study's density SR to each --send-to
    AE and --stow-url. Listens on 127.0.0.1 unless --host says otherwise; only --allow-aet callers. With --pull,
    it also asks a PACS for new studies every --pull-every and scores them as if they had been sent."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr
    )
    for noisy in ("PIL", "highdicom", "pynetdicom", "dicomweb_client", "dens.pull"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose and noisy == "pynetdicom" else logging.WARNING)
    # A sender's invalid values (a UID with path characters) are the node's to refuse or contain, not lines
    # in its log for every element read.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\.")
    if show_status:
        _print_status(state)
        return
    try:
        cfg = ServeConfig(state=state, **options)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    from dens.serve.node import ServeError, run  # here: spawned decode workers import this module
    from dens.serve.send import outgoing

    try:
        outgoing(cfg)  # certificates, keys and secrets: a bad one is a bad option, before the model loads
        cfg.status_token()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    try:
        result = run(cfg, ready=lambda node: click.echo(node.line()) or sys.stdout.flush())
    except ServeError as exc:
        click.echo(f"dens-serve: error: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    click.echo(result.line(), err=bool(result.failed))
    sys.exit(result.exit_code)


def _print_status(folder: Path) -> None:
    """Print the status read from ``folder``, which it never writes (a read-only folder is read as it is)."""
    import sqlite3

    from dens.serve.state import State
    from dens.serve.status import snapshot

    try:
        state = State(folder, read_only=True)
    except OSError as exc:
        click.echo(f"dens-serve: error: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    try:
        shown = json.dumps(snapshot(state), indent=1)
    except sqlite3.Error as exc:  # not a dens-serve database, or one cut short
        click.echo(f"dens-serve: error: cannot read the status from {folder} ({exc})", err=True)
        sys.exit(EXIT_FAILED)
    finally:
        state.close()
    click.echo(shown)
