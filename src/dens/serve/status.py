"""The node's status as JSON: on a small HTTP endpoint while it runs (``--status-port``: ``GET /status``,
``GET /status?studies=N``, and ``GET /health`` for a probe), and from its state folder at any time
(``dens-serve STATE --status``). The same endpoint serves ``GET /metrics``, the node's Prometheus metrics
(:mod:`dens.serve.metrics`), to token holders only.

What it shows (:func:`snapshot`, read from the state's database): instances received and their rows (ok,
skipped, error), the queue (studies waiting for their quiet time or their scoring, instances not yet scored),
studies answered, the last one (its call and SR), errors (studies that failed, and error rows), the outbox
(pending, sent, the entries being retried and why), refusals counted by reason, and the last studies, each with
its images' outcome, its call and where its SR went.

Who sees what (:func:`view`): with a token (``--status-token-env``), every request must carry
``Authorization: Bearer TOKEN``; others get 401 and nothing else, whatever they ask for, and a token holder sees
everything (``"view": "full"``: the drift windows and the scheduled pull too, and ``/metrics``). Without a
token, a client on this machine (a loopback peer) sees the studies but not the node's configuration (its
allow-list, state folder, destinations and audit log: ``"local"``), nor drift, pull or metrics, and a client
from elsewhere sees counts only
(``"counts"``: no UID, call, AE title, address or message). No view, nor
``dens-serve STATE --status`` (which shows all the folder holds, to whoever can read it), shows a URL's
userinfo (:func:`dens.serve.config.redact`).

Against a web page on this machine (DNS rebinding), a request whose Host header names another host than the
one the endpoint listens on (its ``--host``, localhost, 127.0.0.1 or [::1], and its port) gets 421. Against
connections that are opened and never finish their request, each has :data:`REQUEST_SECONDS` to send its
request, however it trickles it, and at most :data:`MAX_CONNECTIONS` are open at once (:data:`MAX_PER_PEER`
from one address); a connection beyond either gets 503 at once, without a thread.
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

from dens import labels
from dens.serve.config import redact
from dens.serve.state import ANSWERED, FAILED, PENDING, RECEIVING, ROW_STATUS, SENT, State

log = logging.getLogger(__name__)

DEFAULT_STUDIES, MAX_STUDIES = 20, 1000  # the last studies listed, by default and at most
RECENT = 10  # errors, refusals and failed sends listed
REQUEST_SECONDS = 10  # for a client to send its whole request (a GET: its line and headers), however slowly
MAX_CONNECTIONS, MAX_PER_PEER = 64, 8  # status connections open at once, in all and from one address
FULL, LOCAL, COUNTS = "full", "local", "counts"  # what a client sees (:func:`view`)
_CONFIGURATION = ("allow", "state", "destinations", "audit_log")  # the node's words a token-less client does not see
_FULL_ONLY = ("drift", "pull")  # sections a token holder alone sees
OUTCOMES = ("ok", "skipped", "error")  # an instance's row status (preds.csv's `status`)
# A refusal's reason is `code: detail`; its code, as the status counts it.
_REASON_CODE = "CASE WHEN instr(reason, ':') > 0 THEN substr(reason, 1, instr(reason, ':') - 1) ELSE reason END"


def snapshot(state: State, node: dict | None = None, studies: int = DEFAULT_STUDIES) -> dict:
    """The status document: ``node`` (what the running node says about itself, when it runs), the state's
    counts and its last ``studies`` studies (``last_studies``); every URL's userinfo redacted."""
    return _redacted(
        {**({"node": node} if node else {}), **counts(state), "last_studies": last_studies(state, studies)}
    )


def view(doc: dict, level: str) -> dict:
    """What a client sees of the status document ``doc``: all of it (``FULL``: a token holder), all but the
    node's configuration (``LOCAL``: no token, a client on this machine), or its counts only (``COUNTS``: no
    token, a client from elsewhere)."""
    if level == FULL:
        return {"view": FULL, **doc}
    node = {k: v for k, v in doc.get("node", {}).items() if k not in _CONFIGURATION}
    if level == LOCAL:
        shown = {k: v for k, v in doc.items() if k not in _FULL_ONLY}
        return {"view": LOCAL, **shown, **({"node": node} if "node" in doc else {})}
    return {
        "view": COUNTS,
        **({"node": {k: node[k] for k in ("aet", "tls", "status_auth", "started") if k in node}} if node else {}),
        **{k: doc[k] for k in ("instances_received", "instances", "queue_depth", "studies", "studies_processed")},
        "errors": {k: doc["errors"][k] for k in ("count", "studies", "instances")},
        "outbox": {k: doc["outbox"][k] for k in (PENDING, SENT)},
        "refused": {k: doc["refused"][k] for k in ("count", "by_reason")},
    }


def _redacted(value):
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    return value


