"""The node's status as JSON: on a small HTTP endpoint while it runs (``--status-port``: ``GET /status``,
``GET /status?studies=N``, and ``GET /health`` for a probe), and from its state folder at any time
(``dens-serve STATE --status``).

What it shows (:func:`snapshot`, read from the state's database): instances received and their rows (ok,
skipped, error), the queue (studies waiting for their quiet time or their scoring, instances not yet scored),
studies answered, the last one (its call and SR), errors (studies that failed, and error rows), the outbox
(pending, sent, the entries being retried and why), refusals counted by reason, and the last studies, each with
its images' outcome, its call and where its SR went.

With a token (``--status-token-env``), every request must carry ``Authorization: Bearer TOKEN``; others get 401
and nothing else, whatever they ask for.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from dens import labels
from dens.serve.state import ANSWERED, FAILED, PENDING, RECEIVING, ROW_STATUS, SENT, State

log = logging.getLogger(__name__)

DEFAULT_STUDIES, MAX_STUDIES = 20, 1000  # the last studies listed, by default and at most
RECENT = 10  # errors, refusals and failed sends listed
OUTCOMES = ("ok", "skipped", "error")  # an instance's row status (preds.csv's `status`)
# A refusal's reason is `code: detail`; its code, as the status counts it.
_REASON_CODE = "CASE WHEN instr(reason, ':') > 0 THEN substr(reason, 1, instr(reason, ':') - 1) ELSE reason END"


def snapshot(state: State, node: dict | None = None, studies: int = DEFAULT_STUDIES) -> dict:
    """The status document: ``node`` (what the running node says about itself, when it runs), the state's
    counts and its last ``studies`` studies (``last_studies``)."""
    return {**({"node": node} if node else {}), **counts(state), "last_studies": last_studies(state, studies)}


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


def serve(
    state: State, host: str, port: int, node: Callable[[], dict], token: str | None = None
) -> ThreadingHTTPServer:
    """Start the status endpoint on ``host:port`` in a thread; the server (``.shutdown()`` stops it). With
    ``token``, a request without ``Authorization: Bearer TOKEN`` gets 401."""
    expected = None if token is None else hashlib.sha256(token.encode()).digest()

    class Handler(BaseHTTPRequestHandler):
        timeout = 30  # seconds a client may stall mid-request before its connection is closed

        def do_GET(self) -> None:
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
                self._reply(200, snapshot(state, node(), studies))
            elif url.path == "/health":
                self._reply(200, {"ok": True})
            else:
                self._reply(404, {"error": f"no {url.path}: GET /status, /status?studies=N or /health"})

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
            data = json.dumps(body, indent=1).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if challenge:
                self.send_header("WWW-Authenticate", challenge)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args) -> None:
            log.debug("status: " + format, *args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="dens-serve-status", daemon=True).start()
    return server


def _iso(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
