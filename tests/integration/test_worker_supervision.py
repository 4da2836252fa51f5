"""The worker keeps going when the database drops its connections (the real PostgreSQL server).

Before: a terminated connection during ``claim_next_job`` (outside the worker's ``try``) killed
the worker thread; complete studies then stayed queued for good while the listener kept
acknowledging. Here every backend of the test database is terminated again and again while a
real worker processes small studies: they all complete, and the worker thread is alive.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import psycopg
from sqlalchemy import func, select

from cadnode.config import Settings
from cadnode.dicom.listener import Listener
from cadnode.dicom.sender import send_files
from cadnode.jobs import queue
from cadnode.jobs.db import Database, Instance, Study
from cadnode.jobs.worker import Worker
from tests.conftest import PG_ADMIN_URL
from tests.helpers import empty_database, wait_until, write_small_study

STUDIES = 6
ROOT = "1.2.826.0.1.3680043.10.1.311"


def _terminate_all(dbname: str) -> int:
    """pg_terminate_backend on every connection to ``dbname`` but this one."""
    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as con:
        rows = con.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE datname = %s AND pid <> pg_backend_pid()", (dbname,)).fetchall()
    return sum(1 for (ok,) in rows if ok)


def _run_duties(db: Database, stop: threading.Event, max_attempts: int) -> None:
    """What the scheduler runs: assemble and expire leases (APScheduler logs and carries on
    after a failing run; so does this)."""
    while not stop.wait(0.2):
        try:
            queue.assemble_studies(db, 0.5, 60)
            queue.expire_leases(db, max_attempts)
        except Exception:  # noqa: BLE001 - the connection was just terminated: next round
            continue


def test_worker_survives_terminated_connections(pg_url: str, tmp_path: Path) -> None:
    settings = replace(Settings(home=tmp_path / "home"), db_url=pg_url, decode_memory_mb=0,
                       poll_seconds=0.1, lease_seconds=5.0, max_attempts=20)
    db = Database(pg_url)
    empty_database(db)
    db.create_schema()
    listener = Listener(settings.spool_dir, lambda s: queue.record_instance(db, s))
    port = listener.start("127.0.0.1", 0)
    try:
        for n in range(STUDIES):
            files = write_small_study(tmp_path / f"s{n}", f"{ROOT}.{n}", 256, 128)
            assert all(r.ok for r in send_files(files, "127.0.0.1", port, "CADNODE"))
    finally:
        listener.stop()
    worker = Worker(settings, db, owner="supervised")
    stop = threading.Event()
    worker_thread = threading.Thread(target=worker.run_forever, name="worker", daemon=True)
    duties = threading.Thread(target=_run_duties, args=(db, stop, settings.max_attempts),
                              daemon=True)
    dbname = pg_url.rsplit("/", 1)[1]
    terminated = 0

    def finished() -> int:
        try:
            with db.session() as s:
                return int(s.scalar(select(func.count()).select_from(Study)
                                    .where(Study.state.in_(("done", "done-partial")))) or 0)
        except Exception:  # noqa: BLE001 - terminated under us too
            return 0

    worker_thread.start()
    duties.start()
    try:
        deadline = time.monotonic() + 240
        while finished() < STUDIES and time.monotonic() < deadline:
            terminated += _terminate_all(dbname)
            stop.wait(0.4)  # the fault's rhythm, not a synchronisation: kill again and again
            assert worker_thread.is_alive(), "the worker thread died"
        assert wait_until(lambda: finished() == STUDIES, 60)
        assert worker_thread.is_alive()
        assert terminated >= 5, f"only {terminated} connections were terminated"
        with db.session() as s:
            assert s.scalar(select(func.count()).select_from(Instance)) == 4 * STUDIES
        print(f"{terminated} connections terminated; {STUDIES} studies done")
    finally:
        stop.set()
        worker.stop()
        worker_thread.join(60)
        duties.join(10)
        db.dispose()

