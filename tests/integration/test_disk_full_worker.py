"""A full disk under the worker, then space back: processing resumes by itself.

Before: ENOSPC writing the results, then SQLite "database or disk is full" inside ``fail_job``,
killed the worker thread; after space came back, studies stayed queued or running for good.
Here the whole home (spool, results, SQLite database) is on a small tmpfs that is filled up
after the images were acknowledged; the worker keeps failing and backing off, and once the
filler is deleted the study completes without anyone restarting anything.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import select

from cadnode.config import Settings
from cadnode.dicom.listener import Listener, Policy
from cadnode.dicom.sender import send_files
from cadnode.jobs import queue
from cadnode.jobs.db import Database, Study
from cadnode.jobs.worker import Worker
from tests.helpers import small_file_system, wait_until, write_small_study

STUDY = "1.2.826.0.1.3680043.10.1.312"


@pytest.fixture
def small_home(tmp_path: Path) -> Iterator[Path]:
    with small_file_system(tmp_path / "home", "24m") as home:
        yield home


def _fill(folder: Path) -> Path:
    """Write one file until the file system is full."""
    filler = folder / "filler"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 2**20)
                fh.flush()
        except OSError:
            pass
    return filler


def _state(db: Database) -> str:
    try:
        with db.session() as s:
            return str(s.scalars(select(Study.state)).one())
    except Exception:  # noqa: BLE001 - the database file is on the full disk too
        return "?"


def test_full_disk_then_space_back_resumes_processing(small_home: Path, tmp_path: Path) -> None:
    settings = replace(Settings(home=small_home), decode_memory_mb=0, poll_seconds=0.1,
                       lease_seconds=2.0, max_attempts=50, min_free_mb=1)
    db = Database(settings.database_url)
    db.create_schema()
    listener = Listener(settings.spool_dir, lambda s: queue.record_instance(db, s),
                        policy=Policy.from_settings(settings))
    port = listener.start("127.0.0.1", 0)
    try:
        files = write_small_study(tmp_path / "study", STUDY, 256, 128)
        assert all(r.ok for r in send_files(files, "127.0.0.1", port, "CADNODE"))
    finally:
        listener.stop()
    worker = Worker(settings, db, owner="w")
    failures: list[str] = []
    real_fail = worker._fail

    def counting_fail(job, error, permanent=False):  # type: ignore[no-untyped-def]
        failures.append(error)
        real_fail(job, error, permanent)

    worker._fail = counting_fail  # type: ignore[method-assign]
    assert queue.assemble_studies(db, 0, 0) == [STUDY]  # queued; then the disk fills up
    filler = _fill(small_home)
    stop = threading.Event()

    def duties() -> None:  # the scheduler's assembler and lease expiry
        while not stop.wait(0.2):
            try:
                queue.assemble_studies(db, 0, 0)
                queue.expire_leases(db, settings.max_attempts)
            except Exception:  # noqa: BLE001 - disk full: the next round tries again
                continue

    threads = [threading.Thread(target=worker.run_forever, daemon=True),
               threading.Thread(target=duties, daemon=True)]
    for t in threads:
        t.start()
    try:
        # the worker meets the full disk: a failed iteration (claiming or recording in the
        # full database) or a failed job (writing its results)
        assert wait_until(lambda: bool(failures) or not worker.healthy, 60), _state(db)
        assert _state(db) not in ("done", "done-partial")
        filler.unlink()  # an admin frees space; nobody restarts anything
        assert wait_until(lambda: _state(db) in ("done", "done-partial"), 120), _state(db)
        assert threads[0].is_alive()
        results = list((settings.results_dir / STUDY).glob("*.dcm"))
        assert len(results) == 4, results
    finally:
        stop.set()
        worker.stop()
        for t in threads:
            t.join(30)
        db.dispose()
