"""The Mammography CAD SR content tree (TID 4000), as plain pydicom datasets.

highdicom has no TID 4000 builder, so the tree is assembled from highdicom content items and
written out as plain datasets, because TID 4021 (geometry) needs by-reference relationships
(R-SELECTED FROM the Image Library entry) that highdicom's content item classes cannot express.
See the package docstring for the tree's shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from cadnode.dicom.views import orientation_directions
from cadnode.results.common import (
    BREAST_NAME,
    CALCIFICATION_NO_LOCATION,
    DEMO_TEXT,
    NO_REGION,
    PERCENT,
    SIDE,
    VIEW,
    clean_code,
    completeness_lines,
    domain_scope_text,
    domain_summary,
    domain_text,
    percent,
    plain,
    read_line,
    score_phrase,
)
from cadnode.results.findings import StudyFindings, ViewFinding

# Codes (DCM unless stated); taken from pydicom's dictionary so meanings match PS3.16.
_DCM = codes.DCM
MM = codes.UCUM.Millimeter
CANCER_FINDING = _DCM.SelectedRegion  # CID 6014/6016: the model localises "a suspicious region"
CALC_FINDING = codes.SCT.CalcificationCluster
DOMAIN_NOTE = _DCM.Comment  # TEXT next to a score: the image is unlike the training images
REQUIRED = _DCM.PresentationRequiredRenderingDeviceIsExpectedToPresent
OPTIONAL = _DCM.PresentationOptionalRenderingDeviceMayPresent


# ---------------------------------------------------------------------------------------------
# A small tree that can hold by-reference relationships.


@dataclass
class _Node:
    item: Dataset
    children: list[_Node | _Ref] = field(default_factory=list)

    def add(self, child: _Node | _Ref) -> _Node | _Ref:
        self.children.append(child)
        return child


@dataclass
class _Ref:
    relationship: str
    target: _Node


def _code(name: Code, value: Code, rel: str) -> _Node:
    return _Node(hd.sr.CodeContentItem(clean_code(name), clean_code(value), relationship_type=rel))


def _text(name: Code, value: str, rel: str) -> _Node:
    return _Node(hd.sr.TextContentItem(clean_code(name), value, relationship_type=rel))


def _num(name: Code, value: float, unit: Code, rel: str) -> _Node:
    return _Node(hd.sr.NumContentItem(name, float(value), unit, relationship_type=rel))


def _container(name: Code, rel: str | None, continuous: bool = False) -> _Node:
    return _Node(
        hd.sr.ContainerContentItem(
            clean_code(name), is_content_continuous=continuous, relationship_type=rel
        )
    )


def _assign_paths(node: _Node, path: tuple[int, ...], paths: dict[int, tuple[int, ...]]) -> None:
    paths[id(node)] = path
    for i, child in enumerate(node.children, start=1):
        if isinstance(child, _Node):
            _assign_paths(child, path + (i,), paths)


def _emit(node: _Node, paths: dict[int, tuple[int, ...]]) -> Dataset:
    ds = plain(node.item)
    if node.children:
        seq = []
        for child in node.children:
            if isinstance(child, _Ref):
                ref = Dataset()
                ref.RelationshipType = child.relationship
                ref.ReferencedContentItemIdentifier = list(paths[id(child.target)])
                seq.append(ref)
            else:
                seq.append(_emit(child, paths))
        ds.ContentSequence = seq
    return ds


# ---------------------------------------------------------------------------------------------
# Template pieces.


def _library_entry(v: ViewFinding, src: Dataset | None, fallback: Dataset) -> _Node:
    """TID 4020 CAD Image Library Entry: the image and the acquisition context CAD needs."""
    img = Dataset()
    img.RelationshipType = "CONTAINS"
    img.ValueType = "IMAGE"
    ref = Dataset()
    ref.ReferencedSOPClassUID = v.sop_class_uid
    ref.ReferencedSOPInstanceUID = v.sop_instance_uid
    img.ReferencedSOPSequence = [ref]
    node = _Node(img)
    acq = "HAS ACQ CONTEXT"
    if v.laterality in SIDE:
        node.add(_code(_DCM.ImageLaterality, SIDE[v.laterality], acq))
    if v.view in VIEW:
        node.add(_code(_DCM.ImageView, VIEW[v.view], acq))
    hdr = src if src is not None else fallback
    if hdr.get("StudyDate"):
        node.add(_Node(hd.sr.DateContentItem(_DCM.StudyDate, str(hdr.StudyDate), acq)))
    if hdr.get("StudyTime"):
        node.add(_Node(hd.sr.TimeContentItem(_DCM.StudyTime, str(hdr.StudyTime), acq)))
    if src is not None:
        directions = orientation_directions(src)
        if directions is not None:
            node.add(_text(_DCM.PatientOrientationRow, directions[0], acq))
            node.add(_text(_DCM.PatientOrientationColumn, directions[1], acq))
        spacing = src.get("ImagerPixelSpacing") or src.get("PixelSpacing")
        if spacing is not None and len(spacing) == 2:
            node.add(_num(_DCM.HorizontalPixelSpacing, float(spacing[1]), MM, acq))
            node.add(_num(_DCM.VerticalPixelSpacing, float(spacing[0]), MM, acq))
    return node


def _algorithm(parent: _Node, findings: StudyFindings) -> None:
    """TID 4019 CAD Algorithm Identification, as HAS PROPERTIES of ``parent``."""
    parent.add(_text(_DCM.AlgorithmName, findings.model_name, "HAS PROPERTIES"))
    parent.add(_text(_DCM.AlgorithmVersion, findings.model_version, "HAS PROPERTIES"))
    if findings.demo_model:
        parent.add(_text(_DCM.AlgorithmParameters, DEMO_TEXT, "HAS PROPERTIES"))


def _intent(above: bool) -> _Node:
    return _code(_DCM.RenderingIntent, REQUIRED if above else OPTIONAL, "HAS CONCEPT MOD")


def _clip(points: Sequence[tuple[float, float]], v: ViewFinding) -> np.ndarray:
    arr = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    arr[:, 0] = np.clip(arr[:, 0], 0.0, float(v.columns))
    arr[:, 1] = np.clip(arr[:, 1], 0.0, float(v.rows))
    return arr.astype(np.float32)


def _geometry(finding: _Node, v: ViewFinding, entry: _Node) -> None:
    """TID 4021 Mammography CAD Geometry: centre point and closed outline on the source grid."""
    if v.center is not None:
        center = _Node(
            hd.sr.ScoordContentItem(
                _DCM.Center, "POINT", _clip([v.center], v), relationship_type="HAS PROPERTIES"
            )
        )
        center.add(_Ref("SELECTED FROM", entry))
        finding.add(center)
    if len(v.outline) >= 3:
        pts = list(v.outline)
        if tuple(pts[0]) != tuple(pts[-1]):
            pts.append(pts[0])
        outline = _Node(
            hd.sr.ScoordContentItem(
                _DCM.Outline, "POLYLINE", _clip(pts, v), relationship_type="HAS PROPERTIES"
            )
        )
        outline.add(_Ref("SELECTED FROM", entry))
        finding.add(outline)


def _single_image_finding(
    v: ViewFinding, score: float, kind: Code, threshold: float, findings: StudyFindings,
    entry: _Node, with_geometry: bool, cancer: bool,
) -> _Node:
    """TID 4006 Mammography CAD Single Image Finding for one view."""
    node = _code(_DCM.SingleImageFinding, kind, "INFERRED FROM")
    node.add(_intent(score >= threshold))
    _algorithm(node, findings)
    node.add(_num(_DCM.CertaintyOfFinding, percent(score), PERCENT, "HAS PROPERTIES"))
    if cancer:
        node.add(_num(_DCM.ProbabilityOfCancer, percent(score), PERCENT, "HAS PROPERTIES"))
    if v.outside_domain:
        node.add(_text(DOMAIN_NOTE, domain_text(v)[:1024], "HAS PROPERTIES"))
    if with_geometry and score >= threshold:  # regions below the operating point are not shown
        _geometry(node, v, entry)
    return node


def _composite(
    kind: Code, views: list[ViewFinding], breast_score: float, view_scores: list[float],
    threshold: float, findings: StudyFindings, entries: dict[str, _Node], cancer: bool,
) -> _Node:
    """TID 4004 Composite Feature: the breast-level score inferred from its views' findings."""
    node = _code(_DCM.CompositeFeature, kind, "CONTAINS")
    node.add(_intent(breast_score >= threshold))
    if len(views) > 1:
        node.add(_code(
            _DCM.CompositeType, _DCM.TargetContentItemsAreRelatedSpatially, "HAS PROPERTIES"
        ))
    scope = (
        _DCM.FeatureDetectedOnMultipleImages if len(views) > 1
        else _DCM.FeatureDetectedOnOnlyOneOfTheImages
    )
    node.add(_code(_DCM.ScopeOfFeature, scope, "HAS PROPERTIES"))
    _algorithm(node, findings)
    node.add(_num(_DCM.CertaintyOfFeature, percent(breast_score), PERCENT, "HAS PROPERTIES"))
    if cancer:
        node.add(_num(_DCM.ProbabilityOfCancer, percent(breast_score), PERCENT, "HAS PROPERTIES"))
    if any(v.outside_domain for v in views):
        node.add(_text(DOMAIN_NOTE, domain_scope_text(views)[:1024], "HAS PROPERTIES"))
    for v, s in zip(views, view_scores, strict=True):
        node.add(_single_image_finding(
            v, s, kind, threshold, findings, entries[v.sop_instance_uid],
            with_geometry=cancer, cancer=cancer,
        ))
    return node


