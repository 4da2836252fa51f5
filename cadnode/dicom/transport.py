"""The listener's transport, hardened: bounded PDU reads, read timeouts, TLS off the accept loop,
a cap on concurrent associations per peer.

pynetdicom, as an acceptor, reads each PDU by its length field (``dul.py``: ``recv(pdu_length)``),
so one peer can make it buffer gigabytes or block a reader forever; it also runs the TLS handshake
in the accept loop (``AssociationServer.get_request``) on a blocking socket, so one silent client
stalls every other. Rather than patching pynetdicom, the node builds its server from pynetdicom's
documented extension points (``AE.make_server(server_class=..., request_handler=...)``) with:

- :class:`BoundedAssociationSocket`: reads each PDU header itself and refuses, before reading it,
  a PDU longer than its limit (P-DATA-TF: the maximum PDU the node announced; anything else:
  :data:`MAX_CONTROL_PDU`); every read has the network timeout, so a peer that stops half-way is
  dropped when it expires instead of holding its association slot;
- :class:`GuardedRequestHandler`: the TLS handshake in the connection's own thread, with the
  network timeout, every failed handshake reported with the peer address;
- :class:`GuardedServer`: refuses a connection from a peer address that already holds
  ``max_per_peer`` connections (TLS handshakes included), so that one host cannot take every
  slot; such refusals are reported at most once a minute per peer.

Whatever is refused is reported through ``on_refused`` (the listener records it as an event).
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from cadnode.dicom.receiving import ReceivingFile, receiving, write_middle_fragments

log = logging.getLogger(__name__)

#: Limit for every PDU but P-DATA-TF (an A-ASSOCIATE-RQ of a few hundred presentation contexts
#: is tens of KiB; release and abort PDUs are 10 bytes).
MAX_CONTROL_PDU = 256 * 1024
P_DATA_TF = 0x04
_HEADER = 6  # PDU type, reserved, 4-byte length
#: Seconds the streaming path may keep pynetdicom's reactor waiting before it hands it one PDU.
_STREAM_SLICE = 0.5

Report = Callable[[str], Any]


@dataclass(frozen=True)
class Guard:
    """The limits the transport enforces, and where it reports what it refused."""

    max_pdu: int  # the P-DATA-TF variable-field length the node announces
    timeout: float  # seconds: a whole PDU once its header has come, and the TLS handshake
    max_per_peer: int  # concurrent associations from one peer address
    report: Report
    tls: ssl.SSLContext | None = None


_PDU_TYPES = frozenset(range(0x01, 0x08))  # A-ASSOCIATE-RQ ... A-ABORT


class BoundedAssociationSocket(AssociationSocket):
    """An acceptor socket that checks each PDU's header before its body is read.

    pynetdicom's DUL reads a PDU as ``recv(6)`` (the header) then ``recv(length)``; this class
    follows that alternation, so it knows which read is a body and how long the header said it
    is, and fails closed whenever a read does not fit it. Refused, before any body byte is read:
    a PDU type pynetdicom does not know (it would not read that body, and the alternation would
    slip), a length over the limit for the type. A PDU must also arrive whole within one
    timeout (a deadline for the PDU, not for each read, so a sender trickling a byte at a time
    cannot hold its slot). A refused read returns nothing, which pynetdicom treats as a closed
    connection (Evt17), and the socket is shut down.

    While a C-STORE dataset is being received into a file, a P-DATA-TF PDU of nothing but its
    middle fragments is written to that file here, as it is read
    (:func:`~cadnode.dicom.receiving.write_middle_fragments`), and the next PDU read in its
    place; any other PDU goes to pynetdicom as it came. pynetdicom would only have copied and
    decoded those PDUs to hand the same bytes to the same file, and that, not the disk, was
    what bounded the node's receive rate (docs/performance.md).
    """

    _guard: Guard
    _peer: str
    _body: int | None = None  # length of the PDU body the next read must be, if any
    _deadline: float = 0.0  # monotonic time by which the current PDU must be complete
    _refused: bool = False
    _pending: bytearray | None = None  # a PDU body read ahead, for pynetdicom's next read

    @classmethod
    def adopt(cls, sock: AssociationSocket, guard: Guard, peer: str) -> BoundedAssociationSocket:
        """Turn the socket pynetdicom made for an association into a bounded one, in place.

        In place because constructing a second wrapper would queue a second "transport
        connection" event (Evt5) for the same connection, which pynetdicom's state machine
        rejects."""
        sock.__class__ = cls
        bounded: BoundedAssociationSocket = sock  # type: ignore[assignment]
        bounded._guard, bounded._peer = guard, peer
        return bounded

    def recv(self, nr_bytes: int) -> bytearray:
        if self._refused:
            return bytearray()
        if self._body is None:
            if nr_bytes != _HEADER:
                return self._refuse(f"unexpected read of {nr_bytes} bytes outside a PDU")
            return self._next_header()
        expected, self._body = self._body, None
        if nr_bytes != expected:
            return self._refuse(f"read of {nr_bytes} bytes where the PDU body has {expected}")
        if self._pending is not None:
            body, self._pending = self._pending, None
            return body
        return self._read(nr_bytes)

    def _next_header(self) -> bytearray:
        """The header of the next PDU for pynetdicom, after writing any PDUs of dataset
        fragments that come first (for at most ``_STREAM_SLICE`` seconds, so that pynetdicom's
        reactor still gets its turn)."""
        slice_end = time.monotonic() + _STREAM_SLICE
        while True:
            self._deadline = time.monotonic() + self._guard.timeout
            data = self._read(_HEADER)
            if len(data) < _HEADER:
                return data  # closed (or timed out) before a whole header: Evt17
            pdu_type, _, length = struct.unpack(">BBL", bytes(data))
            if pdu_type not in _PDU_TYPES:
                return self._refuse(f"unknown PDU type 0x{pdu_type:02X}")
            limit = self._guard.max_pdu if pdu_type == P_DATA_TF else MAX_CONTROL_PDU
            if length > limit:
                return self._refuse(f"PDU type 0x{pdu_type:02X} of {length} bytes exceeds "
                                    f"the limit of {limit}")
            self._body = length
            target = self._streaming_target() if pdu_type == P_DATA_TF else None
            if target is None or time.monotonic() > slice_end:
                return data
            body = self._read(length)
            if len(body) < length:  # closed, timed out or refused half-way
                self._body = None
                return bytearray()
            if not write_middle_fragments(body, target):
                self._pending = body
                return data
            self._body = None
            self.assoc.dul._idle_timer.restart()  # pynetdicom's idle timeout: data did come

    def _streaming_target(self) -> ReceivingFile | None:
        """The file a dataset is being received into, when pynetdicom has nothing of this
        association still to process (its events are handled in order, so a PDU written here
        cannot overtake one it has yet to hand to the file)."""
        target = receiving(self.assoc)
        if target is None or not target.open or not self.assoc.dul.event_queue.empty():
            return None
        return target

    def _read(self, nr_bytes: int) -> bytearray:
        """Up to ``nr_bytes``, each ``recv`` with the time left before the PDU's deadline."""
        assert self.socket is not None
        data = bytearray(nr_bytes)
        view = memoryview(data)
        got = 0
        while got < nr_bytes:
            left = self._deadline - time.monotonic()
            late = f"a PDU not complete within {self._guard.timeout:g} s (network timeout)"
            if left <= 0:
                return self._refuse(late)
            try:
                self.socket.settimeout(left)  # whatever is left of the PDU's deadline
                n = self.socket.recv_into(view[got:], nr_bytes - got)
            except TimeoutError:
                return self._refuse(late)
            except OSError:
                return bytearray()  # reset by the peer: pynetdicom sees a closed connection
            if not n:
                del view
                return data[:got]  # closed by the peer
            got += n
        return data

    def _refuse(self, why: str) -> bytearray:
        self._refused = True
        self._body = None
        self._guard.report(f"connection from {self._peer} closed: {why}")
        try:
            if self.socket is not None:
                self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        return bytearray()


