"""Scale-out on the real PostgreSQL server: `cadnode listen` and `cadnode worker` as separate
processes sharing one job database and one spool, delivering to a real storage SCP.

Two listeners and two workers (each a real process with the shipped model) receive 20 four-view
studies, a study split over both listeners, and keep going while their database connections are
terminated and while the processes that lead the assembler and the sender are killed.
"""

from __future__ import annotations

import collections
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import func, select

from cadnode.demo import DemoPACS
from cadnode.dicom.sender import send_files
from cadnode.jobs.db import Database, Job, Study
from cadnode.jobs.leader import LEAD_POLL_SECONDS, Duty, holder
from tests.conftest import PG_ADMIN_URL
from tests.helpers import NodeProcess, empty_database, wait_until, write_small_study

pytestmark = pytest.mark.e2e

ROOT = "1.2.826.0.1.3680043.10.1.315"
OBJECTS_PER_STUDY = 4  # CAD SR, TID 1500, SC, GSPS to the one destination
#: A follower takes over a dead leader's duty within about one poll (LEAD_POLL_SECONDS); this
#: bound leaves room for a loaded 2-core machine.
TAKEOVER_SECONDS = 10 * LEAD_POLL_SECONDS


@dataclass
class Cluster:
    db: Database
    pacs: DemoPACS
    listeners: list[NodeProcess]
    workers: list[NodeProcess]
    dbname: str
    tmp: Path

    def push(self, uid: str, listener: int = 0, views: slice = slice(None)) -> None:
        files = write_small_study(self.tmp / "src" / uid, uid, 256, 128)[views]
        port = self.listeners[listener].port
        assert all(r.ok for r in send_files(files, "127.0.0.1", port, "CADNODE"))

    def received(self, study_uid: str) -> list[str]:
        """SOP Instance UIDs the PACS received for ``study_uid`` (repeats included)."""
        return [r.sop_instance_uid for r in list(self.pacs.received)
                if r.study_uid == study_uid]

    def delivered(self, *uids: str) -> bool:
        return all(len(set(self.received(u))) == OBJECTS_PER_STUDY for u in uids)

    def logs(self) -> str:
        return "\n".join(f"--- {p.command[0]} {p.proc.pid}\n{p.log.read_text(errors='replace')}"
                         for p in self.listeners + self.workers)

    def leader(self, duty: str) -> int | None:
        """The pid of the process that holds ``duty``'s lock now (the server's lock table)."""
        name = holder(self.db, Duty(duty))
        return int(name.rsplit(":", 1)[1]) if name else None


