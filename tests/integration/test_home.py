"""The node's home under a service manager: started from / with a relative CADNODE_HOME, then
moved and restarted from another directory.

Before: the home stayed relative, so under systemd (working directory /) the spool became
``/var/spool``, and paths stored relative to the working directory dangled after a restart
from elsewhere (jobs then failed with a misleading "no standard view"). Now the home is made
absolute once at start-up, and the database stores paths relative to it.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pydicom

from cadnode.demo import DemoPACS
from cadnode.dicom.sender import send_files
from tests.helpers import NodeProcess, wait_until

FAST = {"CADNODE_COMPLETE_SECONDS": "1", "CADNODE_POLL_SECONDS": "0.5"}


def _rows(node: NodeProcess) -> list[dict]:  # type: ignore[type-arg]
    r = node.cli("jobs", "--json")
    return json.loads(r.stdout) if r.returncode == 0 else []


def test_relative_home_from_root_then_moved(demo_study: list[Path], tmp_path: Path) -> None:
    pacs = DemoPACS(tmp_path / "pacs", ae_title="PACS")
    pacs_port = pacs.start()
    dest = {"CADNODE_DESTINATIONS": f"PACS@127.0.0.1:{pacs_port}", **FAST}
    first_home = tmp_path / "node"
    node = NodeProcess(first_home, 0, {"CADNODE_HOME": str(first_home.relative_to("/")),
                                       **dest}, cwd=Path("/"))
    try:
        node.wait_ready()
        assert all(r.ok for r in send_files(demo_study, "127.0.0.1", node.port, "CADNODE"))
        assert pacs.wait_for(4, 120), node.log.read_text()
        assert wait_until(lambda: _rows(node)[0]["deliveries"] == {"sent": 4}, 30)
    finally:
        node.stop()
        pacs.stop()
    assert len(list((first_home / "spool").glob("*/*.dcm"))) == 4  # under the home, not /var
    with sqlite3.connect(first_home / "cadnode.db") as con:
        paths = [p for (p,) in con.execute("SELECT path FROM instances")]
    assert paths and all(p.startswith("spool/") for p in paths), paths

    moved = tmp_path / "elsewhere" / "node"
    moved.parent.mkdir()
    shutil.move(first_home, moved)
    node = NodeProcess(moved, 0, {"CADNODE_HOME": "node", **dest}, cwd=moved.parent)
    late = tmp_path / "late.dcm"  # a repeat L-CC: the study reopens, every image is read again
    ds = pydicom.dcmread(demo_study[0])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(late, enforce_file_format=True)
    try:
        node.wait_ready()
        assert all(r.ok for r in send_files([late], "127.0.0.1", node.port, "CADNODE"))

        def second_run_done() -> bool:
            rows = _rows(node)
            return bool(rows) and rows[0]["job"]["id"] == 2 and rows[0]["state"] == "done"

        assert wait_until(second_run_done, 120), node.log.read_text()
        job = _rows(node)[0]["job"]
        assert job["error"] is None
        assert job["views_used"] == ["L-CC", "L-MLO", "R-CC", "R-MLO"]  # the moved files read
    finally:
        node.stop()
