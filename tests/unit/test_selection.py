"""View selection: which image is read for each screening view, and why the others are not.

Synthetic headers with the attributes real modalities use for each case (view modifier codes,
vendor ViewPosition suffixes, acquisition dates); the same cases run end to end through the
listener, the worker and the CAD SR in tests/integration/test_exam_cases.py.
"""

from __future__ import annotations

import time

import pytest
from pydicom.dataset import Dataset

from cadnode.dicom.enum import Intent, ViewModifier
from cadnode.dicom.selection import (
    Candidate,
    ImplantPolicy,
    acquisition_datetime,
    candidate,
    select_views,
)
from cadnode.dicom.views import ViewInfo, detect_view, presentation_intent, view_modifiers
from cadnode.jobs.db import Database
from cadnode.jobs.queue import assemble_studies, instance_candidate
from cadnode.text.clinical import build_clinical_text
from tests.robustness.corpus import synthetic_mg

STUDY = "1.2.826.0.1.3680043.10.1407.900"


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def mg(key: str, n: int, acquired: str = "", **attrs: object) -> Dataset:
    """A header of view ``key`` ("L-CC"); ``acquired`` as "YYYYMMDD HHMMSS"."""
    side, view = key.split("-")
    ds = synthetic_mg(STUDY, f"{STUDY}.{n}", side, view, rows=8, cols=8, **attrs)
    if acquired:
        ds.AcquisitionDate, ds.AcquisitionTime = acquired.split()
    return ds


def with_modifiers(ds: Dataset, *mods: Dataset, view: Dataset | None = None) -> Dataset:
    """ViewCodeSequence (CC) whose ViewModifierCodeSequence holds ``mods``."""
    item = view or _code("399162004", "SCT", "cranio-caudal")
    item.ViewModifierCodeSequence = list(mods)
    ds.ViewCodeSequence = [item]
    return ds


SPOT_SRT = _code("R-102D2", "SRT", "Spot Compression")  # as the exam was coded
MAG_SRT = _code("R-10233", "SRT", "Magnification")
IMPLANT_SCT = _code("399209000", "SCT", "Implant Displaced")


def run(*headers: Dataset, policy: ImplantPolicy = ImplantPolicy.FALLBACK):  # type: ignore[no-untyped-def]
    """Select over headers given in arrival order; refs are the SOP Instance UIDs."""
    return select_views(
        (candidate(str(ds.SOPInstanceUID), ds, n) for n, ds in enumerate(headers)), policy)


def four(acquired: str = "20260302 101500", start: int = 1) -> list[Dataset]:
    return [mg(k, start + i, acquired) for i, k in enumerate(("L-CC", "L-MLO", "R-CC", "R-MLO"))]


def uid(n: int) -> str:
    return f"{STUDY}.{n}"


def test_clean_exam_reads_its_four_views() -> None:
    s = run(*four())
    assert s.chosen == {"L-CC": uid(1), "L-MLO": uid(2), "R-CC": uid(3), "R-MLO": uid(4)}
    assert s.complete and not s.not_analysed
    assert all("screening view" in d.reason for d in s.decisions)


def test_spot_magnification_view_never_replaces_the_screening_view() -> None:
    spot = with_modifiers(mg("L-CC", 9, "20260302 111500"), SPOT_SRT, MAG_SRT)
    assert detect_view(spot).modifiers == (ViewModifier.MAGNIFICATION,
                                           ViewModifier.SPOT_COMPRESSION)
    for order in ([*four(), spot], [spot, *four()]):
        s = run(*order)
        assert s.chosen["L-CC"] == uid(1) and s.complete
        (passed,) = s.not_analysed
        assert passed.candidate.uid == uid(9)
        assert "magnification, spot compression view" in passed.reason
    alone = run(spot, *four()[1:])  # the spot view does not stand in for a missing L-CC
    assert "L-CC" not in alone.chosen and "spot compression" in alone.missing["L-CC"]


def test_vendor_view_position_suffixes_and_series_words() -> None:
    assert detect_view(mg("L-CC", 1, ViewPosition="CCID")).modifiers == (
        ViewModifier.IMPLANT_DISPLACED,)
    assert detect_view(mg("L-CC", 1, ViewPosition="MLOID")).view == "MLO"
    assert detect_view(mg("L-CC", 1, ViewPosition="MCC")).modifiers == (
        ViewModifier.MAGNIFICATION,)
    assert detect_view(mg("L-CC", 1, SeriesDescription="L CC SPOT")).modifiers == (
        ViewModifier.SPOT_COMPRESSION,)
    assert detect_view(mg("L-CC", 1, ViewPosition="MLO")).modifiers == ()
    assert view_modifiers(mg("L-CC", 1)) is None  # the header cannot say: unknown, not none
    assert view_modifiers(mg("L-CC", 1, SeriesDescription="PATIENT ID 123")) is None
    assert detect_view(mg("L-CC", 1, SeriesDescription="L CC ID")).modifiers == (
        ViewModifier.IMPLANT_DISPLACED,)
    coded = with_modifiers(mg("L-CC", 1, SeriesDescription="MAG VIEWS"))  # codes say: none
    assert detect_view(coded).modifiers == ()