def _describe_scores(label: str, scores: dict[str, float], thresholds: dict[str, float]) -> str:
    parts = []
    for key, name in (("cancer", "cancer suspicion"), ("calcification", "calcification")):
        if key in scores:
            parts.append(score_phrase(name, scores[key], thresholds.get(key)))
    if "calcification" in scores:
        parts.append(f"calcification {CALCIFICATION_NO_LOCATION}")
    return f"{label}: " + ("; ".join(parts) if parts else "no score")


def _failed_text(v: ViewFinding) -> str:
    return f"{v.view_key} not analysed: {v.error or 'no score'}"


def _view_text(v: ViewFinding, thresholds: dict[str, float]) -> str:
    """One line per view: the image read, its scores against the thresholds, the mark."""
    if v.failed:
        return f"{read_line(v)}; {_failed_text(v)}"
    text = f"{read_line(v)}; " + _describe_scores(
        v.view_key, {"cancer": float(v.cancer or 0.0)}
        | ({"calcification": v.calcification} if v.calcification is not None else {}),
        thresholds)
    text += "" if v.marked(thresholds) else f"; {NO_REGION}"
    return text + (f"; {domain_text(v)}" if v.outside_domain else "")


def _impressions(
    findings: StudyFindings, entries: dict[str, _Node], ok: list[ViewFinding],
    failed: list[ViewFinding],
) -> _Node:
    """TID 4001 Overall Impression/Recommendation, with one TID 4003 container per breast."""
    t_cancer = findings.thresholds.get("cancer", 0.5)
    t_calc = findings.thresholds.get("calcification", 0.5)
    any_above = any(
        (v.cancer or 0.0) >= t_cancer or (v.calcification or 0.0) >= t_calc for v in ok
    )
    if not ok:
        summary = _DCM.NoAlgorithmsSucceededWithoutFindings
    elif failed or findings.missing:  # an exam without all four views was not fully analysed
        summary = (
            _DCM.NotAllAlgorithmsSucceededWithFindings if any_above
            else _DCM.NotAllAlgorithmsSucceededWithoutFindings
        )
    else:
        summary = (
            _DCM.AllAlgorithmsSucceededWithFindings if any_above
            else _DCM.AllAlgorithmsSucceededWithoutFindings
        )
    root = _code(_DCM.CADProcessingAndFindingsSummary, summary, "CONTAINS")
    exam_text = _describe_scores("Exam", findings.exam, findings.thresholds)
    if findings.demo_model:
        exam_text = f"{DEMO_TEXT.upper()}. {exam_text}"
    root.add(_text(_DCM.ImpressionDescription, exam_text, "HAS PROPERTIES"))
    summary = domain_summary(findings)
    for line in ([summary] if summary else []) + completeness_lines(findings):
        root.add(_text(_DCM.ImpressionDescription, line[:1024], "HAS PROPERTIES"))

    for side in ("R", "L"):
        side_views = [v for v in findings.views if v.laterality == side]
        if not side_views:
            continue
        side_ok = [v for v in side_views if v in ok]
        scores = findings.breasts.get(side, {})
        above = bool(side_ok) and (
            scores.get("cancer", 0.0) >= t_cancer or scores.get("calcification", 0.0) >= t_calc
        )
        box = _container(_DCM.IndividualImpressionRecommendation, "INFERRED FROM")
        box.add(_intent(above))
        text = _describe_scores(BREAST_NAME[side], scores, findings.thresholds)
        box.add(_text(_DCM.ImpressionDescription, text, "CONTAINS"))
        for v in side_views:
            box.add(_text(_DCM.ImpressionDescription, _view_text(v, findings.thresholds)[:1024],
                          "CONTAINS"))
        if side_ok:
            cancer_score = scores.get("cancer", max(v.cancer or 0.0 for v in side_ok))
            box.add(_composite(
                CANCER_FINDING, side_ok, cancer_score, [float(v.cancer or 0.0) for v in side_ok],
                t_cancer, findings, entries, cancer=True,
            ))
            calc_views = [v for v in side_ok if v.calcification is not None]
            if calc_views:
                calc_score = scores.get(
                    "calcification", max(float(v.calcification or 0.0) for v in calc_views)
                )
                box.add(_composite(
                    CALC_FINDING, calc_views, calc_score,
                    [float(v.calcification or 0.0) for v in calc_views],
                    t_calc, findings, entries, cancer=False,
                ))
        root.add(box)
    return root