@pytest.fixture(scope="module")
def cluster(pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("cluster")
    db = Database(pg_url)
    empty_database(db)
    pacs = DemoPACS(tmp / "pacs", ae_title="PACS")
    pacs_port = pacs.start()
    home = tmp / "shared-home"  # the shared volume: spool and results
    env = {"CADNODE_DB_URL": pg_url, "CADNODE_DESTINATIONS": f"PACS@127.0.0.1:{pacs_port}",
           "CADNODE_COMPLETE_SECONDS": "1", "CADNODE_POLL_SECONDS": "0.2",
           "CADNODE_LOG_FILE": "", "OMP_NUM_THREADS": "1"}
    upgrade = NodeProcess(home, 0, env, command=("db", "upgrade"), log=tmp / "upgrade.log")
    assert upgrade.proc.wait(120) == 0, upgrade.log.read_text()
    listeners = [NodeProcess(home, 0, env, command=("listen",), log=tmp / f"listen-{n}.log")
                 for n in range(2)]
    workers = [NodeProcess(home, 0, env, command=("worker",), log=tmp / f"worker-{n}.log")
               for n in range(2)]
    c = Cluster(db, pacs, listeners, workers, pg_url.rsplit("/", 1)[1], tmp)
    try:
        for p in listeners + workers:
            p.wait_ready(180)
        yield c
    finally:
        for p in listeners + workers:
            if p.proc.poll() is None:
                p.stop()
        pacs.stop()
        db.dispose()


def _in_parallel(calls: list[Callable[[], object]]) -> None:
    """Run ``calls`` in threads at once; an exception in any fails the test here."""
    errors: list[BaseException] = []

    def run(call: Callable[[], object]) -> None:
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def test_twenty_studies_each_done_once_and_delivered_once(cluster: Cluster) -> None:
    uids = [f"{ROOT}.1.{n}" for n in range(20)]
    _in_parallel([lambda n=n: [cluster.push(uid, n) for uid in uids[n::2]] for n in range(2)])
    assert wait_until(lambda: cluster.delivered(*uids), 600, 0.5), cluster.logs()
    for uid in uids:
        got = cluster.received(uid)
        assert len(got) == len(set(got)) == OBJECTS_PER_STUDY, (uid, got)  # sent once each
    with cluster.db.session() as s:
        rows = s.execute(select(Study.study_uid, Study.state, func.count(Job.id))
                         .join(Job, Job.study_id == Study.id)
                         .where(Study.study_uid.in_(uids))
                         .group_by(Study.study_uid, Study.state)).all()
    assert sorted(rows) == sorted((uid, "done", 1) for uid in uids)  # one job each, done
    owners = _owners(cluster)
    assert len(owners) == 2, owners  # both worker processes took jobs


def _owners(cluster: Cluster) -> set[str]:
    """The worker processes that finished jobs, from their own log lines."""
    pids = set()
    for w in cluster.workers:
        if " done: read " in w.log.read_text(errors="replace"):
            pids.add(str(w.proc.pid))
    return pids


def test_a_study_split_over_two_listeners_is_one_job(cluster: Cluster) -> None:
    uid = f"{ROOT}.2.1"
    _in_parallel([lambda n=n: cluster.push(uid, n, slice(2 * n, 2 * n + 2)) for n in range(2)])
    assert wait_until(lambda: cluster.delivered(uid), 300, 0.5), cluster.logs()
    with cluster.db.session() as s:
        study = s.scalars(select(Study).where(Study.study_uid == uid)).one()
        jobs = s.scalars(select(Job).where(Job.study_id == study.id)).all()
    assert [j.views for j in jobs] == ["L-CC,L-MLO,R-CC,R-MLO"]
    assert len(cluster.received(uid)) == OBJECTS_PER_STUDY


def _terminate_all(dbname: str) -> int:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as con:
        rows = con.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE datname = %s AND pid <> pg_backend_pid()", (dbname,)).fetchall()
    return sum(1 for (ok,) in rows if ok)


def test_terminated_connections_lose_nothing(cluster: Cluster) -> None:
    uids = [f"{ROOT}.3.{n}" for n in range(6)]
    terminated = 0
    stop = threading.Event()

    def cut() -> None:
        nonlocal terminated
        while not stop.wait(0.5):  # the fault's rhythm, not a synchronisation
            terminated += _terminate_all(cluster.dbname)

    cutter = threading.Thread(target=cut, daemon=True)
    cutter.start()
    try:
        for n, uid in enumerate(uids):
            cluster.push(uid, n % 2)  # acknowledged: the listener has it on disk and in a row
        assert wait_until(lambda: cluster.delivered(*uids), 600, 0.5), cluster.logs()
    finally:
        stop.set()
        cutter.join(10)
    assert terminated >= 5, terminated
    assert all(p.proc.poll() is None for p in cluster.listeners + cluster.workers)
    repeats = sum(len(cluster.received(u)) - OBJECTS_PER_STUDY for u in uids)
    print(f"{terminated} connections terminated; 6 studies delivered; {repeats} object(s) "
          "sent again after a cut (the same SOP instance: the PACS stores it once)")


def test_killing_the_leaders_hands_their_duties_over(cluster: Cluster) -> None:
    procs = {p.proc.pid: p for p in cluster.listeners + cluster.workers}
    for duty, group in (("assembler", cluster.listeners), ("sender", cluster.workers)):
        # (after the previous test's cuts every process may have stepped down: one leads again
        # within a poll)
        assert wait_until(lambda d=duty: cluster.leader(d) is not None, 30, 0.1), cluster.logs()
        pid = cluster.leader(duty)
        assert pid in {p.proc.pid for p in group}, (duty, pid)
        os.kill(pid, signal.SIGKILL)  # no clean-up, no unlock: the session just ends
        procs[pid].proc.wait(30)
        killed_at = time.monotonic()
        assert wait_until(lambda d=duty, dead=pid: cluster.leader(d) not in (None, dead),
                          60, 0.1), cluster.logs()
        took = time.monotonic() - killed_at
        assert took <= TAKEOVER_SECONDS, took
        print(f"{duty}: process {cluster.leader(duty)} took over {took:.1f} s after "
              f"process {pid} was killed")
    survivor = next(n for n, p in enumerate(cluster.listeners) if p.proc.poll() is None)
    uid = f"{ROOT}.4.1"
    cluster.push(uid, survivor)
    assert wait_until(lambda: cluster.delivered(uid), 300, 0.5), cluster.logs()
    counts = collections.Counter(cluster.received(uid))
    assert set(counts.values()) == {1}
