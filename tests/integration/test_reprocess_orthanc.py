"""Re-processing end to end against a real PACS with its default settings.

Orthanc (``OverwriteInstances`` false, its default) keeps the first copy of a SOP Instance UID it
has seen. Orthanc pushes the images to a `cadnode serve` process, which sends its results back;
a late image reopens the study and the job runs again, so the new results must carry new SOP
Instance UIDs (and the SRs name the version they replace), or Orthanc would keep the stale
report while cadnode records "delivered".

The same run checks the logs a PACS admin reads: Orthanc's C-ECHO (which proposes query/retrieve
classes beside Verification) gives no warning, third-party INFO chatter stays out, and each
study stage is one INFO line.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pydicom
import pytest

from cadnode.demo import free_port
from tests.helpers import NodeProcess, wait_until
from tests.integration.orthanc import Orthanc, run_orthanc

pytestmark = pytest.mark.e2e

CAD_SR = "1.2.840.10008.5.1.4.1.1.88.50"
OBJECTS = 4  # CAD SR, TID 1500, SC, GSPS per run


def _push(orthanc: Orthanc, files: list[Path]) -> None:
    """The PACS receives the images (REST upload), then pushes them to the node (C-STORE)."""
    ids = [orthanc.request("/instances", p.read_bytes())["ID"] for p in files]
    body = json.dumps({"Resources": ids, "Synchronous": True}).encode()
    sent = orthanc.request("/modalities/cadnode/store", body)
    assert sent["InstancesCount"] == len(files), sent


def _cad_srs(orthanc: Orthanc, study_uid: str) -> list[pydicom.Dataset]:
    query = {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid, "SOPClassUID": CAD_SR}}
    found = orthanc.request("/tools/find", json.dumps(query).encode())
    return sorted((orthanc.dataset(i) for i in found), key=lambda ds: int(ds.InstanceNumber))


def _library(sr: pydicom.Dataset) -> set[str]:
    out: set[str] = set()

    def walk(items: pydicom.Sequence) -> None:
        for it in items:
            if it.get("ValueType") == "IMAGE":
                out.add(it.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            walk(it.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return out


def _texts(sr: pydicom.Dataset) -> str:
    out: list[str] = []

    def walk(items: pydicom.Sequence) -> None:
        for it in items:
            if it.get("ValueType") == "TEXT":
                out.append(str(it.TextValue))
            walk(it.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return "\n".join(out)


def test_a_late_image_gives_new_results_that_orthanc_keeps(demo_study: list[Path],
                                                           tmp_path: Path) -> None:
    node_port = free_port()
    with run_orthanc(tmp_path, {"cadnode": ["CADNODE", "127.0.0.1", node_port]}) as orthanc:
        node = NodeProcess(tmp_path / "node", node_port, {
            "CADNODE_DESTINATIONS": f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",
            "CADNODE_STABLE_SECONDS": "2", "CADNODE_COMPLETE_SECONDS": "1",
            "CADNODE_POLL_SECONDS": "0.2",
        })
        try:
            node.wait_ready()
            assert orthanc.request("/modalities/cadnode/echo", b"{}") == {}  # a real C-ECHO
            study_uid = str(pydicom.dcmread(demo_study[0], stop_before_pixels=True)
                            .StudyInstanceUID)
            lcc, lmlo, rcc, rmlo = demo_study

            # first the two CC views: after the quiet period, a partial report
            _push(orthanc, [lcc, rcc])
            assert wait_until(lambda: orthanc.count_instances() == 2 + OBJECTS, 90), \
                node.log.read_text()
            (first,) = _cad_srs(orthanc, study_uid)
            assert "INCOMPLETE EXAM" in _texts(first) and "L-MLO missing" in _texts(first)

            # the late MLO views reopen the study: new objects, new UIDs, all kept by Orthanc
            _push(orthanc, [lmlo, rmlo])
            assert wait_until(lambda: orthanc.count_instances() == 4 + 2 * OBJECTS, 90), \
                node.log.read_text()
            old, new = _cad_srs(orthanc, study_uid)
            assert old.SOPInstanceUID == first.SOPInstanceUID
            assert new.SOPInstanceUID != old.SOPInstanceUID
            assert new.SeriesInstanceUID == old.SeriesInstanceUID  # one CAD SR series
            assert (int(old.InstanceNumber), int(new.InstanceNumber)) == (1, 2)
            sources = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                       for p in demo_study}
            assert _library(new) == sources and len(_library(old)) == 2
            assert "INCOMPLETE" not in _texts(new)
            (pred,) = new.PredecessorDocumentsSequence
            (series,) = pred.ReferencedSeriesSequence
            assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == old.SOPInstanceUID

            jobs = node.cli("jobs", "--json")
            assert '"state": "done"' in jobs.stdout, jobs.stdout + jobs.stderr
        finally:
            node.stop()
    log = node.log.read_text(errors="replace")
    assert "sent nothing we accept" not in log, log
    third_party = [line for line in log.splitlines()
                   if re.search(r" (INFO|DEBUG) (highdicom|pydicom|pynetdicom|apscheduler)", line)]
    assert not third_party, third_party[:5]
    stages = [line for line in log.splitlines()
              if f"study {study_uid}" in line and " INFO " in line]
    assert any(" queued: " in line for line in stages), stages
    assert any(" done-partial: read L-CC,R-CC; missing L-MLO,R-MLO" in line for line in stages)
    assert any(" done: read L-CC,L-MLO,R-CC,R-MLO" in line for line in stages), stages
