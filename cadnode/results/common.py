"""Helpers every result object uses, so that all four file into the study the same way.

- patient/study identity and character set copied from the source (``copy_patient_study``);
- the source images grouped by study/series (``referenced_series``,
  ``hierarchical_references``), for evidence and reference sequences;
- the model named as Contributing Equipment (``contributing_equipment``);
- PS3.10 file meta for the pydicom-built objects (``file_meta``);
- ``reference_stub``: a header-only copy of a source image with the attributes highdicom's
  builders read, filled with safe defaults where a source lacks them (scanned film headers do);
- codes shared by the SR templates (sides, views, percent).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from copy import deepcopy
from datetime import datetime

import highdicom as hd
from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.dataset import FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

from cadnode import __version__
from cadnode.dicom.enum import View
from cadnode.results.findings import ObjectVersion, StudyFindings, ViewFinding

__all__ = [
    "BREAST_NAME",
    "DEMO_TEXT",
    "MANUFACTURER",
    "PERCENT",
    "SIDE",
    "VIEW",
    "CALCIFICATION_NO_LOCATION",
    "NO_REGION",
    "OUTSIDE_DOMAIN",
    "cancer_label",
    "domain_scope_text",
    "domain_summary",
    "domain_text",
    "completeness_lines",
    "missing_line",
    "read_line",
    "score_phrase",
    "clean_code",
    "contributing_equipment",
    "copy_patient_study",
    "file_meta",
    "hierarchical_references",
    "percent",
    "plain",
    "predecessor_documents",
    "reference_stub",
    "referenced_series",
]

MANUFACTURER = "cadnode"
DEMO_TEXT = "demonstration model - not for clinical use"
PERCENT = codes.UCUM.Percent
SIDE = {"R": codes.SCT.RightBreast, "L": codes.SCT.LeftBreast, "B": codes.SCT.BothBreasts}
VIEW: dict[str, Code] = {  # CID 4014, keyed by cadnode.dicom.views ViewInfo.view
    View.CC: codes.SCT.CranioCaudal,
    View.MLO: codes.SCT.MedioLateralObliqueProjection,
    View.ML: codes.SCT.MedioLateralProjection,
    View.LM: codes.SCT.LateroMedial,
    View.LMO: codes.SCT.LateroMedialOblique,
    View.XCCL: codes.SCT.CranioCaudalExaggeratedLaterally,
    View.XCCM: codes.SCT.CranioCaudalExaggeratedMedially,
    View.FB: codes.SCT.CaudoCranial,
    View.SIO: codes.SCT.SuperolateralToInferomedialOblique,
    View.ISO: codes.SCT.InferomedialToSuperolateralOblique,
}
BREAST_NAME = {"R": "Right breast", "L": "Left breast"}

_PATIENT_STUDY_ATTRS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "OtherPatientIDsSequence", "PatientAge", "PatientSize", "PatientWeight",
    "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
    "IssuerOfAccessionNumberSequence", "StudyDescription",
)
_TYPE2_PATIENT_STUDY = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
)
# Image attributes highdicom's GSPS / SR builders read from referenced images.
_IMAGE_ATTRS = (
    "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "Modality", "Rows", "Columns",
    "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit",
    "PixelRepresentation", "RescaleSlope", "RescaleIntercept", "RescaleType",
    "WindowCenter", "WindowWidth", "WindowCenterWidthExplanation", "VOILUTFunction",
    "VOILUTSequence", "SmallestImagePixelValue", "LargestImagePixelValue",
    "ImageLaterality", "Laterality", "ViewPosition", "PatientOrientation",
    "PixelSpacing", "ImagerPixelSpacing",
)


_KNOWN_CHARSETS = frozenset(v.value for v in hd.SpecificCharacterSetValues)
UTF8 = "ISO_IR 192"


def result_character_set(src: Dataset) -> str | list[str] | None:
    """The source's Specific Character Set when it is a valid one, else UTF-8.

    Text values are already decoded by pydicom, so any character set that can encode them
    will do; UTF-8 can encode all of them. An empty first value of an ISO 2022 set is written
    as its explicit name, ``ISO 2022 IR 6``, which highdicom's builders require.
    """
    raw = src.get("SpecificCharacterSet")
    if raw is None:
        return None
    values = [str(v).strip() for v in (raw if isinstance(raw, MultiValue | list) else [raw])]
    if len(values) > 1 and values[0] == "":
        values[0] = "ISO 2022 IR 6"
    if not values or not all(v in _KNOWN_CHARSETS for v in values):
        return UTF8
    return values[0] if len(values) == 1 else values


def _valid_value(elem: DataElement) -> bool:
    """False for dates and times a builder or a viewer would choke on (19991399, 25:00)."""
    value = str(elem.value or "").strip()
    if not value:
        return True
    try:
        if elem.VR == "DA":
            datetime.strptime(value[:8], "%Y%m%d")
            return len(value) == 8
        if elem.VR == "TM":
            return bool(_TM_RE.match(value))
    except ValueError:
        return False
    return True


_TM_RE = re.compile(r"^([01][0-9]|2[0-3])([0-5][0-9]([0-5][0-9](\.[0-9]{1,6})?)?)?$")


class NotApplicable(ValueError):
    """This object kind has nothing to say for the study (the worker skips it and says so)."""


def copy_patient_study(dst: Dataset, src: Dataset, study_uid: str) -> None:
    """Copy patient/study identity (and character set) so the result files into the study.

    A value that is not valid for its VR is left empty rather than copied (the source's own
    file keeps it): a result object must be readable even when its source is not tidy.
    """
    charset = result_character_set(src)
    if charset is not None:
        dst.SpecificCharacterSet = charset
    for kw in _PATIENT_STUDY_ATTRS:
        if kw in src:
            elem = src[kw]
            dst[kw] = deepcopy(elem) if _valid_value(elem) else DataElement(elem.tag, elem.VR,
                                                                               None)
    for kw in _TYPE2_PATIENT_STUDY:  # Type 2: present, possibly empty
        if kw not in dst:
            setattr(dst, kw, None)
    dst.StudyInstanceUID = study_uid


def reference_stub(src: Dataset | None, view: ViewFinding | None, study_uid: str,
                   patient: Dataset) -> Dataset:
    """Header-only stand-in for a source image, complete enough for highdicom's builders.

    highdicom reads patient/study attributes and image geometry with plain attribute access;
    real headers (scanned film, anonymised exports) often lack Type 2 ones, so they are copied
    with ``copy_patient_study`` from ``patient`` and defaulted here, never invented elsewhere.
    """
    stub = Dataset()
    copy_patient_study(stub, patient, study_uid)
    if src is not None:
        if src.get("StudyInstanceUID"):
            stub.StudyInstanceUID = src.StudyInstanceUID  # evidence keeps its own study
        for kw in _IMAGE_ATTRS:
            if kw in src and src[kw].value not in (None, ""):
                stub[kw] = deepcopy(src[kw])
    if view is not None:
        stub.SOPClassUID = view.sop_class_uid
        stub.SOPInstanceUID = view.sop_instance_uid
        if view.series_uid:
            stub.SeriesInstanceUID = view.series_uid
        stub.Rows, stub.Columns = view.rows, view.columns
    stub.setdefault("SamplesPerPixel", 1)
    stub.setdefault("PhotometricInterpretation", "MONOCHROME2")
    return stub


def referenced_series(
    sources: Iterable[Dataset], views: Iterable[ViewFinding], study_uid: str
) -> dict[str, dict[str, list[tuple[str, str]]]]:
    """Group every source image as {study: {series: [(sop class, sop instance)]}}, in order."""
    out: dict[str, dict[str, list[tuple[str, str]]]] = defaultdict(lambda: defaultdict(list))
    seen: set[str] = set()
    for ds in sources:
        uid = str(ds.SOPInstanceUID)
        if uid not in seen:
            seen.add(uid)
            study = str(ds.get("StudyInstanceUID", study_uid))
            out[study][str(ds.SeriesInstanceUID)].append((str(ds.SOPClassUID), uid))
    for v in views:  # a view the worker analysed must be evidence even if no header was passed
        if v.sop_instance_uid not in seen:
            seen.add(v.sop_instance_uid)
            out[study_uid][v.series_uid].append((v.sop_class_uid, v.sop_instance_uid))
    return out


def hierarchical_references(refs: dict[str, dict[str, list[tuple[str, str]]]]) -> list[Dataset]:
    """Items of a Hierarchical SOP Instance Reference Macro sequence (study/series/instance)."""
    studies = []
    for study_uid, series in refs.items():
        st = Dataset()
        st.StudyInstanceUID = study_uid
        st.ReferencedSeriesSequence = []
        for series_uid, instances in series.items():
            se = Dataset()
            se.SeriesInstanceUID = series_uid
            se.ReferencedSOPSequence = []
            for cls, inst in instances:
                it = Dataset()
                it.ReferencedSOPClassUID = cls
                it.ReferencedSOPInstanceUID = inst
                se.ReferencedSOPSequence.append(it)
            st.ReferencedSeriesSequence.append(se)
        studies.append(st)
    return studies


def predecessor_documents(previous: ObjectVersion, study_uid: str) -> list[Dataset]:
    """Predecessor Documents Sequence (PS3.3 C.17.2): the SR version this one replaces."""
    return hierarchical_references({study_uid: {previous.series_uid: [
        (previous.sop_class_uid, previous.sop_instance_uid)]}})


def contributing_equipment(findings: StudyFindings) -> Dataset:
    """Contributing Equipment item naming the model that produced the scores."""
    item = hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=findings.model_name[:64],
        software_versions=findings.model_version[:64],
        contribution_description=(
            "CAD model" + (f" ({DEMO_TEXT})" if findings.demo_model else "")
        )[:64],
    )
    return plain(item)


def file_meta(sop_class_uid: str, sop_instance_uid: str) -> FileMetaDataset:
    """PS3.10 file meta for an Explicit VR Little Endian object."""
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"CADNODE_{__version__}"[:16]
    return meta


def plain(item: Dataset) -> Dataset:
    """Deep copy of a (highdicom) dataset as plain pydicom Datasets all the way down."""
    out = Dataset()
    for elem in item:
        if elem.VR == "SQ":
            out.add_new(elem.tag, "SQ", [plain(x) for x in elem.value])
        else:
            out.add(deepcopy(elem))
    return out


def clean_code(code: Code) -> Code:
    """pydicom's dictionary keeps zero-width spaces of the HTML standard in some meanings
    ("Impression/\u200bRecommendation"); they would not encode in ISO_IR 100."""
    meaning = code.meaning.replace("\u200b", "")
    if meaning == code.meaning:
        return code
    return Code(code.value, code.scheme_designator, meaning, code.scheme_version)


#: What every object says of the calcification score, which the model gives per image only.
CALCIFICATION_NO_LOCATION = "no location: the model's calcification score is image-level"
NO_REGION = "no region marked: cancer suspicion below the operating threshold"


#: What every object says next to a score the model gave an image unlike its training images.
OUTSIDE_DOMAIN = "outside the model's validated domain"


def domain_text(v: ViewFinding) -> str:
    """"outside the model's validated domain: <reasons>" for a flagged view, else ""."""
    return f"{OUTSIDE_DOMAIN}: " + "; ".join(v.outside_domain) if v.outside_domain else ""


def domain_scope_text(views: Iterable[ViewFinding]) -> str:
    """For a breast or exam score built from flagged views: which ones ("" when none)."""
    flagged = [v.view_key for v in views if v.outside_domain]
    return f"{OUTSIDE_DOMAIN}: built from {', '.join(flagged)}, outside it" if flagged else ""


def domain_summary(findings: StudyFindings) -> str:
    """The exam-level statement ("" when every scored view is inside): the breast and exam
    scores are built from the flagged views' scores, so they are not validated either."""
    flagged = [v.view_key for v in findings.views if not v.failed and v.outside_domain]
    if not flagged:
        return ""
    return (f"{OUTSIDE_DOMAIN.upper()}: {', '.join(flagged)} - these scores, and the breast "
            "and exam scores built from them, are not validated")


