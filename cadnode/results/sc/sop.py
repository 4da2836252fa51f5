"""The Secondary Capture IOD around the montage: identity, references, burned-in flags."""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from cadnode import __version__
from cadnode.results.common import (
    MANUFACTURER,
    contributing_equipment,
    copy_patient_study,
    domain_text,
    hierarchical_references,
    referenced_series,
    result_character_set,
)
from cadnode.results.enum import ResultKind
from cadnode.results.findings import StudyFindings
from cadnode.results.sc.content import BANNER_TEXT, render_montage
from cadnode.results.uids import DEFAULT_UID_ROOT, result_identity

KIND = ResultKind.SC
SERIES_NUMBER = 9002


def build_secondary_capture(
    findings: StudyFindings, sources: Sequence[Dataset], uid_root: str = DEFAULT_UID_ROOT
) -> Dataset:
    """Build the SC montage in a new series of the source study, referencing its sources."""
    if not sources:
        raise ValueError("build_secondary_capture needs at least one source header")
    first = sources[0]
    identity = result_identity(uid_root, findings, KIND)
    series_uid, sop_uid = identity.series_uid, identity.sop_instance_uid
    pixels = render_montage(findings)
    sc = hd.sc.SCImage(
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        study_instance_uid=findings.study_uid,
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=identity.instance_number,
        manufacturer=MANUFACTURER,
        patient_orientation=("R", "F"),  # replaced below: a montage has no single orientation
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=(
            "CAD montage (DEMO MODEL)" if findings.demo_model else "CAD montage cadnode"
        ),
        manufacturer_model_name=MANUFACTURER,
        software_versions=__version__,
        specific_character_set=result_character_set(first),
    )
    copy_patient_study(sc, first, findings.study_uid)
    sc.PatientOrientation = None  # type: ignore[assignment]  # Type 2C: present, empty (views of both sides side by side)
    sc.BodyPartExamined = "BREAST"
    sc.Laterality = None  # type: ignore[assignment]  # Type 2C for a paired organ; both breasts are shown, so empty
    sc.BurnedInAnnotation = "YES"
    sc.RecognizableVisualFeatures = "NO"
    sc.LossyImageCompression = "00"
    sc.ContributingEquipmentSequence = [contributing_equipment(findings)]  # type: ignore[list-item]
    sc.DerivationDescription = (
        f"CAD montage R-CC L-CC R-MLO L-MLO, heatmap overlay, {findings.model_name} "
        f"{findings.model_version}" + (" - DEMONSTRATION MODEL" if findings.demo_model else "")
    )[:1024]
    comments = [BANNER_TEXT] if findings.demo_model else []
    comments += [f"{v.view_key} {domain_text(v)}" for v in findings.views
                 if v.outside_domain and not v.failed]  # what the pixels say, as text too
    if comments:
        sc.ImageComments = "\r\n".join(comments)[:10240]
    purpose = codes.DCM.SourceImageForImageProcessingOperation
    refs = referenced_series(sources, findings.views, findings.study_uid)
    sc.SourceImageSequence = []
    for series in refs.values():
        for instances in series.values():
            for cls, inst in instances:
                item = Dataset()
                item.ReferencedSOPClassUID = cls
                item.ReferencedSOPInstanceUID = inst
                code = Dataset()
                code.CodeValue = purpose.value
                code.CodingSchemeDesignator = purpose.scheme_designator
                code.CodeMeaning = purpose.meaning
                item.PurposeOfReferenceCodeSequence = [code]
                sc.SourceImageSequence.append(item)
    # Common Instance Reference: where the referenced instances live (study/series)
    same = {k: v for k, v in refs.items() if k == findings.study_uid}
    other = {k: v for k, v in refs.items() if k != findings.study_uid}
    if same:
        sc.ReferencedSeriesSequence = [
            _series_item(s) for s in hierarchical_references(same)[0].ReferencedSeriesSequence
        ]
    if other:
        sc.StudiesContainingOtherReferencedInstancesSequence = [
            _other_study_item(st) for st in hierarchical_references(other)
        ]
    return sc


def _series_item(series: Dataset) -> Dataset:
    """Hierarchical series item -> Common Instance Reference series item (other keyword)."""
    item = Dataset()
    item.SeriesInstanceUID = series.SeriesInstanceUID
    item.ReferencedInstanceSequence = series.ReferencedSOPSequence
    return item


def _other_study_item(study: Dataset) -> Dataset:
    item = Dataset()
    item.StudyInstanceUID = study.StudyInstanceUID
    item.ReferencedSeriesSequence = [_series_item(s) for s in study.ReferencedSeriesSequence]
    return item