def test_implant_displaced_views_beside_standard_ones() -> None:
    ids = [mg(k, 10 + i, "20260302 102000", ViewPosition=k[2:] + "ID", BreastImplantPresent="YES")
           for i, k in enumerate(("L-CC", "L-MLO", "R-CC", "R-MLO"))]
    s = run(*four(), *ids)
    assert s.chosen == {"L-CC": uid(1), "L-MLO": uid(2), "R-CC": uid(3), "R-MLO": uid(4)}
    assert sorted(d.candidate.uid for d in s.not_analysed) == [uid(10 + i) for i in range(4)]
    assert all("implant-displaced view; the standard" in d.reason for d in s.not_analysed)
    prefer = run(*four(), *ids, policy=ImplantPolicy.PREFER)
    assert sorted(prefer.chosen.values()) == [uid(10 + i) for i in range(4)]
    assert all("implant-displaced view" in d.reason for d in prefer.decisions if d.analysed)


def test_implant_displaced_views_without_standard_ones_follow_the_policy() -> None:
    views = {"CC": ("399162004", "SCT", "cranio-caudal"),
             "MLO": ("399368009", "SCT", "medio-lateral oblique")}
    ids = [with_modifiers(mg(k, 20 + i, "20260302 102000"), IMPLANT_SCT,
                          view=_code(*views[k[2:]]))
           for i, k in enumerate(("L-CC", "L-MLO", "R-CC", "R-MLO"))]
    for ds in ids:
        del ds.ViewPosition  # only the modifier code says "implant displaced"
    s = run(*ids)
    assert s.complete and sorted(s.chosen.values()) == [uid(20 + i) for i in range(4)]
    assert all(d.reason.startswith("For Presentation, implant-displaced view")
               for d in s.decisions)
    never = run(*ids, policy=ImplantPolicy.STANDARD)
    assert not never.chosen and set(never.missing) == {"L-CC", "L-MLO", "R-CC", "R-MLO"}
    assert all("never read" in d.reason for d in never.not_analysed)


def test_a_prior_routed_into_the_study_is_not_read_whatever_the_order() -> None:
    prior = four("20240301 090000", start=11)
    for order in ([*four(), *prior], [*prior, *four()]):
        s = run(*order)
        assert sorted(s.chosen.values()) == [uid(n) for n in range(1, 5)]
        assert all(d.reason == "prior exam: acquired 2024-03-01, the current exam on 2026-03-02"
                   for d in s.not_analysed) and len(s.not_analysed) == 4


def test_duplicates_the_later_acquisition_is_read_in_both_arrival_orders() -> None:
    first = mg("L-CC", 7, "20260302 101500")
    retake = mg("L-CC", 8, "20260302 103000")
    for order in ([first, retake], [retake, first]):
        s = run(*order, *four()[1:])
        assert s.chosen["L-CC"] == uid(8)
        (passed,) = s.not_analysed
        assert passed.candidate.uid == uid(7)
        assert "earlier acquisition of L-CC (repeat)" in passed.reason
    # an undated retake beside a dated image: times cannot be compared, the last received wins
    undated = mg("L-CC", 9)
    assert run(first, undated).chosen["L-CC"] == uid(9)
    assert run(undated, first).chosen["L-CC"] == uid(7)
    # same (or no) acquisition time: the last received wins, and the report says so
    a, b = mg("L-CC", 7), mg("L-CC", 8)
    assert run(a, b).chosen["L-CC"] == uid(8) and run(b, a).chosen["L-CC"] == uid(7)
    assert "received later" in run(a, b).not_analysed[0].reason


def test_only_readable_images_date_the_current_exam() -> None:
    """An image of unknown side, or a spot view, acquired days later does not turn the
    screening images into priors."""
    later = synthetic_mg(STUDY, uid(8), None, "CC", rows=8, cols=8)
    later.AcquisitionDate, later.AcquisitionTime = "20260305", "090000"
    spot = with_modifiers(mg("L-CC", 9, "20260310 090000"), SPOT_SRT)
    s = run(*four(), later, spot)
    assert s.complete and sorted(s.chosen.values()) == [uid(n) for n in range(1, 5)]
    assert not any(d.rule.value == "prior exam" for d in s.decisions)


