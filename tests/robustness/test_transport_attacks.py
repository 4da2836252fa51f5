"""Raw-socket attacks on the listener's transport (loopback only, bounded in count and time).

Each test starts the real listener with short timeouts, attacks it from 127.0.0.2 (so that the
per-peer cap applies to the attacker and not to the honest peer on 127.0.0.1), and asserts that
an honest C-ECHO (DCMTK echoscu, from 127.0.0.1) is answered while the attack runs, that the
attacking connections are closed within the stated timeout, that memory stays bounded and that
the refusal is recorded as an event.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from cadnode.dicom.listener import Listener, Policy, server_ssl_context
from cadnode.dicom.sender import send_files
from cadnode.jobs.db import Database, Event
from cadnode.jobs.queue import record_instance
from tests.helpers import require, wait_until

ATTACKER = "127.0.0.2"
TIMEOUT = 2.0  # the listener's network and ACSE timeouts in these tests


class Node:
    def __init__(self, tmp_path: Path, policy: Policy) -> None:
        self.db = Database(f"sqlite:///{tmp_path / 'jobs.db'}")
        self.db.create_schema()
        self.listener = Listener(
            tmp_path / "spool", on_stored=lambda st: record_instance(self.db, st),
            on_refused=lambda msg, uid: self.db.log("refused", msg, uid or None, "warning"),
            policy=policy,
        )
        self.port = self.listener.start("127.0.0.1", 0)

    def refusals(self) -> list[str]:
        with self.db.session() as s:
            return list(s.scalars(select(Event.message).where(Event.kind == "refused")).all())

    def refused(self, text: str, timeout: float = 10) -> bool:
        return wait_until(lambda: any(text in m for m in self.refusals()), timeout, 0.05)

    def close(self) -> None:
        self.listener.stop()
        self.db.dispose()


def policy(**overrides: object) -> Policy:
    base: dict[str, object] = {"network_timeout": TIMEOUT, "acse_timeout": TIMEOUT,
                               "max_associations": 16, "max_associations_per_peer": 8}
    return Policy(**{**base, **overrides})  # type: ignore[arg-type]


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    require("echoscu")
    n = Node(tmp_path, policy())
    yield n
    n.close()


def echo(port: int, *extra: str) -> tuple[bool, float]:
    """An honest C-ECHO from 127.0.0.1; (answered, seconds)."""
    start = time.monotonic()
    r = subprocess.run(["echoscu", *extra, "-to", "10", "-ta", "10", "-td", "10", "-aec",
                        "CADNODE", "127.0.0.1", str(port)], capture_output=True, timeout=60)
    return r.returncode == 0, time.monotonic() - start


def attacker(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((ATTACKER, 0))
    s.settimeout(TIMEOUT * 5)
    s.connect(("127.0.0.1", port))
    return s


def closed_by_peer(s: socket.socket, within: float) -> bool:
    """True when the node closes (or resets) the connection within ``within`` seconds."""
    s.settimeout(within)
    try:
        while True:
            data = s.recv(4096)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def flood_after(s: socket.socket, head: bytes) -> None:
    """Send ``head``, then up to 64 MiB of zeros; the node must close the connection."""
    try:
        s.sendall(head)
        try:
            for _ in range(64):  # stopped by the node long before
                s.sendall(b"\x00" * 2**20)
        except (ConnectionResetError, BrokenPipeError):
            pass
        assert closed_by_peer(s, TIMEOUT * 2)
    finally:
        s.close()


def associate_rq_start() -> bytes:
    """The first 30 bytes of a well-formed A-ASSOCIATE-RQ header (PDU type 1, length 200)."""
    body = struct.pack(">HH", 1, 0) + b"CADNODE".ljust(16) + b"ATTACKER".ljust(16)
    return (struct.pack(">BBL", 0x01, 0, 200) + body)[:30]


def test_half_open_associations_are_closed_and_do_not_starve_honest_peers(node: Node) -> None:
    held = [attacker(node.port) for _ in range(16)]
    try:
        for s in held:
            s.sendall(associate_rq_start())  # ... and then nothing
        ok, seconds = echo(node.port)
        assert ok and seconds < 5, seconds  # answered while the attack holds its sockets
        started = time.monotonic()
        assert all(closed_by_peer(s, TIMEOUT * 4) for s in held)
        assert time.monotonic() - started < TIMEOUT * 4
    finally:
        for s in held:
            s.close()
    assert node.refused(f"connection from {ATTACKER}")  # cap or timeout, recorded
    assert any("per peer" in m for m in node.refusals())  # 8 over the cap were refused at once
    assert echo(node.port)[0]


def test_unknown_pdu_type_is_closed(node: Node) -> None:
    socks = [attacker(node.port) for _ in range(8)]
    try:
        for s in socks:
            s.sendall(bytes([0x09, 0]) + struct.pack(">L", 4) + b"\x00" * 4)
        assert echo(node.port)[0]
        assert all(closed_by_peer(s, TIMEOUT * 4) for s in socks)
    finally:
        for s in socks:
            s.close()


@pytest.mark.parametrize("pdu_type", [0x01, 0x04])
def test_a_huge_length_field_is_refused_before_it_is_read(node: Node, pdu_type: int) -> None:
    """An A-ASSOCIATE-RQ or P-DATA-TF claiming ~4 GB: closed at its header, nothing buffered."""
    rss_before = _rss_kib()
    s = attacker(node.port)
    flood_after(s, struct.pack(">BBL", pdu_type, 0, 0xFFFFFFF0))
    assert node.refused("exceeds the limit")
    assert _rss_kib() - rss_before < 64 * 1024, "the PDU body was buffered"
    assert echo(node.port)[0]


def test_tls_handshake_does_not_block_the_accept_loop(tmp_path: Path, pki: Path) -> None:
    require("echoscu")
    ctx = server_ssl_context(str(pki / "server.crt"), str(pki / "server.key"), str(pki / "ca.crt"))
    node = Node(tmp_path, policy(ssl_context=ctx))
    tls = ("+tls", str(pki / "client.key"), str(pki / "client.crt"), "+cf", str(pki / "ca.crt"))
    silent = [attacker(node.port) for _ in range(3)]  # TCP connects that never say hello
    try:
        silent[0].sendall(b"\x16\x03\x01\x00\x40")  # half a ClientHello
        ok, seconds = echo(node.port, *tls)
        assert ok and seconds < 5, seconds
        assert all(closed_by_peer(s, TIMEOUT * 4) for s in silent)
        assert node.refused(f"TLS handshake from {ATTACKER}")
        # a client without a certificate is refused, logged and recorded with its address
        assert not echo(node.port, "+tla", "+cf", str(pki / "ca.crt"))[0]
        assert node.refused("TLS handshake from 127.0.0.1")
    finally:
        for s in silent:
            s.close()
        node.close()


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def test_a_symlinked_study_folder_is_refused_not_followed(node: Node, tmp_path: Path) -> None:
    from tests.robustness.corpus import synthetic_mg

    study = "1.2.826.0.1.3680043.10.1407.44"
    outside = tmp_path / "outside"
    outside.mkdir()
    (node.listener.spool_root / study).symlink_to(outside, target_is_directory=True)
    path = tmp_path / "lcc.dcm"
    synthetic_mg(study, f"{study}.1", "L", "CC").save_as(path, enforce_file_format=True)
    (result,) = send_files([path], "127.0.0.1", node.port, "CADNODE")
    assert result.status == 0xC000
    assert not list(outside.iterdir())  # nothing acknowledged, nothing written out of the spool
    assert node.refused("symbolic link")


def test_a_dataset_cut_off_by_an_abort_leaves_no_partial_file(node: Node) -> None:
    """Half of a C-STORE's P-DATA-TF fragments, then A-ABORT: the partial file goes at once."""
    from io import BytesIO

    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pynetdicom import AE
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE

    from cadnode.dicom.listener import MG_FOR_PRESENTATION
    from tests.robustness.corpus import synthetic_mg

    ds = synthetic_mg("1.2.826.0.1.3680043.10.1407.45", "1.2.826.0.1.3680043.10.1407.45.1",
                      "L", "CC", rows=1024, cols=1024)
    ae = AE(ae_title="ABORTER")
    ae.add_requested_context(MG_FOR_PRESENTATION, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="CADNODE")
    assert assoc.is_established
    req = C_STORE()
    req.MessageID, req.Priority = 1, 2
    req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = MG_FOR_PRESENTATION, ds.SOPInstanceUID
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False  # as the proposed syntax says
    write_dataset(buf, ds)
    req.DataSet = BytesIO(buf.getvalue())
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    fragments = list(msg.encode_msg(assoc.accepted_contexts[0].context_id, 16382))
    for fragment in fragments[: len(fragments) // 2]:
        assoc.dul.send_pdu(fragment)
    incoming = node.listener.incoming
    assert wait_until(lambda: any(incoming.iterdir()), 10, 0.02), "no transfer started"
    assoc.abort()
    assert wait_until(lambda: not any(incoming.iterdir()), 10, 0.05), list(incoming.iterdir())
    assert echo(node.port)[0]


def test_the_sweep_removes_only_files_nothing_writes_to(node: Node) -> None:
    import os

    incoming = node.listener.incoming
    stale, live = incoming / "tmpstale.dcm", incoming / "tmplive.dcm"
    stale.write_bytes(b"x")
    live.write_bytes(b"y")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    assert node.listener.sweep(older_than=60) == 1
    assert not stale.exists() and live.exists()


def test_a_sender_trickling_a_pdu_is_dropped_at_its_deadline(node: Node) -> None:
    """A header claiming 200000 bytes, then one byte every 0.3 s: each read is short of the
    timeout, the whole PDU is not."""
    s = attacker(node.port)
    started = time.monotonic()
    closed = False
    try:
        s.sendall(struct.pack(">BBL", 0x01, 0, 200_000))
        while time.monotonic() - started < TIMEOUT * 5 and not closed:
            try:
                s.sendall(b"\x00")
                s.settimeout(0.3)
                closed = s.recv(1) == b""
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
    finally:
        s.close()
    assert closed and time.monotonic() - started < TIMEOUT * 3
    assert node.refused("not complete within")


def test_an_unknown_pdu_cannot_smuggle_a_huge_one_past_the_check(node: Node) -> None:
    """An unknown PDU type whose body pynetdicom would not read, then a ~4 GB P-DATA-TF in
    the same burst: closed at the first header, nothing buffered."""
    rss_before = _rss_kib()
    s = attacker(node.port)
    flood_after(s, bytes([0x09, 0]) + struct.pack(">L", 4)
                + struct.pack(">BBL", 0x04, 0, 0xFFFFFFF0))
    assert node.refused("unknown PDU type 0x09")
    assert _rss_kib() - rss_before < 64 * 1024


def test_tls_handshakes_count_against_the_per_peer_cap(tmp_path: Path, pki: Path) -> None:
    ctx = server_ssl_context(str(pki / "server.crt"), str(pki / "server.key"), str(pki / "ca.crt"))
    node = Node(tmp_path, policy(ssl_context=ctx, max_associations_per_peer=4))
    silent = [attacker(node.port) for _ in range(10)]  # never finish a handshake
    try:
        refused = sum(closed_by_peer(s, 1.0) for s in silent[4:])
        assert refused == 6  # the 5th and later are closed at once, while 4 hang in handshake
        assert node.refused("limit 4 per peer")
        assert all(closed_by_peer(s, TIMEOUT * 4) for s in silent[:4])
    finally:
        for s in silent:
            s.close()
        node.close()
