"""What dens-serve is asked to do: :class:`ServeConfig`, and the peers it names (:class:`Destination`,
:class:`Allowed`), parsed from their command-line spellings.

Standard library only: dens-serve's command-line module imports this, and a spawned decode worker imports that
module before it starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# Exit status of dens-serve: 0 stopped cleanly (SIGTERM, Ctrl-C); 1 could not start; 2 bad options.
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_AET = "DENS"
DEFAULT_PORT = 11112  # the registered DICOM port above 1024 (104 needs root)
DEFAULT_STABLE_SECONDS = 60.0  # as Orthanc's StableAge: a study quiet this long is complete
DEFAULT_RETRY_SECONDS = 5.0  # the first retry of a failed send; each next one waits twice as long
MAX_RETRY_SECONDS = 600.0
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5: 16 characters of the default set, no backslash


def check_ae_title(title: str) -> str:
    """``title`` when it is a valid AE title (1-16 printable characters, no backslash, not all spaces)."""
    if not _AE_TITLE.match(title) or not title.strip():
        raise ValueError(f"{title!r} is not an AE title (1-16 printable characters, no backslash)")
    return title


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


@dataclass(frozen=True)
class ServeConfig:
    """What ``dens-serve`` was asked to do. ``None`` means the default for the provider in use."""

    state: Path  # the node's folder: spool, database, preds.csv, SRs
    model: Path | None = None  # default: runs/latest/model.onnx
    aet: str = DEFAULT_AET
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    allow: tuple[Allowed, ...] = ()
    allow_any: bool = False  # accept any calling AE title (the allow-list is the default)
    stable_seconds: float = DEFAULT_STABLE_SECONDS
    send_to: tuple[Destination, ...] = ()
    stow_urls: tuple[str, ...] = ()
    retry_seconds: float = DEFAULT_RETRY_SECONDS
    status_port: int | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None  # with it, callers must present a certificate it signed
    device: str = "auto"
    batch_size: int | None = None
    workers: int | None = None
    threads: int | None = None
    flag: str | None = None

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
        check_ae_title(self.aet)
        for url in self.stow_urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(
                    f"--stow-url {url!r}: an http:// or https:// URL (such as http://pacs/dicom-web/studies)"
                )

    @property
    def destinations(self) -> tuple[str, ...]:
        """Every destination as the outbox names it: ``dicom:AET@HOST:PORT`` or ``stow:URL``."""
        return (*(f"dicom:{d}" for d in self.send_to), *(f"stow:{u}" for u in self.stow_urls))
