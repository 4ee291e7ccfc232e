"""The status endpoint (``--status-port``): ``GET /status`` and ``GET /status?studies=N`` (the node's status,
:mod:`dens.serve.status`, as much of it as the client may see), ``GET /health`` for a probe, and ``GET /metrics``
(:mod:`dens.serve.metrics`) for token holders.

With a token (``--status-token-env``), every request must carry ``Authorization: Bearer TOKEN``; others get 401
and nothing else. Against a web page on this machine (DNS rebinding), a request whose Host header names another
host than the one the endpoint listens on (its ``--host``, localhost, 127.0.0.1 or [::1], and its port) gets
421. Against connections that are opened and never finish their request, each has :data:`REQUEST_SECONDS` to
send its request, however it trickles it, and at most :data:`MAX_CONNECTIONS` are open at once
(:data:`MAX_PER_PEER` from one address); a connection beyond either gets 503 at once, without a thread.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import ipaddress
import json
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST

from dens.serve.state import State
from dens.serve.status import COUNTS, DEFAULT_STUDIES, FULL, LOCAL, MAX_STUDIES, add_full_sections, snapshot, view

log = logging.getLogger(__name__)

REQUEST_SECONDS = 10  # for a client to send its whole request (a GET: its line and headers), however slowly
MAX_CONNECTIONS, MAX_PER_PEER = 64, 8  # status connections open at once, in all and from one address


def studies_asked(query: str) -> int:
    """How many of the last studies a request's query string asks for (``studies=N``, 0 to MAX_STUDIES);
    ValueError says what is wrong."""
    asked = parse_qs(query).get("studies")
    if not asked:
        return DEFAULT_STUDIES
    if len(asked) > 1 or not asked[0].isdigit() or int(asked[0]) > MAX_STUDIES:
        raise ValueError(f"studies={'&'.join(asked)}: a number of studies from 0 to {MAX_STUDIES}")
    return int(asked[0])


def _authorised(header: str | None, expected: bytes) -> bool:
    """Whether ``header`` is ``Bearer TOKEN`` with the token whose sha256 is ``expected``. The digests are
    compared in constant time, so neither the token's characters nor its length show in the answer's time."""
    scheme, _, given = (header or "").partition(" ")
    matches = hmac.compare_digest(hashlib.sha256(given.strip().encode("utf-8", "surrogateescape")).digest(), expected)
    return matches and scheme.lower() == "bearer"


def host_allowed(header: str | None, listen: str, port: int) -> bool:
    """Whether a request's Host header names the endpoint listening on ``listen:port``: ``listen`` itself,
    localhost, 127.0.0.1 or [::1], with ``port`` (absent: 80); on a wildcard address (0.0.0.0, ::), also any
    IP address and this machine's name. A name a page's author controls (DNS rebinding) is none of these."""
    text = (header or "").strip().lower()
    if text.startswith("["):  # [IPv6]:PORT
        name, _, rest = text[1:].partition("]")
        if rest[:1] not in ("", ":"):
            return False
        given = rest[1:] if rest else "80"
    else:
        name, sep, given = text.partition(":")
        given = given if sep else "80"
    if not (given.isascii() and given.isdigit()) or int(given) != port:
        return False
    name, listen = name.rstrip("."), listen.strip("[]").lower()
    if not name:
        return False
    if name in ("localhost", "127.0.0.1", "::1", listen):
        return True
    if listen not in ("", "0.0.0.0", "::"):
        return False
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return name == socket.gethostname().lower()


def _loopback_peer(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


class _Deadline(io.RawIOBase):
    """A socket's reads, each given only what is left of ``seconds`` from the first: a client trickling its
    request a byte at a time is cut off as one that stalls is (TimeoutError, which the handler answers by
    closing the connection)."""

    def __init__(self, sock: socket.socket, seconds: float):
        self.sock, self.deadline = sock, time.monotonic() + seconds

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request took too long to arrive")
        self.sock.settimeout(left)
        return self.sock.recv_into(buffer)


class _Server(ThreadingHTTPServer):
    """The threaded HTTP server with a cap: a connection beyond :data:`MAX_CONNECTIONS` open, or
    :data:`MAX_PER_PEER` from its address, gets 503 from the accepting thread and is closed."""

    daemon_threads = True
    request_queue_size = MAX_CONNECTIONS  # a burst waits for accept() rather than being reset
    _BUSY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"

    def __init__(self, address: tuple[str, int], handler) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)
        self._count = threading.Lock()
        self._open: Counter[str] = Counter()
        self._busy_logged = 0.0

    def process_request(self, request, client_address) -> None:
        peer = client_address[0]
        with self._count:
            full = self._open.total() >= MAX_CONNECTIONS or self._open[peer] >= MAX_PER_PEER
            if not full:
                self._open[peer] += 1
        if not full:
            super().process_request(request, client_address)  # its thread releases the slot
            return
        try:
            request.settimeout(0.5)
            request.sendall(self._BUSY)
        except OSError:
            pass
        self.shutdown_request(request)
        if time.monotonic() - self._busy_logged > 60:  # one line a minute, however many are refused
            self._busy_logged = time.monotonic()
            log.warning(
                "dens-serve: status connection from %s refused: %d open (at most %d, %d from one address)",
                peer,
                self._open.total(),
                MAX_CONNECTIONS,
                MAX_PER_PEER,
            )

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._count:
                self._open[client_address[0]] -= 1
                if self._open[client_address[0]] <= 0:
                    del self._open[client_address[0]]


def serve(
    state: State,
    host: str,
    port: int,
    node: Callable[[], dict],
    token: str | None = None,
    *,
    metrics: Callable[[], bytes] | None = None,
    drift: Callable[[], dict] | None = None,
    pull: Callable[[], dict] | None = None,
) -> ThreadingHTTPServer:
    """Start the status endpoint on ``host:port`` in a thread; the server (``.shutdown()`` stops it). With
    ``token``, a request without ``Authorization: Bearer TOKEN`` gets 401; a Host header that names another
    host gets 421. A token holder also gets ``GET /metrics`` (``metrics``: the page) and the status' drift and
    scheduled pull sections (``drift``, ``pull``); without a token given to the node, /metrics answers 403."""
    expected = None if token is None else hashlib.sha256(token.encode()).digest()

    class Handler(BaseHTTPRequestHandler):
        timeout = REQUEST_SECONDS

        def setup(self) -> None:
            super().setup()
            self.rfile.close()  # the socket closes only once no file of it is open
            self.rfile = io.BufferedReader(_Deadline(self.connection, REQUEST_SECONDS))

        def do_GET(self) -> None:
            self.connection.settimeout(REQUEST_SECONDS)  # for the answer, whatever the request's deadline left
            if not host_allowed(self.headers.get("Host"), host, self.server.server_address[1]):
                log.warning(
                    "dens-serve: status request from %s refused: Host %r is not this endpoint",
                    self.client_address[0],
                    (self.headers.get("Host") or "")[:100],
                )
                self._reply(421, {"error": "the Host header names another host than this status endpoint"})
                return
            if expected is not None and not _authorised(self.headers.get("Authorization"), expected):
                self._refuse()
                return
            url = urlsplit(self.path)
            if url.path in ("/", "/status"):
                try:
                    studies = studies_asked(url.query)
                except ValueError as exc:
                    self._reply(400, {"error": str(exc)})
                    return
                level = FULL if expected is not None else LOCAL if _loopback_peer(self.client_address[0]) else COUNTS
                doc = snapshot(state, node(), studies)
                if level == FULL:
                    add_full_sections(doc, {"drift": drift, "pull": pull})
                self._reply(200, view(doc, level))
            elif url.path == "/health":
                self._reply(200, {"ok": True})
            elif url.path == "/metrics" and metrics is not None:
                if expected is None:  # as the full view: a token holder's only
                    self._reply(403, {"error": "/metrics needs a status token: start the node with --status-token-env"})
                else:
                    self._send(200, metrics(), CONTENT_TYPE_LATEST)
            else:
                self._reply(404, {"error": f"no {url.path}: GET /status, /status?studies=N, /health or /metrics"})

        def _refuse(self) -> None:
            given = "Authorization" in self.headers
            log.warning(
                "dens-serve: status request from %s refused: %s",
                self.client_address[0],
                "wrong token" if given else "no token",
            )
            challenge = 'Bearer realm="dens-serve"' + (', error="invalid_token"' if given else "")
            self._reply(401, {"error": "the status needs 'Authorization: Bearer TOKEN'"}, challenge)

        def _reply(self, code: int, body: dict, challenge: str | None = None) -> None:
            self._send(code, json.dumps(body, indent=1).encode(), "application/json", challenge)

        def _send(self, code: int, data: bytes, content_type: str, challenge: str | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            if challenge:
                self.send_header("WWW-Authenticate", challenge)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args) -> None:
            log.debug("status: " + format, *args)

    server = _Server((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="dens-serve-status", daemon=True).start()
    return server
