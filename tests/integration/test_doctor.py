"""`cadnode doctor` against real peers (DCMTK storescp answering, a port nobody answers, a
running node), and `cadnode send` to a storescp that takes no mammograms."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cadnode.demo import free_port
from cadnode.jobs.schema import head
from tests.helpers import NodeProcess, port_answers, require, wait_until

#: A storescp profile that takes CT images (and C-ECHO) only, uncompressed.
CT_ONLY = """\
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = LittleEndianImplicit

[[PresentationContexts]]
[CTOnly]
PresentationContext1 = CTImageStorage\\Uncompressed
PresentationContext2 = VerificationSOPClass\\Uncompressed

[[Profiles]]
[CTOnly]
PresentationContexts = CTOnly
"""


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[int]:
    """DCMTK's storescp taking only CT images: answers C-ECHO, refuses mammograms."""
    require("storescp")
    (tmp_path / "ct.cfg").write_text(CT_ONLY)
    (tmp_path / "received").mkdir()
    port = free_port()
    proc = subprocess.Popen(["storescp", "-xf", str(tmp_path / "ct.cfg"), "CTOnly",
                             "-od", str(tmp_path / "received"), str(port)],
                            env={**os.environ, "TCP_NODELAY": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: port_answers(port) or proc.poll() is not None, 20)
        assert proc.poll() is None, "storescp did not start"
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def cadnode(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {"PATH": os.environ["PATH"], "CADNODE_HOME": str(tmp_path / "home"),
            "CADNODE_PORT": "0", "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-m", "cadnode", *args], env=full, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


def test_doctor_echoes_every_destination(tmp_path: Path, storescp: int) -> None:
    nobody = free_port()
    dests = f"STORESCP@127.0.0.1:{storescp},GONE@127.0.0.1:{nobody}"
    r = cadnode(tmp_path, "doctor", "--timeout", "3", CADNODE_DESTINATIONS=dests)
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert f"OK   destination STORESCP@127.0.0.1:{storescp}: answers C-ECHO" in lines
    (gone,) = [line for line in lines if line.startswith("FAIL destination GONE@")]
    assert f"cannot connect GONE@127.0.0.1:{nobody} -> start the peer" in gone
    assert "OK   backend: onnxruntime (CPUExecutionProvider)" in lines
    assert any(line.startswith("WARN database: no job database yet") for line in lines)
    assert lines[-1] == "11 check(s): 1 failed, 2 warning(s)"
    assert "Traceback" not in r.stdout + r.stderr
    assert not (tmp_path / "home").exists()  # a doctor changes nothing

    r = cadnode(tmp_path, "doctor", "--json", CADNODE_DESTINATIONS=f"SCP@127.0.0.1:{storescp}")
    assert r.returncode == 0, r.stdout
    checks = json.loads(r.stdout)
    assert {c["status"] for c in checks} <= {"OK", "WARN"}
    assert {"check": f"destination SCP@127.0.0.1:{storescp}", "status": "OK",
            "detail": "answers C-ECHO", "fix": ""} in checks


def test_doctor_beside_a_running_node_and_a_broken_package(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "home", 0, {"OMP_NUM_THREADS": "1"})
    try:
        node.wait_ready()
        r = cadnode(tmp_path, "doctor", CADNODE_PORT=str(node.port))
        assert r.returncode == 0, r.stdout + r.stderr
        assert (f"OK   listener port: 0.0.0.0:{node.port}: a node answers C-ECHO as CADNODE "
                "(this node is running)") in r.stdout
        assert "OK   database: sqlite:///" in r.stdout and f"schema {head()}" in r.stdout
    finally:
        node.stop()
    pkg = tmp_path / "pkg"
    import shutil

    from cadnode.runtime import DEFAULT_MODEL_PACKAGE

    shutil.copytree(DEFAULT_MODEL_PACKAGE, pkg)
    with (pkg / "model.onnx").open("r+b") as fh:
        fh.truncate(1000)
    r = cadnode(tmp_path, "doctor", CADNODE_MODEL=str(pkg), CADNODE_MIN_FREE_MB="100000000")
    assert r.returncode == 1
    assert (f"FAIL model package: model package {pkg}: checksum mismatch for model.onnx"
            in r.stdout)
    assert "FAIL free space:" in r.stdout and "cadnode purge" in r.stdout


def test_send_to_a_peer_that_takes_no_mammograms(tmp_path: Path, storescp: int,
                                                 demo_study: list[Path]) -> None:
    r = cadnode(tmp_path, "send", "--port", str(storescp), "--called-aet", "STORESCP",
                *map(str, demo_study))
    assert r.returncode == 1
    assert r.stderr.strip() == (
        f"cadnode send: STORESCP@127.0.0.1:{storescp} accepted the association but no "
        "presentation context: it does not take SOP class Digital Mammography X-Ray Image "
        "Storage - For Presentation (1.2.840.10008.5.1.4.1.1.1.2) in RLE Lossless "
        "(1.2.840.10008.1.2.5)")
    assert "timed out" not in r.stderr


def test_send_names_the_files_the_peer_takes_no_context_for(tmp_path: Path, storescp: int,
                                                            demo_study: list[Path]) -> None:
    """One CT image it takes and one mammogram it does not, in one association."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    ct = Dataset()
    ct.file_meta = FileMetaDataset()
    ct.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ct.file_meta.MediaStorageSOPClassUID = ct.SOPClassUID = CTImageStorage
    ct.file_meta.MediaStorageSOPInstanceUID = ct.SOPInstanceUID = generate_uid()
    ct.StudyInstanceUID, ct.SeriesInstanceUID = generate_uid(), generate_uid()
    ct.Modality, ct.PatientID = "CT", "X"
    ct.save_as(tmp_path / "ct.dcm", enforce_file_format=True)
    r = cadnode(tmp_path, "send", "--port", str(storescp), "--called-aet", "STORESCP",
                str(tmp_path / "ct.dcm"), str(demo_study[0]))
    assert r.returncode == 1, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"0x0000  {tmp_path / 'ct.dcm'}"
    assert lines[1] == (f"-  {demo_study[0]}  not sent: STORESCP accepted no presentation "
                        "context for SOP class Digital Mammography X-Ray Image Storage - For "
                        "Presentation (1.2.840.10008.5.1.4.1.1.1.2) in RLE Lossless "
                        "(1.2.840.10008.1.2.5)")
    assert lines[2] == "sent 1 of 2 file(s)"
