"""Where a pull comes from and how dens reaches it: the source spelt as STUDIES (:func:`parse_source`: a
DICOMweb base URL, or ``dicom://CALLED_AET@HOST:PORT`` for DIMSE) and :class:`Access` (authentication, the
CA, dens's own AE title, C-MOVE or C-GET, the move port, timeouts).

Secrets are never in a URL or on a command line, where ``ps`` shows them: a URL holding ``user:pass@`` is
refused, and a token or password is read from the environment variable an option names, at start.
Credentials go to https:// URLs only, or to http:// on this machine's loopback (a local proxy).

Standard library only: dens-infer's command-line module imports this, and a spawned decode worker imports
that module before it starts.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_AE_TITLE = "DENS"
DEFAULT_MOVE_PORT = 11113  # beside 11112, dens-serve's port
RETRIEVES = ("move", "get")  # C-MOVE to dens's own storage SCP; C-GET on the query's association
DEFAULT_TIMEOUT = 60.0  # seconds for a connection, an association, a request or a response
DEFAULT_MAX_ANSWER_MIB = 256  # the longest DICOMweb answer read (an instance, a listing): dens-serve's instance limit
_AE_TITLE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")  # PS3.5: 16 characters of the default set, no backslash
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def check_ae_title(title: str, option: str = "") -> str:
    """``title`` when it is an AE title (1-16 printable characters, no backslash, not all spaces); else a
    ValueError naming it (and the ``option`` that gave it)."""
    if not _AE_TITLE.fullmatch(title) or not title.strip():
        given = f"{option} {title!r}" if option else repr(title)
        raise ValueError(f"{given}: not an AE title (1-16 printable characters, no backslash)")
    return title


@dataclass(frozen=True)
class DicomWeb:
    """A DICOMweb service: its base URL, under which QIDO-RS and WADO-RS answer (``.../studies``)."""

    url: str

    def __str__(self) -> str:
        return self.url


@dataclass(frozen=True)
class Dimse:
    """A DICOM node answering C-FIND and C-MOVE or C-GET (Study Root): its AE title, host and port."""

    aet: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"dicom://{self.aet}@{host}:{self.port}"


Source = DicomWeb | Dimse


def is_remote(text: str) -> bool:
    """Whether STUDIES names a server (``scheme://...``) rather than a folder or a manifest."""
    return _SCHEME.match(text) is not None


def parse_source(text: str) -> Source | None:
    """The server STUDIES names, or None when it names a local folder or manifest. ``http://`` and
    ``https://``: a DICOMweb base URL (such as https://pacs.example.org/dicom-web); ``dicom://AET@HOST:PORT``:
    a DICOM node by its AE title. A ValueError, worded for the command line, for anything else that looks
    like a URL, and for a URL holding credentials."""
    match = _SCHEME.match(text)
    if match is None:
        return None
    scheme = match.group(1).lower()
    rest = text[match.end() :]
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if scheme in ("http", "https"):
        if "@" in authority:
            raise ValueError(
                f"STUDIES {redact(text)!r}: no credentials in the URL (a command line shows in ps); give them "
                "with --pull-user USER and --pull-password-env NAME, or --pull-token-env NAME"
            )
        parsed = urllib.parse.urlsplit(text)
        try:
            parsed.port  # noqa: B018 (raises for a port that is no number)
        except ValueError:
            raise ValueError(f"STUDIES {text!r}: its port is not a number") from None
        if not parsed.hostname or parsed.query or parsed.fragment:
            raise ValueError(
                f"STUDIES {text!r}: a DICOMweb base URL is scheme://host[:port]/path, without ?query or #fragment "
                "(such as https://pacs.example.org/dicom-web)"
            )
        return DicomWeb(text.rstrip("/"))
    if scheme == "dicom":
        return _dimse(text, rest)
    raise ValueError(
        f"STUDIES {redact(text)!r}: {scheme}:// is no source dens pulls from; give a folder, a manifest, a DICOMweb "
        "URL (http:// or https://) or dicom://AET@HOST:PORT"
    )


def _dimse(text: str, rest: str) -> Dimse:
    aet, at, address = rest.rstrip("/").rpartition("@")
    host, colon, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not at or not colon or not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in address:
        raise ValueError(
            f"STUDIES {text!r}: expected dicom://CALLED_AET@HOST:PORT, the PACS's AE title, host and DICOM port "
            "(such as dicom://PACS@10.0.0.5:104)"
        )
    if ":" in aet:
        raise ValueError(f"STUDIES {redact(text)!r}: no credentials in the URL; DIMSE authenticates by AE title")
    return Dimse(check_ae_title(aet, "STUDIES: the called AE title"), host, int(port))


# A URL's userinfo (``scheme://USER:PASSWORD@``): up to the authority's last @, as urllib.parse splits it. A
# ``dicom://AET@HOST:PORT`` source keeps its AE title, no secret (unless it holds a colon, as a password would).
_USERINFO = re.compile(r"(?i)\b(?!dicom://[^/?#\s:@]*@)([a-z][a-z0-9+.-]*://)[^/?#\s]*@")


def redact(text: str) -> str:
    """``text`` with the userinfo of every URL in it replaced by ``***``: what dens prints, logs or shows of a
    URL never holds its password."""
    return _USERINFO.sub(r"\1***@", text)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 in brackets or not) is this machine's loopback, reachable
    from no other machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def secret_from_env(option: str, name: str, environ: Mapping[str, str]) -> str:
    """The secret in the environment variable ``name`` that ``option`` names; a ValueError naming the variable
    (never a value) when it is unset or empty."""
    secret = environ.get(name, "")
    if not secret:
        raise ValueError(f"{option} {name}: the environment variable {name} is not set (or empty)")
    return secret


