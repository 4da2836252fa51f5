"""The Mammography CAD SR IOD: header modules around the TID 4000 content tree."""

from __future__ import annotations

import datetime
from collections.abc import Sequence

from pydicom import Dataset

from cadnode import __version__
from cadnode.results.cad_sr.content import content_dataset
from cadnode.results.common import (
    MANUFACTURER,
    contributing_equipment,
    copy_patient_study,
    file_meta,
    hierarchical_references,
    predecessor_documents,
    referenced_series,
)
from cadnode.results.enum import ResultKind
from cadnode.results.findings import StudyFindings
from cadnode.results.uids import DEFAULT_UID_ROOT, result_identity

MAMMOGRAPHY_CAD_SR = "1.2.840.10008.5.1.4.1.1.88.50"
KIND = ResultKind.CAD_SR
SERIES_NUMBER = 9001


def build_cad_sr(
    findings: StudyFindings, sources: Sequence[Dataset], uid_root: str = DEFAULT_UID_ROOT
) -> Dataset:
    """Build the Mammography CAD SR for ``findings`` in a new series of the source study."""
    if not sources:
        raise ValueError("build_cad_sr needs at least one source header (patient/study)")
    first = sources[0]
    identity = result_identity(uid_root, findings, KIND)
    series_uid, sop_uid = identity.series_uid, identity.sop_instance_uid
    now = datetime.datetime.now()

    ds = Dataset()
    ds.file_meta = file_meta(MAMMOGRAPHY_CAD_SR, sop_uid)
    ds.preamble = b"\x00" * 128
    copy_patient_study(ds, first, findings.study_uid)
    # SOP Common
    ds.SOPClassUID = MAMMOGRAPHY_CAD_SR
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    # SR Document Series
    ds.Modality = "SR"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = SERIES_NUMBER
    ds.SeriesDescription = "CAD SR " + ("(DEMO MODEL)" if findings.demo_model else "cadnode")
    ds.ReferencedPerformedProcedureStepSequence = []
    # General Equipment: this node; the model goes to Contributing Equipment
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MANUFACTURER
    ds.SoftwareVersions = [__version__, f"{findings.model_name} {findings.model_version}"[:64]]
    ds.ContributingEquipmentSequence = [contributing_equipment(findings)]
    # SR Document General
    ds.InstanceNumber = identity.instance_number
    ds.ContentDate = ds.InstanceCreationDate
    ds.ContentTime = ds.InstanceCreationTime
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.PerformedProcedureCodeSequence = []
    if identity.predecessor is not None:
        ds.PredecessorDocumentsSequence = predecessor_documents(identity.predecessor,
                                                                findings.study_uid)
    ds.CurrentRequestedProcedureEvidenceSequence = hierarchical_references(
        referenced_series(sources, findings.views, findings.study_uid)
    )
    # SR Document Content: the root item's attributes live in the top-level dataset
    for elem in content_dataset(findings, sources):
        ds.add(elem)
    return ds
