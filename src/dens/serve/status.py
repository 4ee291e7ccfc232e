"""The node's status as JSON: on a small HTTP endpoint while it runs (``--status-port``: ``GET /status``,
and ``GET /health`` for a probe), and from its state folder at any time (``dens-serve STATE --status``).

What it shows (:meth:`dens.serve.state.State.status`): instances received, the queue (studies waiting for
their quiet time or their scoring, instances not yet scored), studies answered, the last one (its call and
SR), errors, the outbox (pending, sent, the entries being retried and why) and refused instances.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from dens.serve.state import State

log = logging.getLogger(__name__)


def snapshot(state: State, node: dict | None = None) -> dict:
    """The status document: ``node`` (what the running node says about itself, when it runs) and the state's
    counts."""
    return {**({"node": node} if node else {}), **state.status()}


def serve(state: State, host: str, port: int, node: Callable[[], dict]) -> ThreadingHTTPServer:
    """Start the status endpoint on ``host:port`` in a thread; the server (``.shutdown()`` stops it)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path in ("/", "/status"):
                self._reply(200, snapshot(state, node()))
            elif self.path == "/health":
                self._reply(200, {"ok": True})
            else:
                self._reply(404, {"error": f"no {self.path}: GET /status or /health"})

        def _reply(self, code: int, body: dict) -> None:
            data = json.dumps(body, indent=1).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args) -> None:
            log.debug("status: " + format, *args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="dens-serve-status", daemon=True).start()
    return server
