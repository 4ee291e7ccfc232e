"""Orthanc, the Debian package, as the PACS the tests talk to: started on loopback ports with a temporary
configuration and storage (its DICOMweb plugin loaded where installed), its REST API, and the polling the
tests wait with. Shared by dens-serve's tests (Orthanc sends to the node and receives its SRs) and the pull's
(dens-infer queries and retrieves from it). Standard library and pytest only.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
WAIT = 90.0  # seconds any one wait may take on a loaded 2-core machine before the test fails


def need(program: str) -> str:
    found = shutil.which(program)
    if not found:
        pytest.skip(
            f"{program} is not installed (Debian packages dcmtk, dicom3tools, orthanc; `make test` installs them)"
        )
    return found


def need_dicomweb() -> None:
    """Skip, naming the package, where Orthanc's DICOMweb plugin is not installed."""
    if not DICOMWEB_PLUGIN.is_file():
        pytest.skip(f"Orthanc's DICOMweb plugin ({DICOMWEB_PLUGIN}, Debian package orthanc-dicomweb) is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check: Callable[[], object], timeout: float = WAIT, every: float = 0.2):
    """Poll ``check`` until it returns something true; that value (fails the test after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def rest(url: str, body: object = None, auth: tuple[str, str] | None = None):
    """GET ``url`` (POST ``body``: bytes as they are, anything else as JSON) from Orthanc's REST API, as
    ``auth`` (user, password) where it asks for one; the answer's JSON, else its bytes."""
    data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data)
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    with urllib.request.urlopen(request, timeout=60) as response:
        raw = response.read()
    try:
        return json.loads(raw)
    except ValueError:
        return raw


@contextlib.contextmanager
def orthanc(
    root: Path,
    http_port: int,
    dicom_port: int,
    modalities: dict[str, list] | None = None,
    users: dict[str, str] | None = None,
) -> Iterator[str]:
    """Orthanc with a temporary configuration in ``root``: its own storage, loopback only, AE title ORTHANC,
    the DICOMweb plugin where installed, ``modalities`` (its DicomModalities: name -> [AET, host, port]) and,
    with ``users``, HTTP basic authentication (RegisteredUsers). Yields its REST base URL; skips, naming the
    package, where Orthanc is not installed."""
    if not Path(ORTHANC).is_file():
        pytest.skip(f"Orthanc ({ORTHANC}, Debian package orthanc) is not installed; `make test` installs it")
    config = {
        "Name": "dens-test",
        "StorageDirectory": str(root / "db"),
        "IndexDirectory": str(root / "db"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": bool(users),
        "DicomModalities": modalities or {},
        "Plugins": [str(DICOMWEB_PLUGIN)] if DICOMWEB_PLUGIN.is_file() else [],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    if users:
        config["RegisteredUsers"] = users
    (root / "orthanc.json").write_text(json.dumps(config))
    with open(root / "orthanc.log", "w") as log:
        proc = subprocess.Popen([ORTHANC, str(root / "orthanc.json")], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{http_port}"
    auth = next(iter(users.items())) if users else None

    def up() -> bool:
        try:
            return bool(rest(url + "/system", auth=auth))
        except OSError:
            return proc.poll() is not None and pytest.fail(f"Orthanc exited: {(root / 'orthanc.log').read_text()}")

    try:
        wait_for("Orthanc to answer", up)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextlib.contextmanager
def orthanc_holding(root: Path, ports: dict[str, int], files: Iterable[Path]) -> Iterator[str]:
    """:func:`orthanc` on ``ports`` (``http``, ``dicom``), holding ``files`` (uploaded by its REST API), with
    dens (AE title DENS, on ``ports["move"]``) among its modalities, as C-MOVE's destination. Yields its URL."""
    dens = {"dens": ["DENS", "127.0.0.1", ports["move"]]}
    with orthanc(root, ports["http"], ports["dicom"], dens) as url:
        for path in files:
            rest(f"{url}/instances", path.read_bytes())
        yield url


def pacs_ports() -> dict[str, int]:
    """Free loopback ports for :func:`orthanc_holding`: its HTTP and DICOM ports, and dens's move port."""
    return {"http": free_port(), "dicom": free_port(), "move": free_port()}
