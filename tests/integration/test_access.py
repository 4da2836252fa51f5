"""Who may connect and how much they may send, against DCMTK's echoscu/storescu (and TLS)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pynetdicom import AE
from sqlalchemy import select

from cadnode.dicom.listener import Listener, Policy, server_ssl_context
from cadnode.jobs.db import Database, Event, Instance
from cadnode.jobs.queue import record_instance
from tests.helpers import require, small_file_system, wait_until

StartNode = Callable[[Policy], int]


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[tuple[StartNode, Database]]:
    require("storescu", "echoscu")
    db = Database(f"sqlite:///{tmp_path / 'jobs.db'}")
    db.create_schema()
    listeners: list[Listener] = []

    def start(policy: Policy) -> int:
        listener = Listener(
            tmp_path / "spool", on_stored=lambda st: record_instance(db, st),
            on_refused=lambda msg, uid: db.log("refused", msg, uid or None, "warning"),
            policy=policy,
        )
        listeners.append(listener)
        return listener.start("127.0.0.1", 0)

    start.listeners = listeners  # type: ignore[attr-defined]
    yield start, db
    for listener in listeners:
        listener.stop()
    db.dispose()


def dcmtk(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60)


def refusals(db: Database) -> list[str]:
    with db.session() as s:
        return list(s.scalars(select(Event.message).where(Event.kind == "refused")).all())


def refused(db: Database, text: str) -> list[str]:
    """The refusal events containing ``text``, once one is there. pynetdicom answers
    A-ASSOCIATE-RJ before it calls the handler that records a rejection, so the peer can return
    before the event is written: wait for the event, do not assume it."""
    wait_until(lambda: any(text in m for m in refusals(db)), 10, interval=0.05)
    return [m for m in refusals(db) if text in m]


def test_calling_ae_allow_list(start_node) -> None:  # type: ignore[no-untyped-def]
    start, db = start_node
    port = start(Policy(allowed_aes=("MODALITY",)))
    assert dcmtk("echoscu", "-aet", "INTRUDER", "-aec", "CADNODE", "127.0.0.1",
                 str(port)).returncode != 0
    (message,) = refused(db, "calling AE 'INTRUDER' is not allowed")
    assert message.startswith("association from 127.0.0.1:")
    assert refusals(db) == [message]
    assert dcmtk("echoscu", "-aet", "MODALITY", "-aec", "CADNODE", "127.0.0.1",
                 str(port)).returncode == 0


def test_called_ae_must_be_this_node(start_node) -> None:  # type: ignore[no-untyped-def]
    start, db = start_node
    port = start(Policy())
    assert dcmtk("echoscu", "-aec", "SOMEONE", "127.0.0.1", str(port)).returncode != 0
    assert refused(db, "called AE 'SOMEONE' is not this node")
    assert dcmtk("echoscu", "-aec", "CADNODE", "127.0.0.1", str(port)).returncode == 0


def test_excess_associations_are_rejected_not_hung(start_node) -> None:  # type: ignore[no-untyped-def]
    start, db = start_node
    port = start(Policy(max_associations=2))
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = 10
    held = [ae.associate("127.0.0.1", port, ae_title="CADNODE") for _ in range(2)]
    assert all(a.is_established for a in held)
    extra = ae.associate("127.0.0.1", port, ae_title="CADNODE")
    assert extra.is_rejected
    assert refused(db, "more than 2 associations")
    for a in held:
        a.release()
    # release() returns when the node has answered; its association threads end just after,
    # and count against the limit until then: wait for them to be gone, not for a time
    (listener,) = start.listeners
    assert wait_until(lambda: listener.associations == 0, 10, interval=0.02)
    again = ae.associate("127.0.0.1", port, ae_title="CADNODE")
    assert again.is_established
    again.release()


def test_maximum_pdu_is_negotiated(start_node, demo_study) -> None:  # type: ignore[no-untyped-def]
    start, db = start_node
    port = start(Policy(max_pdu=16384))
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1.2", "1.2.840.10008.1.2.5")
    assoc = ae.associate("127.0.0.1", port, ae_title="CADNODE")
    assert assoc.is_established
    assert assoc.acceptor.maximum_length == 16384  # what the node told the sender
    status = assoc.send_c_store(demo_study[0])  # 9.7 MB in 16 KiB PDUs still arrives whole
    assoc.release()
    assert status.Status == 0
    with db.session() as s:
        (path,) = s.scalars(select(Instance.path)).all()
    assert Path(path).stat().st_size >= demo_study[0].stat().st_size - 1024


def test_instance_over_the_size_limit_is_refused(start_node, demo_study) -> None:  # type: ignore[no-untyped-def]
    start, db = start_node
    port = start(Policy(max_instance_bytes=2**20))
    r = dcmtk("storescu", "-v", "-xr", "-aec", "CADNODE", "127.0.0.1", str(port),
              str(demo_study[0]))
    assert "Refused: OutOfResources" in r.stderr, r.stderr
    assert any("exceeds the limit" in m for m in refusals(db))
    with db.session() as s:
        assert s.scalars(select(Instance)).all() == []
    assert dcmtk("echoscu", "-aec", "CADNODE", "127.0.0.1", str(port)).returncode == 0


def test_low_disk_refuses_with_out_of_resources(start_node, demo_study, tmp_path) -> None:  # type: ignore[no-untyped-def]
    start, db = start_node
    port = start(Policy(min_free_bytes=2**62))  # more than any disk has
    r = dcmtk("storescu", "-v", "-xr", "-aec", "CADNODE", "127.0.0.1", str(port),
              str(demo_study[0]))
    assert "Refused: OutOfResources" in r.stderr, r.stderr
    assert any("below the threshold" in m for m in refusals(db))
    assert not list((tmp_path / "spool").glob("*/*.dcm"))


@pytest.fixture
def small_spool(tmp_path: Path) -> Iterator[Path]:
    """The spool on its own 4 MiB file system (a tmpfs; mounting needs root)."""
    with small_file_system(tmp_path / "spool", "4m") as spool:
        yield spool


def test_disk_full_mid_transfer_answers_out_of_resources(start_node, small_spool, demo_study,  # type: ignore[no-untyped-def]
                                                          tmp_path) -> None:
    """A dataset the spool cannot hold is answered 0xA700 and dropped; the association goes
    on, and the next (small) instance on it is stored."""
    from tests.helpers import write_small_study

    start, db = start_node
    port = start(Policy(min_free_bytes=2**20))
    small = write_small_study(tmp_path / "small", "1.2.826.0.1.3680043.10.1.77", 64, 32)[0]
    r = dcmtk("storescu", "-v", "-nh", "-xr", "-aec", "CADNODE", "127.0.0.1", str(port),
              str(demo_study[0]), str(small))  # 9.7 MB into 4 MiB, then 5 KB; no halt
    assert "Refused: OutOfResources" in r.stderr, r.stderr
    assert "Aborted" not in r.stderr and "Peer aborted" not in r.stderr, r.stderr
    assert r.stderr.count("Received Store Response (Success)") == 1, r.stderr
    assert any("No space left on device" in m for m in refusals(db)), refusals(db)
    with db.session() as s:
        (row,) = s.scalars(select(Instance)).all()
    assert row.sop_instance_uid.startswith("1.2.826.0.1.3680043.10.1.77.")
    partial = [p for p in (small_spool / ".incoming").rglob("*") if p.is_file()]
    assert not partial, "the dropped dataset's file stays"
    assert dcmtk("echoscu", "-aec", "CADNODE", "127.0.0.1", str(port)).returncode == 0


def test_mutual_tls_with_dcmtk(start_node, pki, demo_study) -> None:  # type: ignore[no-untyped-def]
    start, db = start_node
    ctx = server_ssl_context(str(pki / "server.crt"), str(pki / "server.key"), str(pki / "ca.crt"))
    port = start(Policy(ssl_context=ctx))
    tls = ("+tls", str(pki / "client.key"), str(pki / "client.crt"), "+cf", str(pki / "ca.crt"))
    r = dcmtk("storescu", *tls, "-xr", "-aec", "CADNODE", "127.0.0.1", str(port),
              str(demo_study[0]))
    assert r.returncode == 0, r.stderr
    with db.session() as s:
        assert len(s.scalars(select(Instance)).all()) == 1
    # Without a client certificate, and without TLS at all, nothing gets in.
    anonymous = dcmtk("echoscu", "+tla", "+cf", str(pki / "ca.crt"), "-aec", "CADNODE",
                      "127.0.0.1", str(port))
    assert anonymous.returncode != 0
    assert dcmtk("echoscu", "-aec", "CADNODE", "127.0.0.1", str(port)).returncode != 0
    assert dcmtk("echoscu", *tls, "-aec", "CADNODE", "127.0.0.1", str(port)).returncode == 0


def test_results_sent_over_mutual_tls_to_dcmtk_storescp(pki, demo_study, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The sending side: a `;tls` destination, DCMTK storescp requiring a client certificate."""
    from cadnode.config import parse_destinations
    from cadnode.demo import free_port, stop_process
    from cadnode.dicom.sender import DeliveryError, client_ssl_context, send_files

    require("storescp")
    out = tmp_path / "received"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        ["storescp", "+xa", "+tls", str(pki / "server.key"), str(pki / "server.crt"), "+cf",
         str(pki / "ca.crt"), "-aet", "PACS", "--output-directory", str(out), str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        (dest,) = parse_destinations(f"PACS@127.0.0.1:{port};tls")
        assert dest.tls and str(dest) == f"PACS@127.0.0.1:{port};tls"
        ctx = client_ssl_context(str(pki / "ca.crt"), str(pki / "client.crt"),
                                 str(pki / "client.key"))

        def sent() -> bool:
            try:
                return all(r.ok for r in send_files([demo_study[0]], "127.0.0.1", port, "PACS",
                                                    tls=ctx))
            except DeliveryError:  # storescp not listening yet
                return False

        assert wait_until(sent, 30, 0.2)
        assert len(list(out.iterdir())) == 1
        # without this node's certificate the PACS refuses, and the sender says why
        anonymous = client_ssl_context(str(pki / "ca.crt"))
        with pytest.raises(DeliveryError, match="TLS"):
            send_files([demo_study[0]], "127.0.0.1", port, "PACS", tls=anonymous, timeout=10)
        assert len(list(out.iterdir())) == 1
    finally:
        stop_process(proc)