def test_ml_instead_of_mlo_and_a_two_view_exam_are_incomplete() -> None:
    ml = mg("L-ML", 2, "20260302 101500")
    s = run(four()[0], ml, *four()[2:])
    assert "L-MLO" not in s.chosen and not s.complete
    assert s.missing["L-MLO"].startswith("no L-MLO image that can be read")
    assert "L-ML: ML is not a screening projection" in s.missing["L-MLO"]
    two = run(four()[0], four()[2])
    assert set(two.missing) == {"L-MLO", "R-MLO"}
    assert two.missing["R-MLO"] == "no R-MLO image received"


def test_for_processing_and_unknown_views_are_passed_over() -> None:
    raw = mg("L-CC", 5, PresentationIntentType="FOR PROCESSING")
    raw.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2.1"
    nothing = synthetic_mg(STUDY, uid(6), None, None, rows=8, cols=8)
    s = run(raw, nothing, *four())
    reasons = {d.candidate.uid: d.reason for d in s.not_analysed}
    assert reasons[uid(5)].startswith("For Processing image")
    assert reasons[uid(6)] == "side or view could not be identified from the header"
    assert s.chosen["L-CC"] == uid(1)


def test_one_presentation_rule_for_views_and_text() -> None:
    """The SOP class decides over PresentationIntentType, in the selection and in the text."""
    ds = mg("L-CC", 1, PresentationIntentType="FOR PROCESSING")  # MG For Presentation class
    assert presentation_intent(ds) is Intent.PRESENTATION
    info = detect_view(ds)
    assert info.for_presentation
    assert "intent presentation" in build_clinical_text(ds, info)
    breast_projection = Dataset()
    breast_projection.SOPClassUID = "1.2.840.10008.5.1.4.1.1.13.1.5"  # For Processing
    assert presentation_intent(breast_projection) is Intent.PROCESSING
    assert "intent processing" in build_clinical_text(breast_projection,
                                                      detect_view(breast_projection))


@pytest.mark.parametrize(("attrs", "expected"), [
    ({"AcquisitionDateTime": "20260302101500.25+0100"}, "20260302101500.250000"),
    ({"AcquisitionDate": "20260302", "AcquisitionTime": "1015"}, "20260302101500.000000"),
    ({"ContentDate": "20260302", "ContentTime": "10:15:00"}, "20260302101500.000000"),
    ({"SeriesDate": "20260302"}, "20260302000000.000000"),
    ({"AcquisitionDate": "2026-03-02"}, ""),
    ({}, ""),
])
def test_acquisition_datetime(attrs: dict[str, str], expected: str) -> None:
    ds = Dataset()
    for k, v in attrs.items():
        setattr(ds, k, v)
    assert acquisition_datetime(ds) == expected


def test_assembler_applies_the_same_rules(db: Database) -> None:
    """Three screening views and a spot L-CC are not a complete study: it waits for the
    stable period, and the queued event says what is missing."""
    from cadnode.dicom.spool import StoredInstance
    from cadnode.jobs import queue

    headers = [*four()[1:], with_modifiers(mg("L-CC", 9, "20260302 111500"), SPOT_SRT)]
    t0 = time.time()
    for ds in headers:
        queue.record_instance(db, StoredInstance(
            path=f"/spool/{ds.SOPInstanceUID}.dcm", size=1, sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID), transfer_syntax="1.2.840.10008.1.2.1",
            study_uid=STUDY, series_uid=str(ds.SeriesInstanceUID), patient_id="P", accession="A",
            calling_ae="MOD", view=detect_view(ds), acquired=acquisition_datetime(ds)), now=t0)
    assert assemble_studies(db, complete_seconds=1, stable_seconds=60, now=t0 + 5) == []
    assert assemble_studies(db, complete_seconds=1, stable_seconds=60, now=t0 + 61) == [STUDY]
    with db.session() as s:
        from sqlalchemy import select

        from cadnode.jobs.db import Event, Instance
        rows = s.scalars(select(Instance).order_by(Instance.id)).all()
        candidates = [instance_candidate(r) for r in rows]
        queued = s.scalars(select(Event.message).where(Event.kind == "queued")).one()
    assert candidates[-1].info.modifiers == (ViewModifier.SPOT_COMPRESSION,)
    assert isinstance(candidates[0], Candidate) and candidates[0].acquired.startswith("20260302")
    assert queued.endswith("stable; missing L-CC")


def test_view_info_defaults_stay_compatible() -> None:
    info = ViewInfo("L", "CC", True, "test")
    assert info.modifiers == () and info.screening and info.key == "L-CC"
