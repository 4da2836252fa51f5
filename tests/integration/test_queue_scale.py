"""Eight worker processes claim 500 queued jobs from the real PostgreSQL server: every job is
completed exactly once (SELECT ... FOR UPDATE SKIP LOCKED, fenced completion)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from sqlalchemy import func, select

from cadnode.dicom.spool import StoredInstance
from cadnode.dicom.views import ViewInfo
from cadnode.jobs import queue
from cadnode.jobs.db import Database, Job
from cadnode.jobs.enum import JobState
from tests.conftest import REPO
from tests.helpers import empty_database, wait_until

JOBS, PROCESSES = 500, 8
ROOT = "1.2.826.0.1.3680043.10.1.316"


def _queue_jobs(db: Database, n: int) -> None:
    for k in range(n):
        uid = f"{ROOT}.{k}"
        queue.record_instance(db, StoredInstance(
            path=REPO / "README.md", size=1, sop_instance_uid=f"{uid}.1", sop_class_uid="1.2",
            transfer_syntax="1.2", study_uid=uid, series_uid=f"{uid}.9", patient_id="P",
            accession="", calling_ae="M", view=ViewInfo("L", "CC", True, "t")), now=0.0)
    assert len(queue.assemble_studies(db, 0, 0, now=10.0)) == n


def test_eight_processes_complete_500_jobs_exactly_once(pg_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    db = Database(pg_url)
    empty_database(db)
    db.create_schema()
    _queue_jobs(db, JOBS)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.integration.queue_claimer", pg_url,
                               f"w{n}", str(tmp_path)], cwd=REPO, env=env)
             for n in range(PROCESSES)]
    try:
        assert wait_until(lambda: len(list(tmp_path.glob("*.ready"))) == PROCESSES, 120,
                          0.05)
        started = time.monotonic()
        (tmp_path / "go").touch()
        assert [p.wait(300) for p in procs] == [0] * PROCESSES
        seconds = time.monotonic() - started
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    per_process = {f.stem: [int(x) for x in f.read_text().split()]
                   for f in tmp_path.glob("*.done")}
    claimed = [j for ids in per_process.values() for j in ids]
    assert len(claimed) == JOBS and len(set(claimed)) == JOBS  # none lost, none twice
    assert sum(1 for ids in per_process.values() if ids) >= 2  # the work was shared
    with db.session() as s:
        states = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
    assert states == {JobState.DONE.value: JOBS}
    print(f"{JOBS} jobs by {PROCESSES} processes in {seconds:.1f} s: "
          f"{sorted(len(v) for v in per_process.values())}")
    db.dispose()
