"""Fenced leases and insert races, on SQLite and on the PostgreSQL server.

A worker that overran its lease must not record its job, nor write outbox rows, once another
worker has taken the job; taking leases back must leave a job that just finished alone; two
associations bringing the same new study, or the same instance, at once must both succeed.
"""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import func, select

from cadnode.jobs import queue
from cadnode.jobs.db import Database, Delivery, Instance, Job, Study
from tests.unit.test_queue import STUDY, receive_four, stored


def _queued(db: Database) -> None:
    receive_four(db, now=100.0)
    assert queue.assemble_studies(db, complete_seconds=5, stable_seconds=300, now=106) == [STUDY]


def _result(n: int) -> queue.ResultFile:
    return queue.ResultFile("cad_sr", f"/results/{n}.dcm", f"9.9.{n}", ("PACS@127.0.0.1:104",))


def _deliveries(db: Database) -> int:
    with db.session() as s:
        return int(s.scalar(select(func.count()).select_from(Delivery)) or 0)


def test_a_worker_past_its_lease_records_nothing(db: Database) -> None:
    _queued(db)
    slow = queue.claim_next_job(db, "slow", lease_seconds=30, now=110)
    assert slow is not None
    assert queue.expire_leases(db, max_attempts=3, now=141) == 1  # the slow one overran
    fast = queue.claim_next_job(db, "fast", lease_seconds=30, now=142)
    assert fast is not None and fast.id == slow.id and fast.attempt == 2
    with pytest.raises(queue.LeaseLost):
        queue.renew_lease(db, slow, 30, now=143)  # the heartbeat between stages says so
    with pytest.raises(queue.LeaseLost):
        queue.complete_job(db, slow, {"exam": {}}, ["L-CC"], "v", [_result(1)], now=144)
    with pytest.raises(queue.LeaseLost):
        queue.fail_job(db, slow, "too late", max_attempts=3, now=144)
    assert _deliveries(db) == 0
    queue.complete_job(db, fast, {"exam": {}}, ["L-CC"], "v", [_result(2)], now=150)
    assert _deliveries(db) == 1  # one set of outbox rows: the run that held the lease
    with db.session() as s:
        job = s.get(Job, fast.id)
        assert job is not None and job.state == "done" and job.attempts == 2


def test_a_renewed_lease_is_not_taken_back(db: Database) -> None:
    _queued(db)
    job = queue.claim_next_job(db, "w", lease_seconds=30, now=110)
    assert job is not None
    queue.renew_lease(db, job, 30, now=135)  # lease now until 165
    assert queue.expire_leases(db, max_attempts=3, now=150) == 0
    queue.complete_job(db, job, {"exam": {}}, [], "v", [], now=151)


def test_expiry_leaves_a_job_that_finished_meanwhile_alone(db: Database) -> None:
    """``expire_leases`` takes each job back with a guarded UPDATE in its own transaction: a
    job that completed after the stale list was read stays done."""
    _queued(db)
    job = queue.claim_next_job(db, "w", lease_seconds=30, now=110)
    assert job is not None
    queue.complete_job(db, job, {"exam": {}}, [], "v", [_result(1)], now=150)  # late, but done
    assert queue.expire_leases(db, max_attempts=3, now=151) == 0
    with db.session() as s:
        row = s.get(Job, job.id)
        assert row is not None and row.state == "done"


def test_an_image_during_a_running_job_gets_another_run(db: Database) -> None:
    _queued(db)
    job = queue.claim_next_job(db, "w", lease_seconds=60, now=110)
    assert job is not None
    assert queue.record_instance(db, stored(f"{STUDY}.9", "L", "CC"), now=111)  # a repeat view
    queue.complete_job(db, job, {"exam": {}}, ["L-CC"], "v", [], now=120)
    with db.session() as s:
        study = s.scalars(select(Study)).one()
        assert study.state == "receiving"  # not "done": the late image is not yet analysed
    assert queue.assemble_studies(db, complete_seconds=5, stable_seconds=300, now=130) == [STUDY]
    second = queue.claim_next_job(db, "w", lease_seconds=60, now=131)
    assert second is not None and second.id != job.id


@pytest.mark.parametrize("same_instance", [False, True], ids=["split-study", "same-sop"])
def test_concurrent_inserts_of_one_study_all_succeed(db: Database, same_instance: bool) -> None:
    """Eight associations record instances of one new study at the same moment (or the same
    instance): none is refused, there is one study row, and each SOP instance once."""
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def record(n: int) -> None:
        sop = f"{STUDY}.1" if same_instance else f"{STUDY}.{n}"
        start.wait()
        try:
            queue.record_instance(db, stored(sop, "L", "CC"), now=100.0 + n)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    for _ in range(5):  # rounds: the race is real, so give it several chances to bite
        threads = [threading.Thread(target=record, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        with db.session() as s:
            assert s.scalar(select(func.count()).select_from(Study)) == 1
            count = s.scalar(select(func.count()).select_from(Instance))
        assert count == (1 if same_instance else 8)
        with db.session() as s:  # the next round races on a new study again
            s.execute(Instance.__table__.delete())
            s.execute(Study.__table__.delete())


def test_paths_are_stored_relative_to_the_home_and_found_again(tmp_path) -> None:  # type: ignore[no-untyped-def]
    home = tmp_path / "srv" / "var"
    db = Database(f"sqlite:///{tmp_path / 'j.db'}", home=home)
    (home / "spool" / "1").mkdir(parents=True)
    (home / "spool" / "1" / "a.dcm").write_bytes(b"x")
    assert db.stored_path(home / "spool" / "1" / "a.dcm") == "spool/1/a.dcm"
    assert db.stored_path("/elsewhere/b.dcm") == "/elsewhere/b.dcm"  # outside the home
    assert db.file_path("spool/1/a.dcm") == home / "spool" / "1" / "a.dcm"
    # written by an earlier version, relative to the working directory (home "var"):
    assert db.file_path("var/spool/1/a.dcm") == home / "spool" / "1" / "a.dcm"
    db.dispose()
