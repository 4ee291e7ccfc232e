"""The node's TCP connections: what a peer may cost it before, and while, it speaks DICOM.

pynetdicom's server runs the TLS handshake in its accept thread with no deadline (one silent socket stops every
caller), reads a PDU for as long as its bytes take to trickle in (a slot held for as long as the peer likes)
and reads whatever length a PDU's header announces into memory. :class:`Server` and its connections instead:

* run the TLS handshake on the connection's own thread, within the A-ASSOCIATE-RQ's deadline;
* want the whole A-ASSOCIATE-RQ within :data:`ASSOCIATE_SECONDS` of the connection (TLS included), and each
  later PDU whole within :data:`PDU_SECONDS` of its first byte, not merely a byte now and then;
* refuse a PDU longer than :data:`MAX_PDU_BYTES` from its header, before a byte of its body is read (the node
  announces 16 KiB; an A-ASSOCIATE-RQ takes a few);
* let one peer address hold at most ``max_peer_connections`` connections at once, so no peer takes every
  association slot, and the node :data:`MAX_CONNECTIONS` in all (each costs a thread until its deadline);
* collect garbage on a clock, not per connection: pynetdicom's accept loop runs a full collection every 60
  turns, which a flood of refused connections (1,500 a second from one reconnecting peer) turned into 25 a
  second, each holding every thread of the node; a real study took 3.4 times as long.

Each connection closed so is told to ``dropped(address, reason)``, its reason ``code: detail``:
``tls_failed``, ``idle``, ``slow``, ``pdu_too_large``, ``too_many_connections``, ``address_not_allowed``.
"""

from __future__ import annotations

import collections
import gc
import socket
import struct
import threading
import time
from collections.abc import Callable

from pynetdicom import evt
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

ASSOCIATE_SECONDS = 5.0  # from the connection to the whole A-ASSOCIATE-RQ, the TLS handshake included
PDU_SECONDS = 60.0  # from a later PDU's first byte to its last (pynetdicom's network timeout), and any send
MAX_PDU_BYTES = 1 << 20
MAX_CONNECTIONS = 64
GC_SECONDS = 30.0  # the accept loop's garbage collection: pynetdicom's pace on an idle node, whatever the load
_READ = 1 << 16


class GuardedSocket(AssociationSocket):
    """pynetdicom's association socket with the node's deadlines and PDU size limit. pynetdicom's DUL reads a
    PDU as ``recv(6)`` (type, reserved, length) then ``recv(length)``: the first is where the length is checked
    and each PDU's deadline starts."""

    def __init__(self, assoc, client_socket: socket.socket, deadline: float, dropped: Callable[[str], None]):
        super().__init__(assoc, client_socket=client_socket)
        self.deadline = deadline  # the A-ASSOCIATE-RQ's, then the PDU being read's
        self.associated = False  # a first PDU arrived whole
        self._body = False  # the next recv is a PDU's body
        self._dropped = dropped
        self._told = False

    def _drop(self, reason: str) -> None:
        if not self._told:
            self._told = True
            self._dropped(reason)

    @property
    def ready(self) -> bool:
        if not self.associated and time.monotonic() > self.deadline:
            if not self._told:  # closed as a connection that ends before its A-ASSOCIATE-RQ
                self._drop(f"idle: no A-ASSOCIATE-RQ within {ASSOCIATE_SECONDS:g} s of connecting")
                self.event_queue.put("Evt17")
            return False
        return super().ready

    def recv(self, nr_bytes: int) -> bytearray:
        if self._body:
            self._body = False
            data = self._read(nr_bytes)
            self.associated = self.associated or len(data) == nr_bytes
            return data
        if self.associated:
            self.deadline = time.monotonic() + PDU_SECONDS
        data = self._read(nr_bytes)
        if len(data) == 6:
            (length,) = struct.unpack(">L", data[2:])
            if length > MAX_PDU_BYTES:
                self._drop(f"pdu_too_large: a PDU of {length} bytes announced; the limit is {MAX_PDU_BYTES}")
                return bytearray()  # a short header: pynetdicom closes the connection, the body unread
            self._body = True
        return data

    def _read(self, nr_bytes: int) -> bytearray:
        """Up to ``nr_bytes``, fewer when the peer closes or the deadline passes (the connection is then closed)."""
        sock = self.socket
        data = bytearray()
        try:
            while len(data) < nr_bytes:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
                chunk = sock.recv(min(_READ, nr_bytes - len(data)))
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            if self.associated:
                self._drop(f"slow: a PDU did not arrive whole within {PDU_SECONDS:g} s of its first byte")
            else:
                self._drop(f"slow: the A-ASSOCIATE-RQ did not arrive whole within {ASSOCIATE_SECONDS:g} s")
        except OSError:
            pass  # the peer reset the connection: pynetdicom sees a short read and closes it
        finally:
            if self.socket is not None:
                self.socket.settimeout(PDU_SECONDS)  # a peer that stops reading cannot hold a send forever
        return data