def score_phrase(name: str, p: float, threshold: float | None) -> str:
    """"cancer suspicion 12.34 % (operating threshold 50.00 %: below)" - each score with the
    operating point it is read against."""
    if threshold is None:
        return f"{name} {percent(p):.2f} % (no operating threshold)"
    side = "AT OR ABOVE" if p >= threshold else "below"
    return f"{name} {percent(p):.2f} % (operating threshold {percent(threshold):.2f} %: {side})"


def read_line(v: ViewFinding) -> str:
    """Which image was read for a view, and why (the selection's reason)."""
    why = f" ({v.selected_because})" if v.selected_because else ""
    return f"{v.view_key} {'chosen' if v.failed else 'read'}: image {v.sop_instance_uid}{why}"


def missing_line(key: str, why: str) -> str:
    return f"{key} missing: {why}"


def completeness_lines(findings: StudyFindings) -> list[str]:
    """The statements every object makes about what was and was not read."""
    lines = []
    if findings.missing:
        lines.append("INCOMPLETE EXAM: standard view(s) missing: " + ", ".join(findings.missing))
    failed = [v.view_key for v in findings.views if v.failed]
    if failed:
        lines.append("INCOMPLETE EXAM: view(s) received but not readable: " + ", ".join(failed))
    lines += [missing_line(k, why) for k, why in findings.missing.items()]
    lines += [n.text for n in findings.not_analysed]
    return lines


def cancer_label(v: ViewFinding) -> str:
    """Tracking label of a view's cancer finding, shared by TID 1500 and GSPS."""
    return f"{v.view_key} cancer suspicion"


def percent(p: float) -> float:
    """A probability as the percent value the SRs carry (UCUM "%"), rounded to 0.01."""
    return round(float(p) * 100.0, 2)
