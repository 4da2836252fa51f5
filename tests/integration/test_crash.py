"""Crash safety: SIGKILL the node while senders push; nothing acknowledged is lost.

The suite runs a short version; the long run is a documented command:

    python -m tests.integration.test_crash --kills 25 --senders 4 --studies 6

Senders behave like modalities: a file that was not acknowledged (connection refused, aborted,
no response) is sent again later. The node is killed with SIGKILL at random moments, which
lands in receiving, processing and delivering alike, and restarted on the same home and port.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from cadnode.demo import DemoPACS
from cadnode.dicom.sender import DeliveryError, send_files
from cadnode.jobs.db import Database, Delivery, Instance, Job
from cadnode.results.enum import ResultKind
from tests.helpers import NodeProcess, wait_until, write_small_study

UID = "1.2.826.0.1.3680043.10.1407.9"
PER_STUDY = len(ResultKind)  # result objects each study sends
NODE_ENV = {
    "CADNODE_COMPLETE_SECONDS": "1",
    "CADNODE_POLL_SECONDS": "0.3",
    "CADNODE_LEASE_SECONDS": "4",
    "CADNODE_MAX_ATTEMPTS": "50",
    "CADNODE_RETRY_BASE_SECONDS": "0.5",
    "CADNODE_RETRY_CAP_SECONDS": "2",
    "CADNODE_HOST": "127.0.0.1",
}


def push_until_acknowledged(files: list[Path], port: int, acked: set[str], lock: threading.Lock,
                            deadline: float) -> None:
    for f in files:
        uid = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        while time.monotonic() < deadline:
            try:
                (r,) = send_files([f], "127.0.0.1", port, "CADNODE", "MODALITY", timeout=10)
            except DeliveryError:
                time.sleep(0.3)
                continue
            if r.ok:
                with lock:
                    acked.add(uid)
                break
            time.sleep(0.3)


def run_kill_test(root: Path, kills: int, senders: int, studies: int, seed: int = 0
                  ) -> dict[str, Any]:
    rng = random.Random(seed)
    pacs = DemoPACS(root / "pacs", ae_title="PACS")
    pacs_port = pacs.start()
    node = NodeProcess(root / "node", 0,
                       {**NODE_ENV, "CADNODE_DESTINATIONS": f"PACS@127.0.0.1:{pacs_port}"})
    acked: set[str] = set()
    lock = threading.Lock()
    study_uids = [f"{UID}.{seed}.{i}.{j}" for i in range(senders) for j in range(studies)]
    try:
        node.wait_ready()
        deadline = time.monotonic() + 600
        threads = []
        for i in range(senders):
            files = [p for j in range(studies)
                     for p in write_small_study(root / f"s{i}" / str(j), f"{UID}.{seed}.{i}.{j}")]
            threads.append(threading.Thread(
                target=push_until_acknowledged, args=(files, node.port, acked, lock, deadline)))
        for t in threads:
            t.start()
        for _ in range(kills):
            time.sleep(rng.uniform(0.3, 2.0))
            node.kill()
            node.start()
            node.wait_ready()
        for t in threads:
            t.join()

        def delivered() -> dict[str, set[str]]:
            by_study: dict[str, set[str]] = defaultdict(set)
            for r in list(pacs.received):
                by_study[r.study_uid].add(r.sop_instance_uid)
            return by_study

        all_done = wait_until(
            lambda: all(len(delivered()[s]) == PER_STUDY for s in study_uids), 240)
        db = Database(f"sqlite:///{root / 'node' / 'cadnode.db'}", home=root / "node")
        with db.session() as s:  # paths are stored relative to the node's home
            rows = {r.sop_instance_uid: db.file_path(r.path) for r in s.scalars(select(Instance))}
            attempts = sorted(s.scalars(select(Job.attempts)).all())
        db.dispose()
        whole = 0
        for uid in acked:
            if uid in rows and rows[uid].is_file():
                ds = pydicom.dcmread(rows[uid])
                if ds.pixel_array.shape == (ds.Rows, ds.Columns):
                    whole += 1
        return {
            "kills": kills,
            "studies": len(study_uids),
            "acknowledged": len(acked),
            "found_whole": whole,
            "all_results_delivered": all_done,
            "results_distinct": sum(len(v) for v in delivered().values()),
            "results_received_raw": len(pacs.received),
            "job_attempts": attempts,
        }
    finally:
        node.stop()
        pacs.stop()


@pytest.mark.e2e
def test_sigkill_while_receiving_loses_nothing(tmp_path: Path) -> None:
    figures = run_kill_test(tmp_path, kills=5, senders=3, studies=1, seed=1)
    print(json.dumps(figures))
    assert figures["acknowledged"] == 3 * 4  # senders retried until every file was taken
    assert figures["found_whole"] == figures["acknowledged"]
    assert figures["all_results_delivered"]
    assert figures["results_distinct"] == PER_STUDY * figures["studies"]  # no duplicates


@pytest.mark.e2e
def test_worker_killed_mid_job_runs_again_with_the_same_result_uids(tmp_path: Path) -> None:
    pacs = DemoPACS(tmp_path / "pacs", ae_title="PACS")
    pacs_port = pacs.start()
    node = NodeProcess(tmp_path / "node", 0,
                       {**NODE_ENV, "CADNODE_DESTINATIONS": f"PACS@127.0.0.1:{pacs_port}"})
    db = Database(f"sqlite:///{tmp_path / 'node' / 'cadnode.db'}")
    try:
        node.wait_ready()
        for attempt in range(3):  # a kill can miss a short job; try a few studies
            study = f"{UID}.77.{attempt}"
            files = write_small_study(tmp_path / study, study)
            assert all(r.ok for r in send_files(files, "127.0.0.1", node.port, "CADNODE"))

            def running() -> bool:
                with db.session() as s:
                    return s.scalar(select(Job.state).order_by(Job.id.desc())) == "running"

            assert wait_until(running, 30, interval=0.02)
            node.kill()
            node.start()
            node.wait_ready()
            assert wait_until(lambda s=study: len({r.sop_instance_uid for r in pacs.received
                                                   if r.study_uid == s}) == PER_STUDY, 60)
            with db.session() as s:
                job = s.scalars(select(Job).order_by(Job.id.desc())).first()
                assert job is not None and job.state == "done"
            if job.attempts >= 2:
                break
        assert job.attempts == 2, "the kill never landed while the job was running"
        with db.session() as s:
            expected = set(s.scalars(select(Delivery.sop_instance_uid)
                                     .where(Delivery.job_id == job.id)).all())
        got = {r.sop_instance_uid for r in pacs.received if r.study_uid == study}
        assert got == expected and len(got) == PER_STUDY
    finally:
        db.dispose()
        node.stop()
        pacs.stop()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--kills", type=int, default=25)
    p.add_argument("--senders", type=int, default=4)
    p.add_argument("--studies", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(run_kill_test(Path(tmp), a.kills, a.senders, a.studies, a.seed),
                         indent=2))


if __name__ == "__main__":
    main()