def counts(state: State) -> dict:
    """Instances, studies, errors, the outbox and refusals: counts and the most recent of each (JSON-ready)."""
    q = state.read
    studies = dict(q("SELECT state, COUNT(*) FROM studies GROUP BY state"))
    rows = dict(q(f"SELECT {ROW_STATUS}, COUNT(*) FROM instances GROUP BY 1"))
    last = q(
        "SELECT s.study_uid, s.answered, s.density, s.sr_uid, s.last_received, "
        "(SELECT COUNT(*) FROM instances i WHERE i.study_key = s.study_key) "
        "FROM studies s WHERE s.state = ? ORDER BY s.answered DESC LIMIT 1",
        [ANSWERED],
    )
    failed_studies = q("SELECT COUNT(*) FROM errors")[0][0]
    outbox = dict(q("SELECT state, COUNT(*) FROM outbox GROUP BY state"))
    return {
        "instances_received": sum(rows.values()),
        "instances": {outcome: rows.get(outcome, 0) for outcome in OUTCOMES},
        "queue_depth": {"studies": studies.get(RECEIVING, 0), "instances": rows.get(None, 0)},
        "studies": {s: studies.get(s, 0) for s in (RECEIVING, ANSWERED, FAILED)},
        "studies_processed": studies.get(ANSWERED, 0),
        "last_study": None
        if not last
        else {
            "study_uid": last[0][0],
            "answered": _iso(last[0][1]),
            "density": last[0][2] or None,
            "sr_uid": last[0][3],
            "last_instance": _iso(last[0][4]),
            "instances": last[0][5],
        },
        "errors": {
            "count": failed_studies + rows.get("error", 0),
            "studies": failed_studies,  # a study that could not be scored or reported (each time it failed)
            "instances": rows.get("error", 0),  # an instance with an error row in preds.csv
            "recent": [
                {"time": _iso(t), "study_uid": u, "message": m}
                for t, u, m in q("SELECT time, study_uid, message FROM errors ORDER BY id DESC LIMIT ?", [RECENT])
            ],
            "recent_instances": [
                {"received": _iso(t), "study_uid": u, "sop_uid": s, "reason": r}
                for t, u, s, r in q(
                    f"SELECT i.received, s.study_uid, i.sop_uid, json_extract(i.row, '$.{labels.REASON}') "
                    f"FROM instances i JOIN studies s ON s.study_key = i.study_key WHERE {ROW_STATUS} = 'error' "
                    "ORDER BY i.received DESC LIMIT ?",
                    [RECENT],
                )
            ],
        },
        "outbox": {
            PENDING: outbox.get(PENDING, 0),
            SENT: outbox.get(SENT, 0),
            "retrying": [
                {"destination": d, "sr_uid": u, "attempts": a, "last_error": e, "next_try": _iso(n)}
                for d, u, a, e, n in q(
                    "SELECT destination, sr_uid, attempts, last_error, next_try FROM outbox "
                    "WHERE state = ? AND attempts > 0 ORDER BY next_try LIMIT ?",
                    [PENDING, RECENT],
                )
            ],
        },
        "refused": {
            "count": q("SELECT COUNT(*) FROM refused")[0][0],
            "by_reason": dict(q(f"SELECT {_REASON_CODE} AS code, COUNT(*) FROM refused GROUP BY code ORDER BY code")),
            "recent": [
                {"time": _iso(t), "calling_aet": a, "address": h, "sop_uid": s, "reason": r}
                for t, a, h, s, r in q(
                    "SELECT time, calling_aet, address, sop_uid, reason FROM refused ORDER BY id DESC LIMIT ?",
                    [RECENT],
                )
            ],
        },
    }


def last_studies(state: State, n: int = DEFAULT_STUDIES) -> list[dict]:
    """The ``n`` studies received or answered last, latest first: when their instances came and when they were
    answered, their images' outcome (``unscored``: not yet scored), the exam's call, their SR and each send of
    it (``sends``: destination, ``sent`` or ``pending``, attempts, last error), or why they failed."""
    found = state.read(
        "SELECT study_key, study_uid, state, first_received, last_received, answered, density, sr_uid, error "
        "FROM studies ORDER BY MAX(last_received, COALESCE(answered, 0)) DESC, rowid DESC LIMIT ?",
        [n],
    )
    keys = [row[0] for row in found]
    marks = ", ".join("?" * len(keys))
    images: dict[str, dict[str, int]] = {k: dict.fromkeys((*OUTCOMES, "unscored"), 0) for k in keys}
    for k, outcome, count in state.read(
        f"SELECT study_key, {ROW_STATUS}, COUNT(*) FROM instances WHERE study_key IN ({marks}) GROUP BY 1, 2", keys
    ):
        images[k][outcome if outcome in OUTCOMES else "unscored"] += count
    sends: dict[tuple[str, str], list[dict]] = {}
    for k, sr_uid, destination, sent_state, attempts, sent, error in state.read(
        "SELECT study_key, sr_uid, destination, state, attempts, sent, last_error FROM outbox "
        f"WHERE study_key IN ({marks}) ORDER BY id",
        keys,
    ):
        sends.setdefault((k, sr_uid), []).append(
            {
                "destination": destination,
                "state": sent_state,
                "attempts": attempts,
                "sent": _iso(sent),
                "last_error": error,
            }
        )
    return [
        {
            "study_uid": uid,
            "state": study_state,
            "first_received": _iso(first),
            "last_received": _iso(last),
            "answered": _iso(answered),
            "images": images[k],
            "density": density or None,  # the exam's call; None when it has none (or is not answered yet)
            "sr_uid": sr_uid,
            "sends": sends.get((k, sr_uid), []),  # of its SR as answered last
            "error": error,
        }
        for k, uid, study_state, first, last, answered, density, sr_uid, error in found
    ]


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
                if level == FULL and drift is not None:
                    doc["drift"] = _redacted(drift())
                if level == FULL and pull is not None:
                    doc["pull"] = _redacted(pull())
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


def _iso(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
