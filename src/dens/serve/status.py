"""The node's status as JSON: what the status endpoint serves while the node runs
(:mod:`dens.serve.statusport`: ``GET /status``, ``GET /status?studies=N``, ``GET /health``, and ``GET /metrics``
for token holders), and what ``dens-serve STATE --status`` prints from its state folder at any time.

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
from elsewhere sees counts only (``"counts"``: no UID, call, AE title, address or message). No view, nor
``dens-serve STATE --status`` (which shows all the folder holds, to whoever can read it), shows a URL's
userinfo (:func:`dens.serve.config.redact`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from dens import labels
from dens.serve.config import redact
from dens.serve.state import ANSWERED, FAILED, PENDING, RECEIVING, ROW_STATUS, SENT, State

log = logging.getLogger(__name__)

DEFAULT_STUDIES, MAX_STUDIES = 20, 1000  # the last studies listed, by default and at most
RECENT = 10  # errors, refusals and failed sends listed
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


def add_full_sections(doc: dict, sections: Mapping[str, Callable[[], object] | None]) -> dict:
    """``doc`` with the sections a token holder alone sees (:data:`_FULL_ONLY`: the drift windows, the scheduled
    pull), each asked for now and redacted; a section whose source is None (not running) is left out."""
    for name, source in sections.items():
        if name in _FULL_ONLY and source is not None:
            doc[name] = _redacted(source())
    return doc


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


def _iso(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