@dataclass(frozen=True)
class Access:
    """How dens reaches a source. DICOMweb: a bearer token (``token_env``: the name of the environment
    variable holding it) or HTTP basic (``user`` and ``password_env``), and ``ca`` (a PEM file of CA
    certificates for https://; None: the system's). DIMSE: dens's AE title (the calling one, and the C-MOVE
    destination the PACS must know), ``retrieve`` (``move`` or ``get``) and the port of dens's storage SCP
    for C-MOVE. ``timeout``: seconds for any one connection, request or response. ``max_answer_mib``: the
    longest DICOMweb answer read, in MiB (longer ones are refused, however they are sent). None means the
    default."""

    token_env: str | None = None
    user: str | None = None
    password_env: str | None = None
    ca: Path | None = None
    ae_title: str | None = None
    retrieve: str | None = None
    move_port: int | None = None
    timeout: float = DEFAULT_TIMEOUT
    max_answer_mib: int = DEFAULT_MAX_ANSWER_MIB
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ, repr=False, compare=False)

    def check(self, source: Source) -> None:
        """Refuse options that do not fit ``source`` or one another, and secrets that cannot be read
        (ValueError, worded for the command line)."""
        web = ("--pull-token-env", "--pull-user", "--pull-password-env", "--pull-ca")
        dimse = ("--ae-title", "--retrieve", "--move-port")
        given_web = [o for o, v in zip(web, (self.token_env, self.user, self.password_env, self.ca), strict=True) if v]
        given_dimse = [
            o for o, v in zip(dimse, (self.ae_title, self.retrieve, self.move_port), strict=True) if v is not None
        ]
        if isinstance(source, Dimse) and given_web:
            raise ValueError(f"{', '.join(given_web)}: DICOMweb options; a dicom:// source is reached by AE title")
        if isinstance(source, DicomWeb) and given_dimse:
            raise ValueError(f"{', '.join(given_dimse)}: DIMSE options; {source} is a DICOMweb source")
        if self.token_env and self.user:
            raise ValueError("one authentication: --pull-token-env, or --pull-user with --pull-password-env")
        if (self.user is None) != (self.password_env is None):
            raise ValueError("HTTP basic authentication needs both --pull-user and --pull-password-env")
        if self.ca is not None and not Path(self.ca).is_file():
            raise ValueError(f"--pull-ca {self.ca}: no such file (a PEM file of CA certificates)")
        if self.retrieve is not None and self.retrieve not in RETRIEVES:
            raise ValueError(f"--retrieve must be one of {', '.join(RETRIEVES)}, got {self.retrieve!r}")
        if self.move_port is not None and not 0 < self.move_port < 65536:
            raise ValueError(f"--move-port {self.move_port}: a TCP port, 1-65535 (the one the PACS knows for dens)")
        if self.move_port is not None and self.retrieve == "get":
            raise ValueError("--move-port is for --retrieve move; C-GET needs no port of dens's own")
        if self.ae_title is not None:
            check_ae_title(self.ae_title, "--ae-title")
        if self.timeout <= 0:
            raise ValueError("the pull's timeout must be more than 0 seconds")
        if self.max_answer_mib < 1:
            raise ValueError(f"--max-answer-mib {self.max_answer_mib}: at least 1 (MiB)")
        if isinstance(source, DicomWeb):
            host = urllib.parse.urlsplit(source.url).hostname or ""
            if self.auth and source.url.lower().startswith("http://") and not is_loopback(host):
                raise ValueError(
                    f"{source}: credentials go to https:// URLs only (or http:// on this machine's loopback), not "
                    "in clear over the network"
                )
            self.authorization()

    @property
    def auth(self) -> str | None:
        """``"bearer"``, ``"basic"`` or None."""
        return "bearer" if self.token_env else "basic" if self.user else None

    def authorization(self) -> str | None:
        """The ``Authorization`` header of every DICOMweb request, from the environment variable the options
        name (None without authentication); a ValueError naming the variable (never its value) when it is
        unset or empty."""
        if self.token_env:
            return "Bearer " + secret_from_env("--pull-token-env", self.token_env, self.environ)
        if self.password_env:
            secret = secret_from_env("--pull-password-env", self.password_env, self.environ)
            return "Basic " + base64.b64encode(f"{self.user}:{secret}".encode()).decode("ascii")
        return None

    @property
    def calling_aet(self) -> str:
        return self.ae_title or DEFAULT_AE_TITLE

    @property
    def how(self) -> str:
        """``move`` or ``get``."""
        return self.retrieve or RETRIEVES[0]

    @property
    def port(self) -> int:
        """The port dens's storage SCP listens on for C-MOVE."""
        return DEFAULT_MOVE_PORT if self.move_port is None else self.move_port
