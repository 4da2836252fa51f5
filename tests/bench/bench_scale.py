"""Throughput with 1, 2, 4 and 8 `cadnode worker` processes sharing one PostgreSQL queue.

    python -m tests.bench.bench_scale [--studies 16] [--workers 1,2,4,8]

For each count: a fresh database on the local PostgreSQL server, the studies received by a real
listener (small synthetic 4-view studies, so that the model, not decoding, dominates), then N
real worker processes (each its own model) started; once every one is up, the studies are
queued at once, and timed to the last one done. The reference is one worker: the ratio says
how far adding processes helps on this machine (with two cores it stops at about two).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
from sqlalchemy import func, select

from cadnode.dicom.listener import Listener
from cadnode.dicom.sender import configure_pynetdicom, send_files
from cadnode.jobs import queue
from cadnode.jobs.db import Database, Job
from tests.conftest import PG_ADMIN_URL, REPO
from tests.helpers import write_small_study


def _fresh_database() -> tuple[str, str]:
    name = f"cadnode_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as con:
        con.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    return name, f"{base}/{name}"


def _drop(name: str) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as con:
        con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run(n_workers: int, n_studies: int, root: Path) -> float:
    """Seconds for ``n_workers`` processes to finish ``n_studies`` queued studies."""
    name, url = _fresh_database()
    try:
        db = Database(url, home=root)
        db.create_schema()
        listener = Listener(root / "spool", lambda s: queue.record_instance(db, s))
        port = listener.start("127.0.0.1", 0)
        for k in range(n_studies):
            uid = f"1.2.826.0.1.3680043.10.1.317.{n_workers}.{k}"
            files = write_small_study(root / "src" / uid, uid, 512, 256)
            assert all(r.ok for r in send_files(files, "127.0.0.1", port, "CADNODE"))
        listener.stop()
        env = {**os.environ, "CADNODE_HOME": str(root), "CADNODE_DB_URL": url,
               "CADNODE_LOG_FILE": "", "CADNODE_POLL_SECONDS": "0.1",
               "CADNODE_DESTINATIONS": "", "OMP_NUM_THREADS": "1"}
        logs = [open(root / f"w{n}.log", "wb") for n in range(n_workers)]  # noqa: SIM115
        procs = [subprocess.Popen([sys.executable, "-m", "cadnode", "worker"], env=env,
                                  stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
                 for log in logs]
        try:
            started = [False] * n_workers
            while not all(started):  # every model loaded before the clock starts
                for n in range(n_workers):
                    started[n] = started[n] or b"worker(s), model" in (
                        root / f"w{n}.log").read_bytes()
                    if procs[n].poll() is not None:
                        raise RuntimeError((root / f"w{n}.log").read_text())
                time.sleep(0.05)
            t0 = time.time()  # the jobs are queued only now, all at once
            assert len(queue.assemble_studies(db, 0, 0)) == n_studies
            while True:
                with db.session() as s:
                    done = s.scalar(select(func.count()).select_from(Job)
                                    .where(Job.state.in_(("done", "done-partial"))))
                    last = s.scalar(select(func.max(Job.finished_at)))
                if done == n_studies:
                    return float(last) - t0
                time.sleep(0.1)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(60)
            for log in logs:
                log.close()
            db.dispose()
    finally:
        _drop(name)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--studies", type=int, default=16)
    p.add_argument("--workers", default="1,2,4,8")
    args = p.parse_args()
    configure_pynetdicom()
    counts = [int(x) for x in args.workers.split(",")]
    rows = []
    for n in counts:
        with tempfile.TemporaryDirectory() as tmp:
            seconds = run(n, args.studies, Path(tmp))
        rows.append((n, seconds))
        print(f"{n} worker(s): {args.studies} studies in {seconds:.1f} s", flush=True)
    base = args.studies / rows[0][1]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=REPO).stdout.strip()
    print(f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores\n")
    print("| workers | studies | seconds | studies/hour | x one worker |")
    print("|---|---|---|---|---|")
    for n, seconds in rows:
        rate = args.studies / seconds
        print(f"| {n} | {args.studies} | {seconds:.1f} | {3600 * rate:.0f} | "
              f"{rate / base:.2f} |")


if __name__ == "__main__":
    main()
