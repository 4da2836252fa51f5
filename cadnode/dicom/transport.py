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
  ``max_per_peer`` associations, so that one host cannot take every slot.

Whatever is refused is reported through ``on_refused`` (the listener records it as an event).
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

log = logging.getLogger(__name__)

#: Limit for every PDU but P-DATA-TF (an A-ASSOCIATE-RQ of a few hundred presentation contexts
#: is tens of KiB; release and abort PDUs are 10 bytes).
MAX_CONTROL_PDU = 256 * 1024
P_DATA_TF = 0x04
_HEADER = 6  # PDU type, reserved, 4-byte length

Report = Callable[[str], Any]


@dataclass(frozen=True)
class Guard:
    """The limits the transport enforces, and where it reports what it refused."""

    max_pdu: int  # the P-DATA-TF variable-field length the node announces
    timeout: float  # seconds: every socket read, and the TLS handshake
    max_per_peer: int  # concurrent associations from one peer address
    report: Report
    tls: ssl.SSLContext | None = None


class PDUTooLong(OSError):
    """A PDU's length field is beyond the limit for its type."""


class BoundedAssociationSocket(AssociationSocket):
    """An acceptor socket that checks each PDU's length field before the body is read.

    pynetdicom's DUL reads a PDU as ``recv(6)`` (the header) then ``recv(length)``; this class
    follows that alternation, so it knows which read is a body and how long the header said it
    is. A body over the limit is never read: the read returns nothing, which pynetdicom treats
    as a closed connection (Evt17), and the socket is closed. A read that times out ends the
    same way.
    """

    _guard: Guard
    _peer: str
    _body: int | None = None  # length of the PDU body the next read must be, if any
    _refused: bool = False

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
        if self._body is None and nr_bytes == _HEADER:
            data = self._read(nr_bytes)
            if len(data) == _HEADER:
                pdu_type, _, length = struct.unpack(">BBL", bytes(data))
                limit = self._guard.max_pdu if pdu_type == P_DATA_TF else MAX_CONTROL_PDU
                if length > limit:
                    self._refuse(f"PDU type 0x{pdu_type:02X} of {length} bytes exceeds the "
                                 f"limit of {limit}")
                    return data  # the caller now reads the body: it gets nothing (Evt17)
                self._body = length
            return data
        self._body = None
        if self._refused:
            return bytearray()
        return self._read(nr_bytes)

    def _read(self, nr_bytes: int) -> bytearray:
        try:
            return super().recv(nr_bytes)
        except TimeoutError:
            self._refuse(f"no data for {self._guard.timeout:g} s (network timeout)")
            return bytearray()
        except OSError:
            return bytearray()  # reset by the peer: pynetdicom sees a closed connection

    def _refuse(self, why: str) -> None:
        self._refused = True
        self._body = None
        self._guard.report(f"connection from {self._peer} closed: {why}")
        try:
            if self.socket is not None:
                self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class GuardedRequestHandler(RequestHandler):
    """Per connection, in its own thread: read timeout, TLS handshake, bounded socket."""

    server: GuardedServer

    def handle(self) -> None:
        guard = self.server.guard
        peer = f"{self.client_address[0]}:{self.client_address[1]}"
        raw: socket.socket = self.request  # type: ignore[assignment]
        raw.settimeout(guard.timeout)
        if guard.tls is not None:
            try:
                self.request = guard.tls.wrap_socket(raw, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                reason = getattr(exc, "reason", None) or type(exc).__name__
                guard.report(f"TLS handshake from {peer} failed: {reason}")
                self.server.shutdown_request(raw)
                return
        super().handle()

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        peer = f"{self.client_address[0]}:{self.client_address[1]}"
        assert assoc.dul.socket is not None
        BoundedAssociationSocket.adopt(assoc.dul.socket, self.server.guard, peer)
        return assoc


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the TLS handshake moved off the accept loop and a
    per-peer connection cap."""

    guard: Guard

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        return self.socket.accept()  # the handshake happens in GuardedRequestHandler

    def verify_request(self, request: Any, client_address: Any) -> bool:
        peer = str(client_address[0])
        held = sum(1 for a in self.active_associations
                   if a.requestor.address == peer and a.is_alive())
        if held >= self.guard.max_per_peer:
            self.guard.report(f"connection from {peer}:{client_address[1]} refused: it already "
                              f"holds {held} associations (limit {self.guard.max_per_peer} "
                              "per peer)")
            return False
        return True


def start_server(ae: AE, address: tuple[str, int], guard: Guard,
                 handlers: list[Any]) -> GuardedServer:
    """Serve ``ae`` on ``address`` in a background thread, as ``AE.start_server`` does, with
    the guarded server and handler."""
    server = ae.make_server(address, evt_handlers=handlers, server_class=GuardedServer,
                            request_handler=GuardedRequestHandler)
    assert isinstance(server, GuardedServer)
    server.guard = guard
    stamp = datetime.now().strftime("%Y%m%d%H%M%S")
    thread = threading.Thread(target=server.serve_forever, name=f"AcceptorServer@{stamp}",
                              daemon=True)
    thread.start()
    ae._servers.append(server)  # AssociationServer.shutdown() removes itself from this list
    return server