def _status(ok: list[ViewFinding], failed: list[ViewFinding]) -> Code:
    if not ok and not failed:
        return _DCM.NotAttempted
    if not failed:
        return _DCM.Succeeded
    return _DCM.PartiallySucceeded if ok else _DCM.Failed


def _performed(
    name: Code, status: Code, item_name: Code, kinds: list[Code], findings: StudyFindings,
    ok_entries: list[_Node], failed_entries: list[_Node], success_box: Code, fail_box: Code,
) -> _Node:
    """Summary of Detections / Analyses with TID 4015/4016 (which algorithm ran on what)."""
    summary = _code(name, status, "CONTAINS")
    for box_name, entries in ((success_box, ok_entries), (fail_box, failed_entries)):
        if not entries:
            continue
        box = _container(box_name, "INFERRED FROM")
        for kind in kinds:
            performed = _code(item_name, kind, "CONTAINS")
            _algorithm(performed, findings)
            for entry in entries:
                performed.add(_Ref("HAS PROPERTIES", entry))
            box.add(performed)
        summary.add(box)
    return summary


def _content_tree(findings: StudyFindings, sources: Sequence[Dataset]) -> _Node:
    by_uid = {str(s.SOPInstanceUID): s for s in sources}
    root = _Node(hd.sr.ContainerContentItem(
        _DCM.MammographyCADReport, is_content_continuous=False, template_id="4000"
    ))
    root.add(_code(
        _DCM.LanguageOfContentItemAndDescendants,
        Code("en-US", "RFC5646", "English (United States)"), "HAS CONCEPT MOD",
    ))
    library = _container(_DCM.ImageLibrary, "CONTAINS")
    entries: dict[str, _Node] = {}
    for v in findings.views:
        if v.sop_instance_uid in entries:
            continue
        entry = _library_entry(v, by_uid.get(v.sop_instance_uid), sources[0])
        entries[v.sop_instance_uid] = entry
        library.add(entry)
    root.add(library)

    ok = [v for v in findings.views if not v.failed]
    failed = [v for v in findings.views if v.failed]
    root.add(_impressions(findings, entries, ok, failed))
    ok_entries = [entries[v.sop_instance_uid] for v in ok]
    failed_entries = [entries[v.sop_instance_uid] for v in failed]
    root.add(_performed(
        _DCM.SummaryOfDetections, _status(ok, failed), _DCM.DetectionPerformed,
        [CANCER_FINDING, CALC_FINDING], findings, ok_entries, failed_entries,
        _DCM.SuccessfulDetections, _DCM.FailedDetections,
    ))
    root.add(_performed(
        _DCM.SummaryOfAnalyses, _status(ok, [] if ok else failed), _DCM.AnalysisPerformed,
        [_DCM.IndividualImpressionRecommendationAnalysis,
         _DCM.OverallImpressionRecommendationAnalysis],
        # the per-breast/exam analyses succeed on the views that did; they fail only with none
        findings, ok_entries, [] if ok else failed_entries,
        _DCM.SuccessfulAnalyses, _DCM.FailedAnalyses,
    ))
    return root




def content_dataset(findings: StudyFindings, sources: Sequence[Dataset]) -> Dataset:
    """The root content item (its attributes go into the top-level SR dataset)."""
    tree = _content_tree(findings, sources)
    paths: dict[int, tuple[int, ...]] = {}
    _assign_paths(tree, (1,), paths)
    return _emit(tree, paths)
