"""What dens-serve is asked to do: :class:`ServeConfig`, and the peers it names (:class:`Destination`,
:class:`Allowed`), parsed from their command-line spellings, and the durations of a scheduled pull
(:func:`parse_duration`).

Standard library only (dens.pull's query and source are too): dens-serve's command-line module imports this,
and a spawned decode worker imports that module before it starts.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# Exit status of dens-serve: 0 stopped cleanly (SIGTERM, Ctrl-C); 1 could not start; 2 bad options.
from dens.commands import EXIT_FAILED as EXIT_FAILED
from dens.commands import EXIT_OK as EXIT_OK
from dens.commands import EXIT_USAGE as EXIT_USAGE
from dens.flags import parse_flag
from dens.pull import Access, Dimse, Query, Source, parse_source
from dens.pull.source import DEFAULT_MOVE_PORT as DEFAULT_MOVE_PORT
from dens.pull.source import RETRIEVES as RETRIEVES  # --pull-retrieve: C-MOVE or C-GET
from dens.pull.source import check_ae_title, is_loopback, secret_from_env
from dens.pull.source import redact as redact  # what the node prints of a URL (its modules import it from here)

DEFAULT_AET = "DENS"
DEFAULT_PORT = 11112  # the registered DICOM port above 1024 (104 needs root)
DEFAULT_STABLE_SECONDS = 60.0  # as Orthanc's StableAge: a study quiet this long is complete
DEFAULT_RETRY_SECONDS = 5.0  # the first retry of a failed send; each next one waits twice as long
MAX_RETRY_SECONDS = 600.0
# An instance's data set larger than this is refused (0xA700, its reason in Error Comment): the largest digital
# mammograms, uncompressed, take under 100 MiB, and dens' decode budget refuses a decode over 1 GiB.
DEFAULT_MAX_INSTANCE_MIB = 256
DEFAULT_MAX_PEER_CONNECTIONS = 4  # of the node's 16 association slots, those one peer address may hold at once
AUDIT_NAME = "audit.jsonl"  # the audit log's default, in the state folder
DEFAULT_AUDIT_MAX_MIB = 64.0  # the audit log is rotated before it grows past this
DEFAULT_AUDIT_KEEP = 10  # rotated audit logs kept besides the current one
DEFAULT_DRIFT_WINDOW = 500  # exams per acquisition unit in the drift window
MIN_DRIFT_WINDOW = 50  # no drift verdict is given on fewer exams
DEFAULT_PULL_EVERY = 600.0  # seconds between the polls of --pull
DEFAULT_PULL_SINCE = "24h"  # the study dates each poll asks for
MIN_PULL_EVERY = 1.0
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smh])", re.ASCII)
_SECONDS = {"s": 1, "m": 60, "h": 3600}
# dens.pull words its errors for dens-infer's options; dens-serve's carry a --pull prefix.
_PULL_OPTION = re.compile(r"\bSTUDIES\b|--(since|modality|query|ae-title|retrieve|move-port)\b")


def parse_duration(text: str, option: str = "--pull-every") -> float:
    """``30s``, ``10m``, ``1h`` (or ``1.5h``) as seconds; a ValueError says what is wrong."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise ValueError(f"{option} {text!r}: a duration, a number and its unit: 30s, 10m or 1h")
    return float(match.group(1)) * _SECONDS[match.group(2)]


def _pull_words(text: str) -> str:
    """An error of dens.pull with dens-serve's option names."""
    text = text.replace("--study-date or --since", "--since")
    return _PULL_OPTION.sub(lambda m: "--pull" if m.group(0) == "STUDIES" else f"--pull-{m.group(1)}", text)