class GuardedRequestHandler(RequestHandler):
    """Per connection, in its own thread: read timeout, TLS handshake, bounded socket; the
    thread stays until the association ends, so that the server can count its peer's
    connections, handshakes included."""

    server: GuardedServer

    @property
    def peer(self) -> str:
        return f"{self.client_address[0]}:{self.client_address[1]}"

    def handle(self) -> None:
        try:
            self._serve()
        finally:
            self.server.release(str(self.client_address[0]))

    def _serve(self) -> None:
        guard = self.server.guard
        raw: socket.socket = self.request  # type: ignore[assignment]
        raw.settimeout(guard.timeout)
        if guard.tls is not None:
            try:
                self.request = guard.tls.wrap_socket(raw, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                reason = getattr(exc, "reason", None) or type(exc).__name__
                guard.report(f"TLS handshake from {self.peer} failed: {reason}")
                self.server.shutdown_request(raw)
                return
        # pynetdicom's RequestHandler.handle(), then wait for the association to end
        assoc = self._create_association()
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()
        assoc.join()

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        assert assoc.dul.socket is not None
        BoundedAssociationSocket.adopt(assoc.dul.socket, self.server.guard, self.peer)
        return assoc


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the TLS handshake moved off the accept loop and a
    per-peer connection cap (connections counted from accept to the association's end)."""

    # Connection threads live as long as their association: stopping the server must not wait
    # for them (an attacker's socket would hold the node's shutdown).
    daemon_threads = True
    block_on_close = False

    serving_thread: threading.Thread | None = None  # the accept loop, once started

    def __init__(self, *args: Any, guard: Guard, **kwargs: Any) -> None:
        self.guard = guard
        self._held: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._last_report: dict[str, tuple[float, int]] = {}  # peer -> (reported, refused since)
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        return self.socket.accept()  # the handshake happens in GuardedRequestHandler

    def verify_request(self, request: Any, client_address: Any) -> bool:
        peer = str(client_address[0])
        with self._lock:
            held = self._held[peer]
            if held < self.guard.max_per_peer:
                self._held[peer] += 1
                return True
            last, since = self._last_report.get(peer, (0.0, 0))
            now = time.monotonic()
            if now - last < REPORT_EVERY:  # a peer hammering the port: one event a minute
                self._last_report[peer] = (last, since + 1)
                return False
            self._last_report[peer] = (now, 0)
        more = f" ({since} more since the last report)" if since else ""
        self.guard.report(f"connection from {peer}:{client_address[1]} refused: it already "
                          f"holds {held} connections (limit {self.guard.max_per_peer} per "
                          f"peer){more}")
        return False

    def release(self, peer: str) -> None:
        with self._lock:
            self._held[peer] -= 1
            if self._held[peer] <= 0:
                del self._held[peer]


#: Seconds between two events about the same peer over its connection cap.
REPORT_EVERY = 60.0


def start_server(ae: AE, address: tuple[str, int], guard: Guard,
                 handlers: list[Any]) -> GuardedServer:
    """Serve ``ae`` on ``address`` in a background thread, as ``AE.start_server`` does, with
    the guarded server and handler."""
    server = ae.make_server(address, evt_handlers=handlers, server_class=GuardedServer,
                            request_handler=GuardedRequestHandler, guard=guard)
    assert isinstance(server, GuardedServer)
    stamp = datetime.now().strftime("%Y%m%d%H%M%S")
    thread = threading.Thread(target=server.serve_forever, name=f"AcceptorServer@{stamp}",
                              daemon=True)
    thread.start()
    server.serving_thread = thread
    ae._servers.append(server)  # AssociationServer.shutdown() removes itself from this list
    return server