class Handler(RequestHandler):
    """A connection, on its own thread: the TLS handshake, then the association (on its own threads)."""

    server: Server
    started = False  # the association's thread runs (and counts as the connection)

    def handle(self) -> None:
        deadline = time.monotonic() + ASSOCIATE_SECONDS
        address = self.client_address[0]
        if self.server.ssl_context is not None and not self._handshake(address):
            return
        assoc = self._create_association()
        # pynetdicom's handler gave the association a plain socket, which queued the transport-connected
        # event; the guarded socket that replaces it queues its own.
        assoc.dul.event_queue.get_nowait()
        assoc.dul.socket = None
        assoc.set_socket(GuardedSocket(assoc, self.request, deadline, lambda why: self.server.dropped(address, why)))
        # The association's wait for its A-ASSOCIATE-RQ (and its ARTIM timer) end just after the deadline.
        assoc.acse_timeout = max(deadline - time.monotonic(), 0) + 1
        if self.server.prepare is not None:
            self.server.prepare(assoc)
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        self.server.start_association(address, assoc)
        self.started = True

    def _handshake(self, address: str) -> bool:
        try:
            self.request.settimeout(ASSOCIATE_SECONDS)
            self.request = self.server.ssl_context.wrap_socket(
                self.request, server_side=True, do_handshake_on_connect=False
            )
            self.request.do_handshake()
            return True
        except TimeoutError:
            reason = f"tls_failed: no TLS handshake within {ASSOCIATE_SECONDS:g} s of connecting"
        except OSError as exc:  # ssl.SSLError among them: not TLS, a certificate refused, a reset
            reason = f"tls_failed: {getattr(exc, 'reason', None) or exc.strerror or exc}"
        self.server.dropped(address, reason)
        self.request.close()
        return False


class Server(ThreadedAssociationServer):
    """pynetdicom's threaded server with the node's limits on connections (see the module's docstring)."""

    addresses: frozenset[str] | None = None  # the only peer addresses served (None: any)
    max_peer_connections: int = 4
    dropped: Callable[[str, str], None] = staticmethod(lambda address, reason: None)
    prepare: Callable[[object], None] | None = None  # called with each association before it starts
    request_queue_size = 64  # the listen backlog: a burst of connections waits for accept, not for SYN retries

    def __init__(self, *args, **kwargs):
        super().__init__(*args, request_handler=Handler, **kwargs)
        self._handshaking: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._collected = time.monotonic()

    def service_actions(self) -> None:
        """Called at every turn of the accept loop (each connection, and every half second). pynetdicom's runs
        a full garbage collection every 60 turns, as its ended associations' threads are otherwise kept; here
        at most once every :data:`GC_SECONDS`, however fast connections come."""
        now = time.monotonic()
        if now - self._collected >= GC_SECONDS:
            self._collected = now
            gc.collect()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        return self.socket.accept()  # no TLS here: the connection's own thread does it (Handler)

    def verify_request(self, request, client_address) -> bool:
        address = client_address[0]
        if self.addresses is not None and address not in self.addresses:
            self.dropped(address, f"address_not_allowed: no allowed AE title names {address}")
            return False
        with self._lock:
            held, total = self._held(address)
            if held < self.max_peer_connections and total < MAX_CONNECTIONS:
                self._handshaking[address] += 1
                return True
        if held >= self.max_peer_connections:
            reason = f"too_many_connections: {address} already holds {held} (--max-peer-connections)"
        else:
            reason = f"too_many_connections: the node already holds {total}"
        self.dropped(address, reason)
        return False

    def _held(self, address: str) -> tuple[int, int]:
        """The connections ``address`` holds, and all peers together: handshaking or associations."""
        assocs = self.active_associations
        mine = sum(1 for a in assocs if a.requestor.address == address)
        return self._handshaking[address] + mine, sum(self._handshaking.values()) + len(assocs)

    def start_association(self, address: str, assoc) -> None:
        """Start ``assoc``'s thread, which counts as its connection from then on instead of its handshake (both
        at once, in :meth:`_held`'s sight, would refuse a peer's last allowed connection)."""
        with self._lock:
            self._done(address)
            assoc.start()

    def finish_request(self, request, client_address) -> None:
        handler = None
        try:
            handler = self.RequestHandlerClass(request, client_address, self)
        finally:
            if handler is None or not handler.started:  # no association: the connection is over
                with self._lock:
                    self._done(client_address[0])

    def _done(self, address: str) -> None:
        self._handshaking[address] -= 1
        if not self._handshaking[address]:
            del self._handshaking[address]
