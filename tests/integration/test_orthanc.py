"""A real PACS receives the four result objects: Orthanc (Debian package) on loopback.

The test starts its own Orthanc with a throw-away storage, sends the four source images and the
four result objects with the node's own storage SCU (``send_files``, as the outbox does), and
checks through Orthanc's REST API that all of them are filed in the source study, each result
object in its own new series. Skips only when the Orthanc binary is absent; fails instead under
CI.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from cadnode.dicom.sender import send_files
from cadnode.results import BUILDERS
from tests.integration.orthanc import Orthanc, run_orthanc
from tests.unit.test_results import ROOT, _findings

MODALITY = {"cad_sr": "SR", "tid1500": "SR", "sc": "OT", "gsps": "PR"}


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    with run_orthanc(tmp_path) as server:
        yield server


def test_orthanc_files_all_four_results_in_the_source_study(
    orthanc: Orthanc, demo_study: list[Path], tmp_path: Path
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
