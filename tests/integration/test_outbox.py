"""Delivery survives outages: refused, rejected, failure status, timeout; then dead-letter + retry.

Every peer here is real: a pynetdicom storage SCP (the demo PACS) that is absent, addressed with
the wrong AE title, out of disk (it answers 0xA700), or a TCP server that accepts and never speaks.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from cadnode.demo import DemoPACS, free_port
from cadnode.dicom.listener import Policy
from cadnode.jobs import admin, queue
from cadnode.jobs.db import Database, Delivery, Event
from cadnode.jobs.outbox import deliver_due
from tests.helpers import wait_until

FAST = queue.RetryPolicy(max_attempts=3, base_seconds=0.01, cap_seconds=0.02)


@pytest.fixture
def outbox(db: Database, demo_study: list[Path]) -> Database:
    """A running job (id 1); `add_results` finishes it with files that await delivery."""
    from cadnode.dicom.spool import StoredInstance
    from cadnode.dicom.views import ViewInfo

    queue.record_instance(db, StoredInstance(
        path=demo_study[0], size=1, sop_instance_uid="1.2.3.1", sop_class_uid="1.2",
        transfer_syntax="1.2", study_uid="1.2.3", series_uid="1.2.3.4", patient_id="P",
        accession="", calling_ae="M", view=ViewInfo("L", "CC", True, "t")), now=0)
    queue.assemble_studies(db, 0, 0, now=1)
    job = queue.claim_next_job(db, "w", 60, now=1)
    assert job is not None and job.id == 1
    return db


def add_results(db: Database, files: list[Path], dest: str) -> None:
    """Finish job 1 with ``files`` as its results (source images stand in for SR/SC files)."""
    job = queue.ClaimedJob(1, 1, "1.2.3", 1, "w")  # claimed by the fixture as worker "w"
    queue.complete_job(db, job, {}, [], "v", [
        queue.ResultFile("cad_sr", str(f), f"9.{n}", (dest,)) for n, f in enumerate(files)])


def states(db: Database) -> list[tuple[str, int]]:
    with db.session() as s:
        return [(d.state, d.attempts) for d in s.scalars(select(Delivery).order_by(Delivery.id))]


def wait_due(db: Database) -> None:
    """Until a delivery's (short, FAST) backoff has run out, or none is pending."""
    def ready() -> bool:
        pending = any(state == "pending" for state, _ in states(db))
        return not pending or bool(queue.due_destinations(db))
    assert wait_until(ready, 5, interval=0.01)


def drain(db: Database, rounds: int) -> None:
    for _ in range(rounds):
        deliver_due(db, "CADNODE", FAST, timeout=2)
        wait_due(db)


