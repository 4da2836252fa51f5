"""Leadership locks on SQLite (flock beside the file) and the PostgreSQL server (advisory
locks): one leader at a time, hand-over on release, step-down when the connection is cut."""

from __future__ import annotations

import psycopg
from sqlalchemy import select

from cadnode.jobs.db import Database, Event
from cadnode.jobs.leader import Duty, Leadership, lock_key
from tests.conftest import PG_ADMIN_URL
from tests.helpers import wait_until


def test_one_leader_per_duty_and_hand_over(db: Database) -> None:
    a, b = Leadership(db, Duty.ASSEMBLER), Leadership(db, Duty.ASSEMBLER)
    sender = Leadership(db, Duty.SENDER)
    try:
        assert a.poll() and not b.poll()
        assert a.poll() and not b.poll()  # held across polls
        assert sender.poll()  # another duty: its own lock
        a.release()
        assert not a.held and b.poll() and not a.poll()
    finally:
        for lead in (a, b, sender):
            lead.release()
    with db.session() as s:
        said = s.scalars(select(Event.message).where(Event.kind == "leader")
                         .order_by(Event.id)).all()
    assert [m.split(" ", 2)[2] for m in said] == [
        "leads the assembler", "leads the sender", "no longer leads the assembler",
        "leads the assembler", "no longer leads the assembler", "no longer leads the sender"]


def test_keys_differ_per_duty() -> None:
    assert lock_key(Duty.ASSEMBLER) != lock_key(Duty.SENDER)
    assert -(2**63) <= lock_key(Duty.SENDER) < 2**63


def test_a_cut_connection_steps_down_and_the_follower_takes_over(pg_url: str) -> None:
    from tests.helpers import empty_database

    db = Database(pg_url)
    empty_database(db)
    db.create_schema()
    a, b = Leadership(db, Duty.SENDER), Leadership(db, Duty.SENDER)
    try:
        assert a.poll() and not b.poll()
        backend = a._conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as con:
            assert con.execute("SELECT pg_terminate_backend(%s)", (backend,)).fetchone() == (True,)
        # the server drops the lock once the terminated backend has exited: the follower gets
        # it at a poll soon after, and the old leader, at its next, finds its connection gone
        assert wait_until(b.poll, 10, 0.05)
        assert not a.poll() and not a.held
        assert not a.poll()  # it tries again on a new connection, and the lock is taken
        b.release()
        assert a.poll()
    finally:
        a.release()
        b.release()
        db.dispose()


def test_the_server_says_who_leads(pg_url: str) -> None:
    from cadnode.jobs.db import process_name
    from cadnode.jobs.leader import holder
    from tests.helpers import empty_database

    db = Database(pg_url)
    empty_database(db)
    db.create_schema()
    lead = Leadership(db, Duty.ASSEMBLER)
    try:
        assert holder(db, Duty.ASSEMBLER) is None
        assert lead.poll()
        assert holder(db, Duty.ASSEMBLER) == process_name()
        assert holder(db, Duty.SENDER) is None
        lead.release()
        assert holder(db, Duty.ASSEMBLER) is None
    finally:
        lead.release()
        db.dispose()
