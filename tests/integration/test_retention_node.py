"""Retention on a real node that processed a real exam: the delivered study goes (files and
rows), one whose results could not be delivered stays; by `cadnode purge` and by the
scheduled retention (CADNODE_RETENTION_DAYS) of `cadnode serve`. The node logs JSON lines
carrying the study and job, without patient identifiers."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pydicom

from cadnode.demo import DemoPACS
from cadnode.dicom.sender import send_files
from tests.helpers import NodeProcess, wait_until, write_small_study

FAST = {"CADNODE_COMPLETE_SECONDS": "0.5", "CADNODE_POLL_SECONDS": "0.2",
        "CADNODE_RETRY_BASE_SECONDS": "0.5", "CADNODE_RETRY_CAP_SECONDS": "2",
        "CADNODE_LOG_FORMAT": "json", "OMP_NUM_THREADS": "1"}


def rows(node: NodeProcess) -> dict[str, dict]:  # type: ignore[type-arg]
    r = node.cli("jobs", "--json")
    assert r.returncode == 0, r.stderr
    return {row["study_uid"]: row for row in json.loads(r.stdout)}


def test_purge_removes_only_what_was_delivered(demo_study: list[Path], tmp_path: Path) -> None:
    pacs = DemoPACS(tmp_path / "pacs")
    pacs_port = pacs.start()
    home = tmp_path / "node"
    node = NodeProcess(home, 0, {**FAST,
                                 "CADNODE_DESTINATIONS": f"{pacs.ae_title}@127.0.0.1:{pacs_port}"})
    delivered = str(pydicom.dcmread(demo_study[0], stop_before_pixels=True).StudyInstanceUID)
    waiting = "1.2.826.0.1.3680043.10.1234.77"
    try:
        node.wait_ready()
        assert all(r.ok for r in send_files(demo_study, "127.0.0.1", node.port, "CADNODE"))
        assert wait_until(lambda: rows(node).get(delivered, {}).get("deliveries")
                          == {"sent": 4}, 120), node.log.read_text()
        pacs.stop()  # the next study's results cannot be delivered
        small = write_small_study(tmp_path / "small", waiting)
        assert all(r.ok for r in send_files(small, "127.0.0.1", node.port, "CADNODE"))
        assert wait_until(lambda: rows(node).get(waiting, {}).get("deliveries", {})
                          .get("pending") == 4, 120), node.log.read_text()
    finally:
        node.stop()

    # JSON lines: the job's lines carry its study and job; no patient identifiers
    lines = [json.loads(line) for line in node.log.read_text().splitlines()
             if line.startswith("{")]
    done = [x for x in lines if x["message"].startswith(f"study {delivered} done")]
    assert done and done[0]["study_uid"] == delivered and isinstance(done[0]["job_id"], int)
    header = pydicom.dcmread(demo_study[0], stop_before_pixels=True)
    text = node.log.read_text() + (home / "logs" / "cadnode.log").read_text()
    assert str(header.PatientID) not in text and str(header.PatientName) not in text

    spool, results = home / "spool", home / "results"
    assert (spool / delivered).is_dir() and (results / delivered).is_dir()
    dry = node.cli("purge", "--older-than", "0s", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    report = json.loads(dry.stdout)
    assert report["studies"] == [delivered] and report["kept"] == {"a delivery is pending": 1}
    assert report["files"] == 8 and report["bytes"] > 1_000_000
    assert (spool / delivered).is_dir()  # a dry run touches nothing

    # The scheduled retention runs when the node starts: the delivered study goes
    node = NodeProcess(home, node.port, {**FAST, "CADNODE_RETENTION_DAYS": "0.00001",  # 0.86 s
                                         "CADNODE_DESTINATIONS": node.env["CADNODE_DESTINATIONS"]})
    try:
        node.wait_ready()
        assert wait_until(lambda: not (spool / delivered).exists(), 60), node.log.read_text()
        assert not (results / delivered).exists()
        assert (spool / waiting).is_dir() and len(list((results / waiting).iterdir())) == 4
        assert set(rows(node)) == {waiting}
    finally:
        node.stop()
    with sqlite3.connect(home / "cadnode.db") as db:
        (message,) = db.execute("SELECT message FROM events WHERE kind = 'purge'").fetchone()
        left = db.execute("SELECT count(*) FROM instances").fetchone()[0]
    assert message.startswith("removed 1 study, 8 file(s)") and "1 kept: a delivery is " \
        "pending" in message
    assert left == 4  # the waiting study's four images