def _host_port(text: str, spelling: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")  # an IPv6 address written [::1]:104
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT (in {spelling})")
    return host, int(port)


@dataclass(frozen=True)
class Destination:
    """A DICOM AE the SRs are sent to by C-STORE (``--send-to AET@HOST:PORT``)."""

    aet: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        aet, sep, address = text.partition("@")
        if not sep:
            raise ValueError(f"{text!r} is not AET@HOST:PORT (such as PACS@10.0.0.5:104)")
        host, port = _host_port(address, "AET@HOST:PORT")
        return cls(check_ae_title(aet), host, port)

    def __str__(self) -> str:
        return f"{self.aet}@{self.host}:{self.port}"


@dataclass(frozen=True)
class Allowed:
    """A calling AE title the node accepts associations from (``--allow-aet AET``), from any address or, with
    ``AET@ADDRESS``, from that address only."""

    aet: str
    address: str | None = None

    @classmethod
    def parse(cls, text: str) -> Allowed:
        aet, sep, address = text.partition("@")
        if sep and not address:
            raise ValueError(f"{text!r}: an address after @ (AET or AET@ADDRESS)")
        return cls(check_ae_title(aet), address.strip("[]") or None)

    def admits(self, aet: str, address: str) -> bool:
        return aet.strip() == self.aet.strip() and (self.address is None or self.address == address)


def _url_host(url: str) -> str:
    host = url.split("://", 1)[1].split("/", 1)[0].rpartition("@")[2]
    return host[1:].partition("]")[0] if host.startswith("[") else host.partition(":")[0]


@dataclass(frozen=True)
class ServeConfig:
    """What ``dens-serve`` was asked to do. ``None`` means the default for the provider in use."""

    state: Path  # the node's folder: spool, database, preds.csv, SRs
    model: Path | None = None  # default: runs/latest/model.onnx
    allow_modified_model: bool = False  # serve a model edited after export (its signature fails), loudly warned
    aet: str = DEFAULT_AET
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    allow: tuple[Allowed, ...] = ()
    allow_any: bool = False  # accept any calling AE title (the allow-list is the default)
    stable_seconds: float = DEFAULT_STABLE_SECONDS
    send_to: tuple[Destination, ...] = ()
    stow_urls: tuple[str, ...] = ()
    retry_seconds: float = DEFAULT_RETRY_SECONDS
    max_instance_mib: int = DEFAULT_MAX_INSTANCE_MIB
    max_peer_connections: int = DEFAULT_MAX_PEER_CONNECTIONS
    status_port: int | None = None
    # The name of the environment variable that holds the status port's bearer token (never the token).
    status_token_env: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None  # with it, callers must present a certificate it signed
    # Outgoing C-STORE over TLS (every --send-to): the CA that signed the destinations' certificates, and the
    # node's own certificate for destinations that ask for one.
    send_tls_ca: Path | None = None
    send_tls_cert: Path | None = None
    send_tls_key: Path | None = None
    # STOW-RS: the names of the environment variables that hold the secrets (never the secrets themselves, which
    # a command line would show in ps), and the CA for https:// servers a system CA did not sign.
    stow_token_env: str | None = None
    stow_user: str | None = None
    stow_password_env: str | None = None
    stow_ca: Path | None = None
    device: str = "auto"
    batch_size: int | None = None
    workers: int | None = None
    threads: int | None = None
    flag: str | None = None
    audit_log: Path | None = None  # default: STATE/audit.jsonl
    audit_max_mib: float = DEFAULT_AUDIT_MAX_MIB
    audit_keep: int = DEFAULT_AUDIT_KEEP
    drift_window: int = DEFAULT_DRIFT_WINDOW
    # A scheduled pull (dens.pull): the PACS each poll asks (a DICOMweb base URL or dicom://AET@HOST:PORT), how
    # often (seconds), which studies, and how the node reaches it (None: dens.pull.Access's default; the AE title:
    # --aet). Secrets are named by their environment variables, never given.
    pull: str | None = None
    pull_every: float = DEFAULT_PULL_EVERY
    pull_since: str = DEFAULT_PULL_SINCE  # 24h, 7d: the study dates up to today
    pull_modality: str | None = None  # ModalitiesInStudy; None: MG
    pull_query: tuple[str, ...] = ()  # extra matching keys, KEY=VALUE
    pull_token_env: str | None = None
    pull_user: str | None = None
    pull_password_env: str | None = None
    pull_ca: Path | None = None
    pull_ae_title: str | None = None
    pull_retrieve: str | None = None
    pull_move_port: int | None = None

    def __post_init__(self) -> None:
        if not self.allow and not self.allow_any:
            raise ValueError(
                "no calling AE title is allowed: name each sender with --allow-aet AET (or AET@ADDRESS), or pass "
                "--allow-any-aet to accept any"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-ca needs --tls-cert and --tls-key")
        if self.stable_seconds < 0 or self.retry_seconds <= 0:
            raise ValueError("--stable-seconds must be >= 0 and --retry-seconds > 0")
        if self.max_instance_mib < 1 or self.max_peer_connections < 1:
            raise ValueError("--max-instance-mib and --max-peer-connections must be at least 1")
        if self.audit_max_mib <= 0 or self.audit_keep < 1:
            raise ValueError("--audit-max-mib must be > 0 and --audit-keep at least 1")
        if self.drift_window < MIN_DRIFT_WINDOW:
            raise ValueError(f"--drift-window must be at least {MIN_DRIFT_WINDOW} exams (no verdict is given on fewer)")
        check_ae_title(self.aet)
        parse_flag(self.flag)  # a bad --flag is a bad option
        if self.status_token_env is not None and self.status_port is None:
            raise ValueError("--status-token-env needs --status-port (the status port it protects)")
        self._check_send_tls()
        self._check_stow()
        self._check_pull()

    def _check_send_tls(self) -> None:
        if (self.send_tls_cert is None) != (self.send_tls_key is None):
            raise ValueError("a client certificate needs both --send-tls-cert and --send-tls-key")
        if self.send_tls_cert is not None and self.send_tls_ca is None:
            raise ValueError("--send-tls-cert needs --send-tls-ca (the CA that signed the destinations' certificates)")
        if self.send_tls_ca is not None and not self.send_to:
            raise ValueError("--send-tls-ca applies to --send-to destinations, and none is given")

    def _check_stow(self) -> None:
        for url in self.stow_urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(
                    f"--stow-url {redact(url)!r}: an http:// or https:// URL (such as http://pacs/dicom-web/studies)"
                )
            if redact(url) != url:  # a command line shows in ps, and urllib would take USER:PASSWORD for the host
                raise ValueError(
                    f"--stow-url {redact(url)!r}: no credentials in the URL; give them with --stow-user USER and "
                    "--stow-password-env NAME, or --stow-token-env NAME"
                )
            if self.stow_auth and url.startswith("http://") and not is_loopback(_url_host(url)):
                raise ValueError(
                    f"--stow-url {redact(url)!r}: credentials go to https:// URLs only (or http:// on this machine's "
                    "loopback), not in clear over the network"
                )
        if self.stow_token_env and self.stow_user:
            raise ValueError("one STOW-RS authentication: --stow-token-env or --stow-user with --stow-password-env")
        if (self.stow_user is None) != (self.stow_password_env is None):
            raise ValueError("HTTP basic authentication needs both --stow-user and --stow-password-env")
        if (self.stow_auth or self.stow_ca) and not self.stow_urls:
            raise ValueError("STOW-RS options (--stow-token-env, --stow-user, --stow-ca) need a --stow-url")

    def _check_pull(self) -> None:
        if self.pull is None:
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            given = [
                "--" + name.replace("_", "-")
                for name in defaults
                if name.startswith("pull_") and getattr(self, name) != defaults[name]
            ]
            if given:
                raise ValueError(
                    f"{', '.join(given)}: options of a scheduled pull; name the PACS with --pull (a DICOMweb base URL "
                    "such as https://pacs.example.org/dicom-web, or dicom://AET@HOST:PORT)"
                )
            return
        if not re.match(r"(?i)(https?|dicom)://", self.pull):
            raise ValueError(
                f"--pull {redact(self.pull)!r}: a DICOMweb base URL (https://pacs.example.org/dicom-web) or "
                "dicom://AET@HOST:PORT (the PACS's AE title, host and DICOM port)"
            )
        if not self.pull_every >= MIN_PULL_EVERY:
            raise ValueError(f"--pull-every must be at least {MIN_PULL_EVERY:g} s (such as 30s, 10m or 1h)")
        try:
            source = parse_source(self.pull)
            self.pull_search()
            access = self.pull_access()
            access.check(source)
        except ValueError as exc:
            raise ValueError(redact(_pull_words(str(exc)))) from None
        if isinstance(source, Dimse) and access.how == "move" and access.port == self.port:
            raise ValueError(
                f"--pull-move-port {access.port} is the node's --port: C-MOVE needs a port of its own (the one the "
                "PACS knows for the pull's AE title)"
            )

    @property
    def pull_source(self) -> Source | None:
        """The PACS --pull names (None: no scheduled pull)."""
        return parse_source(self.pull) if self.pull else None

    def pull_search(self, now: dt.datetime | None = None) -> Query:
        """The studies a poll at ``now`` (default: this moment) asks for: those dated within --pull-since of it,
        with --pull-modality (MG by default) and the --pull-query keys. ValueError, worded for dens.pull's options."""
        return Query.parse(since=self.pull_since, modality=self.pull_modality, keys=self.pull_query, now=now)

    def pull_access(self) -> Access:
        """How the node reaches the PACS of --pull: over DIMSE as --pull-ae-title, else --aet; over DICOMweb, an
        answer longer than --max-instance-mib is refused, as a C-STORE's instance would be."""
        dimse = isinstance(self.pull_source, Dimse)
        return Access(
            token_env=self.pull_token_env,
            user=self.pull_user,
            password_env=self.pull_password_env,
            ca=self.pull_ca,
            max_answer_mib=self.max_instance_mib,
            ae_title=(self.pull_ae_title or self.aet) if dimse else self.pull_ae_title,
            retrieve=self.pull_retrieve,
            move_port=self.pull_move_port,
        )

    @property
    def stow_auth(self) -> str | None:
        """How the node authenticates to STOW-RS servers: ``"bearer"``, ``"basic"`` or None."""
        return "bearer" if self.stow_token_env else "basic" if self.stow_user else None

    def stow_authorization(self, environ: Mapping[str, str] = os.environ) -> str | None:
        """The ``Authorization`` header for STOW-RS requests, from the environment variable the options name
        (None without authentication). Raises ValueError, naming the variable only, when it is unset or empty."""
        if self.stow_token_env:
            return "Bearer " + secret_from_env("--stow-token-env", self.stow_token_env, environ)
        if self.stow_password_env:
            secret = secret_from_env("--stow-password-env", self.stow_password_env, environ)
            return "Basic " + base64.b64encode(f"{self.stow_user}:{secret}".encode()).decode("ascii")
        return None

    def status_token(self, environ: Mapping[str, str] = os.environ) -> str | None:
        """The bearer token every request to the status port must carry, from the environment variable
        ``--status-token-env`` names (None without one). Raises ValueError, naming the variable only, when it is
        unset or empty."""
        return (
            None
            if self.status_token_env is None
            else secret_from_env("--status-token-env", self.status_token_env, environ)
        )

    @property
    def audit_path(self) -> Path:
        """Where the audit log goes (absolute): ``--audit-log``, else ``audit.jsonl`` in the state folder."""
        return (Path(self.audit_log) if self.audit_log is not None else Path(self.state) / AUDIT_NAME).absolute()

    @property
    def status_exposed(self) -> bool:
        """Whether the status port answers anyone who can reach it: no token, on an address beyond loopback."""
        return self.status_port is not None and self.status_token_env is None and not is_loopback(self.host)

    @property
    def destinations(self) -> tuple[str, ...]:
        """Every destination as the outbox names it: ``dicom:AET@HOST:PORT`` or ``stow:URL``."""
        return (*(f"dicom:{d}" for d in self.send_to), *(f"stow:{u}" for u in self.stow_urls))
