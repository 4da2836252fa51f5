"""The TID 1500 Measurement Report content: one measurement group per finding and scope.

Groups (TID 1501 / TID 1410), each with its own tracking identifier (a readable label plus a
UID derived like the object UIDs, so re-processing keeps them):

- per analysed view: "Selected region" with "Probability of cancer" in % - a Planar ROI group
  (TID 1410) whose Image Region is the closed outline (SCOORD POLYLINE on the source image's
  pixel grid) when the score reaches the cancer operating threshold, else an image-level group
  that says no region is marked; and an image-level group "Calcification Cluster" with
  "Certainty of Finding" in %, which says that the model gives it no location. Each carries a
  TEXT row naming the image read (and why) and the score against its threshold;
- per breast and for the exam: the same two scores, image-level groups over the views used;
- per failed view: an image-level group with the qualitative evaluation "Summary of
  Detections = Failed" and a TEXT qualitative evaluation with the one-line reason;
- "Exam completeness" (when anything was missing or passed over): Summary of Analyses =
  Partially Succeeded (or Succeeded when only extra images were passed over) and one TEXT row
  per missing view and per received image that was not analysed, with why;
- a view unlike the model's training images: its groups (and the breast and exam groups built
  from it) carry a TEXT row "outside the model's validated domain: <reasons>".

Every group carries the finding site (breast, with laterality) and the algorithm
identification (TID 4019: model name, version, and "demonstration model - not for clinical
use" as its parameter for demo models). The observer is the model, as a device (TID 1004).
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from cadnode.results.common import (
    CALCIFICATION_NO_LOCATION,
    DEMO_TEXT,
    MANUFACTURER,
    NO_REGION,
    PERCENT,
    cancer_label,
    completeness_lines,
    domain_scope_text,
    domain_text,
    percent,
    read_line,
    score_phrase,
)
from cadnode.results.findings import StudyFindings, ViewFinding
from cadnode.results.uids import derive_uid, tracking_uid

CANCER_FINDING = codes.DCM.SelectedRegion  # as in the CAD SR: a suspicious region, no lesion type
CALC_FINDING = codes.SCT.CalcificationCluster
CANCER_SCORE = codes.DCM.ProbabilityOfCancer
CALC_SCORE = codes.DCM.CertaintyOfFinding
PROCEDURE = codes.SCT.Mammography
QUALITATIVE_TEXT = Code("C0034375", "UMLS", "Qualitative Evaluations")  # TID 1501 TEXT row
LATERALITY = {"R": codes.SCT.Right, "L": codes.SCT.Left, "B": codes.SCT.Bilateral}

Group = (
    hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
)


def algorithm_id(findings: StudyFindings) -> hd.sr.AlgorithmIdentification:
    """TID 4019 Algorithm Identification; the demo statement goes into its parameters."""
    return hd.sr.AlgorithmIdentification(
        name=findings.model_name,
        version=findings.model_version,
        parameters=[DEMO_TEXT] if findings.demo_model else None,
    )


def observer_context(findings: StudyFindings, uid_root: str) -> hd.sr.ObservationContext:
    """TID 1001 with a device observer (TID 1004): the model made these observations."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derive_uid(uid_root, "device", findings.model_name, findings.model_version),
        name=f"{findings.model_name} {findings.model_version}"[:64],
        manufacturer_name=MANUFACTURER,
        model_name=findings.model_name[:64],
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )


def _site(side: str) -> list[hd.sr.FindingSite]:
    if side not in LATERALITY:
        return [hd.sr.FindingSite(codes.SCT.Breast)]
    return [hd.sr.FindingSite(codes.SCT.Breast, laterality=LATERALITY[side])]


def _tracking(uid_root: str, findings: StudyFindings, label: str) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(
        uid=tracking_uid(uid_root, findings.study_uid, findings.model_version, label),
        identifier=label[:64],
    )


def _score(name: Code, p: float) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=name, value=percent(p), unit=PERCENT)


def _sources(views: Sequence[ViewFinding]) -> list[hd.sr.SourceImageForMeasurementGroup]:
    return [
        hd.sr.SourceImageForMeasurementGroup(v.sop_class_uid, v.sop_instance_uid) for v in views
    ]


def _outline(v: ViewFinding) -> np.ndarray:
    """Closed polygon clipped to the image (0..Columns, 0..Rows), as in the CAD SR."""
    pts = np.asarray(v.outline, dtype=np.float64).reshape(-1, 2)
    if tuple(pts[0]) != tuple(pts[-1]):
        pts = np.vstack([pts, pts[:1]])
    pts[:, 0] = np.clip(pts[:, 0], 0.0, float(v.columns))
    pts[:, 1] = np.clip(pts[:, 1], 0.0, float(v.rows))
    return pts.astype(np.float32)


def _image_group(
    uid_root: str, findings: StudyFindings, label: str, finding: Code | None, side: str,
    views: Sequence[ViewFinding], measurements: list[hd.sr.Measurement] | None = None,
    evaluations: list[hd.sr.QualitativeEvaluation] | None = None,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(uid_root, findings, label),
        finding_type=finding,
        algorithm_id=algorithm_id(findings),
        finding_sites=_site(side),
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=_sources(views) or None,
    )


def _text_item(value: str) -> hd.sr.TextContentItem:
    """A TEXT qualitative evaluation row (TID 1501), for statements without a code."""
    return hd.sr.TextContentItem(
        name=QUALITATIVE_TEXT, value=value[:1024],
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )


def _view_groups(uid_root: str, findings: StudyFindings, v: ViewFinding) -> list[Group]:
    """The cancer region (ROI) and calcification (image-level) groups of one analysed view;
    the region only where the score reaches the operating threshold."""
    groups: list[Group] = []
    label = cancer_label(v)
    cancer = [_score(CANCER_SCORE, float(v.cancer or 0.0))]
    t = findings.thresholds
    statement = (f"{read_line(v)}; "
                 + score_phrase("cancer suspicion", float(v.cancer or 0.0), t.get("cancer")))
    domain = [_text_item(domain_text(v))] if v.outside_domain else []
    if v.marked(t) and len(v.outline) >= 3:
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=_outline(v),
            source_image=hd.sr.SourceImageForRegion(v.sop_class_uid, v.sop_instance_uid),
        )
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(uid_root, findings, label),
            referenced_region=region,
            finding_type=CANCER_FINDING,
            algorithm_id=algorithm_id(findings),
            finding_sites=_site(v.laterality),
            measurements=cancer,
        ))
        groups[-1][0].ContentSequence.extend([_text_item(statement), *domain])
    else:  # below the threshold (or not localised): the score still belongs to the image
        groups.append(_image_group(
            uid_root, findings, label, CANCER_FINDING, v.laterality, [v], cancer
        ))
        groups[-1][0].ContentSequence.extend([_text_item(f"{statement}; {NO_REGION}"),
                                              *domain])
    if v.calcification is not None:
        groups.append(_image_group(
            uid_root, findings, f"{v.view_key} calcification", CALC_FINDING, v.laterality, [v],
            [_score(CALC_SCORE, float(v.calcification))],
        ))
        groups[-1][0].ContentSequence.append(_text_item(
            score_phrase("calcification", float(v.calcification), t.get("calcification"))
            + f"; {CALCIFICATION_NO_LOCATION}"))
        groups[-1][0].ContentSequence.extend(domain)
    return groups


def _failed_group(
    uid_root: str, findings: StudyFindings, v: ViewFinding
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """A failed view: no measurements, a coded "Failed" and the reason as text."""
    group = _image_group(
        uid_root, findings, f"{v.view_key} not analysed", None, v.laterality, [v],
        evaluations=[hd.sr.QualitativeEvaluation(codes.DCM.SummaryOfDetections,
                                                 codes.DCM.Failed)],
    )
    group[0].ContentSequence.append(_text_item(
        f"{v.view_key} not analysed: {v.error or 'no score'}"))
    return group


def _completeness_group(
    uid_root: str, findings: StudyFindings
) -> hd.sr.MeasurementsAndQualitativeEvaluations | None:
    """Exam level: what is missing and what was received but not analysed, and why."""
    lines = completeness_lines(findings)
    if not lines:
        return None
    status = codes.DCM.PartiallySucceeded if findings.incomplete else codes.DCM.Succeeded
    group = _image_group(
        uid_root, findings, "Exam completeness", None, "B", [],
        evaluations=[hd.sr.QualitativeEvaluation(codes.DCM.SummaryOfAnalyses, status)],
    )
    for line in lines:
        group[0].ContentSequence.append(_text_item(line))
    return group


def _scope_groups(
    uid_root: str, findings: StudyFindings, label: str, side: str, scores: dict[str, float],
    views: Sequence[ViewFinding],
) -> list[Group]:
    groups: list[Group] = []
    if not views:
        return groups
    if "cancer" in scores:
        groups.append(_image_group(
            uid_root, findings, f"{label} cancer suspicion", CANCER_FINDING, side, views,
            [_score(CANCER_SCORE, scores["cancer"])],
        ))
    if "calcification" in scores:
        groups.append(_image_group(
            uid_root, findings, f"{label} calcification", CALC_FINDING, side, views,
            [_score(CALC_SCORE, scores["calcification"])],
        ))
    if any(v.outside_domain for v in views):
        for group in groups:
            group[0].ContentSequence.append(_text_item(domain_scope_text(views)))
    return groups


def measurement_groups(findings: StudyFindings, uid_root: str) -> list[Group]:
    """All groups, in reading order: views, then breasts, then the exam."""
    ok = [v for v in findings.views if not v.failed]
    groups: list[Group] = []
    for v in findings.views:
        if v.failed:
            groups.append(_failed_group(uid_root, findings, v))
        else:
            groups.extend(_view_groups(uid_root, findings, v))
    for side in ("R", "L"):
        side_ok = [v for v in ok if v.laterality == side]
        groups.extend(_scope_groups(
            uid_root, findings, f"{side} breast", side, findings.breasts.get(side, {}), side_ok
        ))
    groups.extend(_scope_groups(uid_root, findings, "Exam", "B", findings.exam, ok))
    completeness = _completeness_group(uid_root, findings)
    if completeness is not None:
        groups.append(completeness)
    return groups


def measurement_report(
    findings: StudyFindings, uid_root: str, library: Sequence[object] | None = None
) -> hd.sr.MeasurementReport:
    """The TID 1500 root: observer context, procedure, image library and the groups."""
    return hd.sr.MeasurementReport(
        observation_context=observer_context(findings, uid_root),
        procedure_reported=PROCEDURE,
        imaging_measurements=measurement_groups(findings, uid_root),
        referenced_images=list(library) if library else None,  # type: ignore[arg-type]
    )