@pytest.fixture
def silent_server() -> Iterator[int]:
    """Accepts TCP connections and never answers: an association that times out."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    conns: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except TimeoutError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join()
    for c in conns:
        c.close()
    srv.close()


def test_refused_then_up_delivers_each_once(outbox: Database, demo_study, tmp_path,  # type: ignore[no-untyped-def]
                                            caplog) -> None:
    port = free_port()
    add_results(outbox, demo_study[:2], f"PACS@127.0.0.1:{port}")
    caplog.set_level(logging.INFO, logger="cadnode.jobs.outbox")
    deliver_due(outbox, "CADNODE", queue.RetryPolicy(base_seconds=0.01, cap_seconds=0.02))
    assert states(outbox) == [("pending", 1), ("pending", 1)]
    pacs = DemoPACS(tmp_path / "pacs", ae_title="PACS")
    pacs.start(port)
    try:
        wait_due(outbox)
        deliver_due(outbox, "CADNODE")
        assert states(outbox) == [("sent", 2), ("sent", 2)]
        # each line about a delivery names the study and job it belongs to
        failed, delivered = (r for r in caplog.records if r.name == "cadnode.jobs.outbox")
        assert failed.levelno == logging.WARNING and "failed" in failed.getMessage()
        assert delivered.getMessage() == f"delivered cad_sr, cad_sr to PACS@127.0.0.1:{port}"
        assert [(r.study_uid, r.job_id) for r in (failed, delivered)] == [("1.2.3", 1)] * 2  # type: ignore[attr-defined]
        deliver_due(outbox, "CADNODE")  # nothing left: nothing sent twice
        assert len(pacs.received) == 2
    finally:
        pacs.stop()


@pytest.mark.parametrize("fault", ["refused", "rejected", "failure_status", "timeout"])
def test_each_fault_retries_then_dead_letters_then_admin_retry(  # type: ignore[no-untyped-def]
    fault: str, outbox: Database, demo_study, tmp_path, silent_server
) -> None:
    port = free_port()
    pacs: DemoPACS | None = None
    if fault == "rejected":  # a PACS that is someone else: association rejected (called AE)
        pacs = DemoPACS(tmp_path / "other", ae_title="OTHERPACS")
        pacs.start(port)
    elif fault == "failure_status":  # a PACS whose disk is full: 0xA700 for every store
        pacs = DemoPACS(tmp_path / "full", ae_title="PACS")
        pacs.listener.policy = Policy(min_free_bytes=2**62)
        pacs.start(port)
    elif fault == "timeout":
        port = silent_server
    add_results(outbox, demo_study[:1], f"PACS@127.0.0.1:{port}")
    try:
        drain(outbox, 5)
        assert states(outbox) == [("dead", 3)]
        with outbox.session() as s:
            d = s.scalars(select(Delivery)).one()
            dead = s.scalars(select(Event).where(Event.kind == "dead_letter")).all()
        expected = {"refused": "cannot connect", "rejected": "association rejected",
                    "failure_status": "status 0xA700", "timeout": "timed out"}[fault]
        assert expected in (d.last_error or ""), d.last_error
        assert len(dead) == 1
        assert admin.list_studies(outbox)[0]["deliveries"] == {"dead": 1}
    finally:
        if pacs is not None:
            pacs.stop()
    # The admin fixes the PACS and retries: it arrives, once.
    good = DemoPACS(tmp_path / "good", ae_title="PACS")
    good_port = good.start(0)
    with outbox.session() as s:
        s.execute(Delivery.__table__.update().values(destination=f"PACS@127.0.0.1:{good_port}"))
    try:
        assert queue.retry_dead_deliveries(outbox) == 1
        drain(outbox, 2)
        assert states(outbox) == [("sent", 1)]
        assert len(good.received) == 1
    finally:
        good.stop()


class AbortingPACS:
    """A real pynetdicom storage SCP that acknowledges the first ``keep`` C-STOREs of its
    first association and then aborts it (as a PACS that crashes or hits a limit might);
    later associations are served normally."""

    def __init__(self, keep: int) -> None:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

        self.keep, self.aborted = keep, False
        self.received: list[str] = []  # SOP Instance UIDs acknowledged, in order
        self._lock = threading.Lock()
        self.ae = AE(ae_title="PACS")
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.server = self.ae.start_server(("127.0.0.1", 0), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = int(self.server.server_address[1])

    def _store(self, event) -> int:  # type: ignore[no-untyped-def]
        with self._lock:
            if not self.aborted and len(self.received) >= self.keep:
                self.aborted = True
                event.assoc.abort()  # no response to this C-STORE, nor to any after it
                return 0xA700
            self.received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


def _sop_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_objects_acknowledged_before_an_abort_are_delivered(outbox: Database, demo_study) -> None:  # type: ignore[no-untyped-def]
    """Before: all four marked failed although the PACS had two of them (and got them again
    and again). Now the two it acknowledged are delivered; the other two are retried; in the
    end the PACS has received each object exactly once."""
    pacs = AbortingPACS(keep=2)
    add_results(outbox, demo_study, f"PACS@127.0.0.1:{pacs.port}")
    try:
        assert deliver_due(outbox, "CADNODE", FAST, timeout=10) == 2
        assert states(outbox) == [("sent", 1), ("sent", 1), ("pending", 1), ("pending", 1)]
        with outbox.session() as s:
            errors = [d.last_error for d in s.scalars(select(Delivery).order_by(Delivery.id))]
        assert errors[:2] == [None, None] and all(e for e in errors[2:]), errors
        assert wait_until(lambda: (deliver_due(outbox, "CADNODE", FAST, timeout=10) or True)
                          and states(outbox) == [("sent", 1), ("sent", 1), ("sent", 2),
                                                 ("sent", 2)], 10, interval=0.05)
        assert sorted(pacs.received) == sorted(_sop_uid(p) for p in demo_study)  # once each
    finally:
        pacs.stop()


def test_a_hanging_destination_delays_only_itself(db: Database, demo_study, tmp_path,  # type: ignore[no-untyped-def]
                                                  silent_server) -> None:
    """One destination accepts TCP and never answers; the other is healthy. The scheduler's
    outbox tick serves each in its own thread: the healthy one is delivered while the hanging
    one is still waiting out its timeout."""
    from cadnode.jobs.outbox import Outbox

    good = DemoPACS(tmp_path / "good", ae_title="PACS")
    good_port = good.start(0)
    queue.record_instance(db, _stored_for(demo_study[0]), now=0)
    queue.assemble_studies(db, 0, 0, now=1)
    job = queue.claim_next_job(db, "w", 60, now=1)
    assert job is not None
    queue.complete_job(db, job, {}, [], "v", [
        queue.ResultFile("cad_sr", str(demo_study[0]), "9.1",
                         (f"HUNG@127.0.0.1:{silent_server}", f"PACS@127.0.0.1:{good_port}"))])
    hang_timeout = 8.0
    box = Outbox(db, "CADNODE", FAST, timeout=hang_timeout)
    try:
        began = time.monotonic()
        threads = box.tick()
        assert len(threads) == 2
        assert good.wait_for(1, hang_timeout), "the healthy destination waited"
        healthy = time.monotonic() - began
        hung = next(t for t in threads if "HUNG" in t.name)
        assert hung.is_alive(), "the hanging destination should still be waiting"
        assert box.tick() == []  # no second thread for a destination already being served
        print(f"healthy destination delivered in {healthy:.2f} s beside one that hangs "
              f"for {hang_timeout:.0f} s")
        assert wait_until(lambda: dict(states_by_dest(db)).get("PACS") == "sent", 10, 0.05)
    finally:
        good.stop()
    box.join(hang_timeout + 10)
    assert dict(states_by_dest(db)) == {"PACS": "sent", "HUNG": "pending"}


def states_by_dest(db: Database) -> list[tuple[str, str]]:
    with db.session() as s:
        return [(d.destination.split("@")[0], d.state) for d in s.scalars(select(Delivery))]


def _stored_for(path: Path):  # type: ignore[no-untyped-def]
    from cadnode.dicom.spool import StoredInstance
    from cadnode.dicom.views import ViewInfo

    return StoredInstance(path=path, size=1, sop_instance_uid="1.2.3.1", sop_class_uid="1.2",
                          transfer_syntax="1.2", study_uid="1.2.3", series_uid="1.2.3.4",
                          patient_id="P", accession="", calling_ae="M",
                          view=ViewInfo("L", "CC", True, "t"))
