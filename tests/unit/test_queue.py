"""The job database on SQLite and on the PostgreSQL server: states, leases, outbox."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import select

from cadnode.dicom.spool import StoredInstance
from cadnode.dicom.views import ViewInfo
from cadnode.jobs import admin, queue
from cadnode.jobs.db import Database, Delivery, Event, Instance, Job, Study

STUDY = "1.2.3.4"


def stored(sop: str, lat: str | None, view: str | None, study: str = STUDY) -> StoredInstance:
    return StoredInstance(
        path=Path(f"/spool/{study}/{sop}.dcm"), size=10, sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2", transfer_syntax="1.2.840.10008.1.2.1",
        study_uid=study, series_uid="1.2.3.4.5", patient_id="P1", accession="A1",
        calling_ae="MODALITY", view=ViewInfo(lat, view, True, "test"),
    )


def receive_four(db: Database, now: float, study: str = STUDY) -> None:
    for i, (lat, view) in enumerate([("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")]):
        assert queue.record_instance(db, stored(f"{study}.{i}", lat, view, study), now=now)


def events(db: Database, kind: str) -> list[Event]:
    with db.session() as s:
        return list(s.scalars(select(Event).where(Event.kind == kind)).all())


def test_complete_study_moves_queued_running_done(db: Database) -> None:
    receive_four(db, now=100.0)
    assert queue.assemble_studies(db, complete_seconds=5, stable_seconds=300, now=102) == []
    assert queue.assemble_studies(db, complete_seconds=5, stable_seconds=300, now=106) == [STUDY]
    with db.session() as s:
        job = s.scalars(select(Job)).one()
        assert (job.state, job.reason) == ("queued", "complete")
    claimed = queue.claim_next_job(db, "w1", lease_seconds=60, now=107)
    assert claimed is not None and claimed.study_uid == STUDY and claimed.attempt == 1
    assert queue.claim_next_job(db, "w2", lease_seconds=60, now=107) is None
    with db.session() as s:
        assert s.get(Job, claimed.id).state == "running"  # type: ignore[union-attr]
        assert s.scalars(select(Study)).one().state == "running"
    result = queue.ResultFile("cad_sr", "/r/sr.dcm", "9.9.9", ("PACS@127.0.0.1:104",))
    queue.complete_job(db, claimed, {"exam": {"cancer": 0.2}}, ["L-CC"], "0.1", [result])
    rows = admin.list_studies(db)
    assert rows[0]["state"] == "done"
    assert rows[0]["job"]["state"] == "done"
    assert rows[0]["job"]["scores"] == {"exam": {"cancer": 0.2}}
    assert rows[0]["views"] == ["L-CC", "L-MLO", "R-CC", "R-MLO"]
    assert rows[0]["deliveries"] == {"pending": 1}


def test_incomplete_study_waits_for_the_stable_period(db: Database) -> None:
    queue.record_instance(db, stored("1.1", "L", "CC"), now=100.0)
    assert queue.assemble_studies(db, 5, 60, now=150) == []
    assert queue.assemble_studies(db, 5, 60, now=161) == [STUDY]
    with db.session() as s:
        assert s.scalars(select(Job.reason)).one() == "stable"


def test_failed_study_records_its_error(db: Database) -> None:
    receive_four(db, now=0.0)
    queue.assemble_studies(db, 1, 300, now=10)
    job = queue.claim_next_job(db, "w", 60, now=11)
    assert job is not None
    assert queue.fail_job(db, job, "decoder exploded", max_attempts=2, now=12) == "queued"
    job = queue.claim_next_job(db, "w", 60, now=13)
    assert job is not None and job.attempt == 2
    assert queue.fail_job(db, job, "decoder exploded again", max_attempts=2, now=14) == "failed"
    row = admin.list_studies(db)[0]
    assert row["state"] == "failed"
    assert row["job"]["error"] == "decoder exploded again"
    assert [e.message for e in events(db, "failed")] == ["job 1: decoder exploded again"]


def test_expired_lease_puts_the_job_back(db: Database) -> None:
    receive_four(db, now=0.0)
    queue.assemble_studies(db, 1, 300, now=10)
    job = queue.claim_next_job(db, "dead-worker", lease_seconds=30, now=11)
    assert job is not None
    assert queue.expire_leases(db, max_attempts=3, now=30) == 0
    assert queue.expire_leases(db, max_attempts=3, now=42) == 1
    again = queue.claim_next_job(db, "w2", 30, now=43)
    assert again is not None and again.id == job.id and again.attempt == 2


def test_duplicate_instance_is_harmless(db: Database) -> None:
    assert queue.record_instance(db, stored("1.1", "L", "CC"), now=1.0)
    assert not queue.record_instance(db, stored("1.1", "L", "CC"), now=2.0)
    with db.session() as s:
        assert len(s.scalars(select(Instance)).all()) == 1
    assert len(events(db, "duplicate")) == 1


def test_new_instance_reopens_a_done_study(db: Database) -> None:
    receive_four(db, now=0.0)
    queue.assemble_studies(db, 1, 300, now=10)
    job = queue.claim_next_job(db, "w", 60, now=11)
    assert job is not None
    queue.complete_job(db, job, {}, [], "v", [], now=12)
    queue.record_instance(db, stored("late.1", "L", "XCCL"), now=20.0)
    assert admin.list_studies(db)[0]["state"] == "receiving"
    assert queue.assemble_studies(db, 1, 300, now=30) == [STUDY]


def test_concurrent_workers_never_share_a_job(db: Database) -> None:
    for n in range(6):
        receive_four(db, now=0.0, study=f"1.2.{n}")
    queue.assemble_studies(db, 1, 300, now=10)
    claimed: list[int] = []
    lock = threading.Lock()

    def work(owner: str) -> None:
        while (job := queue.claim_next_job(db, owner, 60)) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == list(range(1, 7))


def test_failed_delivery_is_retried_later_not_lost(db: Database) -> None:
    receive_four(db, now=0.0)
    queue.assemble_studies(db, 1, 300, now=10)
    job = queue.claim_next_job(db, "w", 60, now=11)
    assert job is not None
    queue.complete_job(db, job, {}, [], "v",
                       [queue.ResultFile("sc", "/r/sc.dcm", "9.1", ("P@127.0.0.1:1",))], now=12)
    (d,) = queue.due_deliveries(db, now=12)
    queue.mark_delivery(db, d.id, "connection refused", now=13)
    assert queue.due_deliveries(db, now=13) == []
    later = queue.due_deliveries(db, now=13 + 10)
    assert [x.id for x in later] == [d.id]
    queue.mark_delivery(db, d.id, None, now=30)
    with db.session() as s:
        final = s.get(Delivery, d.id)
        assert final is not None and (final.state, final.attempts) == ("sent", 2)


def test_backoff_grows_and_is_capped() -> None:
    assert 2.5 <= queue.backoff_seconds(1) <= 5
    assert 20 <= queue.backoff_seconds(4) <= 40
    assert queue.backoff_seconds(50) <= 300


def test_an_image_arriving_while_the_job_runs_gets_its_own_run(db: Database) -> None:
    """The running job listed its images at its start; the late one must not be marked done
    unread, and the next run waits until the running one has finished."""
    receive_four(db, now=100.0)
    assert queue.assemble_studies(db, 0, 0, now=101) == [STUDY]
    claimed = queue.claim_next_job(db, "w1", lease_seconds=60, now=102)
    assert claimed is not None
    assert queue.record_instance(db, stored(f"{STUDY}.9", "L", "CC"), now=103)
    with db.session() as s:
        assert s.scalars(select(Study.state)).one() == "receiving"
    assert queue.assemble_studies(db, 0, 0, now=110) == []  # the first run is still running
    queue.complete_job(db, claimed, {"exam": {}}, ["L-CC"], "m", [], now=111)
    with db.session() as s:
        assert s.scalars(select(Study.state)).one() == "receiving"  # not "done"
    assert queue.assemble_studies(db, 0, 0, now=112) == [STUDY]


def test_an_image_received_again_takes_its_new_header(db: Database) -> None:
    from cadnode.dicom.enum import ViewModifier

    assert queue.record_instance(db, stored(f"{STUDY}.1", "L", "CC"), now=100.0)
    again = stored(f"{STUDY}.1", "L", "CC")
    spot = ViewInfo("L", "CC", True, "test", (ViewModifier.SPOT_COMPRESSION,))
    again = StoredInstance(**{**again.__dict__, "view": spot, "acquired": "20260302101500.0"})
    assert not queue.record_instance(db, again, now=101.0)
    with db.session() as s:
        row = s.scalars(select(Instance)).one()
        assert (row.modifiers, row.acquired) == ("spot compression", "20260302101500.0")


def test_outcome_transactions_survive_a_lost_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """A terminated backend or a server restart while a worker records its work must not
    throw the work away: the transaction runs again on a new connection."""
    from sqlalchemy.exc import IntegrityError, OperationalError

    from cadnode.jobs import db as db_module
    from cadnode.jobs.db import reconnecting

    monkeypatch.setattr(db_module.time, "sleep", lambda _s: None)
    calls: list[int] = []

    @reconnecting
    def record(fail_times: int) -> str:
        calls.append(1)
        if len(calls) <= fail_times:
            raise OperationalError("UPDATE jobs", {}, Exception("terminating connection"))
        return "recorded"

    assert record(2) == "recorded" and len(calls) == 3
    calls.clear()
    with pytest.raises(OperationalError):  # a database that stays away: the error surfaces
        record(100)
    assert len(calls) == db_module.RECONNECT_TRIES

    @reconnecting
    def conflict() -> None:
        calls.append(1)
        raise IntegrityError("INSERT", {}, Exception("unique"))

    calls.clear()
    with pytest.raises(IntegrityError):  # not a lost connection: never repeated
        conflict()
    assert len(calls) == 1
