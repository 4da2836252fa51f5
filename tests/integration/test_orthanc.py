"""A real PACS receives the four result objects: Orthanc (Debian package) on loopback.

The test starts its own Orthanc with a throw-away storage, sends the four source images and the
four result objects with the node's own storage SCU (``send_files``, as the outbox does), and
checks through Orthanc's REST API that all of them are filed in the source study, each result
object in its own new series. Skips only when the Orthanc binary is absent; fails instead under
CI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from cadnode.demo import free_port, stop_process
from cadnode.dicom.sender import send_files
from cadnode.results import BUILDERS
from tests.unit.test_results import ROOT, _findings

ORTHANC = "/usr/sbin/Orthanc"
MODALITY = {"cad_sr": "SR", "tid1500": "SR", "sc": "OT", "gsps": "PR"}


class _Orthanc:
    def __init__(self, http_port: int, dicom_port: int, proc: subprocess.Popen[bytes],
                 log: Path) -> None:
        self.http_port, self.dicom_port, self.proc, self.log = http_port, dicom_port, proc, log

    def get(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - loopback only
            return json.loads(resp.read().decode("utf-8"))


def _wait_for_rest(orthanc: _Orthanc, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if orthanc.proc.poll() is not None:
            raise RuntimeError("Orthanc exited:\n" + orthanc.log.read_text(errors="replace"))
        try:
            orthanc.get("/system")
            return
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.2)
    raise TimeoutError("Orthanc REST API did not come up:\n" + orthanc.log.read_text(
        errors="replace"))


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[_Orthanc]:
    """A fresh Orthanc on loopback, stopped (and its storage dropped) afterwards."""
    if not os.path.exists(ORTHANC):
        if os.environ.get("CI"):
            pytest.fail(f"{ORTHANC} not installed (Debian package orthanc)")
        pytest.skip(f"{ORTHANC} not installed (Debian package orthanc)")
    http_port, dicom_port = free_port(), free_port()
    while dicom_port == http_port:
        dicom_port = free_port()
    config = {
        "Name": "cadnode-test",
        "StorageDirectory": str(tmp_path / "orthanc-storage"),
        "IndexDirectory": str(tmp_path / "orthanc-index"),
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "Plugins": [],
    }
    cfg = tmp_path / "orthanc.json"
    cfg.write_text(json.dumps(config, indent=2), encoding="utf-8")
    log = tmp_path / "orthanc.log"
    fh = open(log, "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen([ORTHANC, str(cfg)], stdout=fh, stderr=subprocess.STDOUT,
                            cwd=tmp_path)
    server = _Orthanc(http_port, dicom_port, proc, log)
    try:
        _wait_for_rest(server)
        yield server
    finally:
        stop_process(proc)
        fh.close()
        shutil.rmtree(tmp_path / "orthanc-storage", ignore_errors=True)


def test_orthanc_files_all_four_results_in_the_source_study(
    orthanc: _Orthanc, demo_study: list[Path], tmp_path: Path
) -> None:
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in demo_study]
    study_uid = str(headers[0].StudyInstanceUID)
    findings = _findings(headers, failed=None, with_pixels=True)
    results: dict[str, pydicom.Dataset] = {}
    paths = list(demo_study)
    for kind, build in BUILDERS.items():
        ds = build(findings, headers, ROOT)
        path = tmp_path / f"{kind}.dcm"
        ds.save_as(path, enforce_file_format=True)
        results[kind] = ds
        paths.append(path)

    sent = send_files(paths, "127.0.0.1", orthanc.dicom_port, "ORTHANC", timeout=30)
    assert [r.status for r in sent] == [0] * len(paths), [(r.path.name, r.error) for r in sent]

    studies = [orthanc.get(f"/studies/{sid}") for sid in orthanc.get("/studies")]
    assert [s["MainDicomTags"]["StudyInstanceUID"] for s in studies] == [study_uid]
    study = studies[0]
    series = {}
    for sid in study["Series"]:
        info = orthanc.get(f"/series/{sid}")
        series[info["MainDicomTags"]["SeriesInstanceUID"]] = info
    source_series = {str(h.SeriesInstanceUID) for h in headers}
    result_series = {str(ds.SeriesInstanceUID) for ds in results.values()}
    assert len(result_series) == 4 and not result_series & source_series
    assert set(series) == source_series | result_series
    for kind, ds in results.items():
        info = series[str(ds.SeriesInstanceUID)]
        assert info["MainDicomTags"]["Modality"] == MODALITY[kind], kind
        (instance,) = info["Instances"]
        tags = orthanc.get(f"/instances/{instance}/tags?simplify")
        assert tags["SOPInstanceUID"] == str(ds.SOPInstanceUID), kind
        assert tags["SOPClassUID"] == str(ds.SOPClassUID), kind
        assert tags["StudyInstanceUID"] == study_uid
        assert tags["PatientID"] == str(headers[0].PatientID)
        assert tags["AccessionNumber"] == str(headers[0].AccessionNumber)

    # re-built objects carry the same UIDs: the PACS files them as the same instances (Orthanc
    # keeps one copy; with OverwriteInstances it replaces it), never as duplicates
    again = [tmp_path / f"again-{kind}.dcm" for kind in BUILDERS]
    for (_kind, build), path in zip(BUILDERS.items(), again, strict=True):
        build(findings, headers, ROOT).save_as(path, enforce_file_format=True)
    assert all(r.ok for r in send_files(again, "127.0.0.1", orthanc.dicom_port, "ORTHANC"))
    stats = orthanc.get(f"/studies/{study['ID']}/statistics")
    assert int(stats["CountInstances"]) == len(paths)
    assert int(stats["CountSeries"]) == len(source_series) + 4
