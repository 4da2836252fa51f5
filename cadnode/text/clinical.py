"""DICOM header -> hierarchical clinical text (exam / breast / view), from the header alone.

The fused model reads this text next to the pixels, so training and serving must build exactly the
same words from the same header: the builder is deterministic, emits only words of a closed
vocabulary (:func:`template_vocabulary`, used to build the tokenizer) and never raises on a missing
or malformed attribute: such a field becomes the explicit word ``unknown``.

Numbers are binned into words so that the text stays in the closed vocabulary and so that tiny
header differences between vendors do not change the text. A bin is chosen with ``bisect_right``
over the edges: a value equal to an edge falls in the upper bin.

Template (version ``TEXT_TEMPLATE_VERSION`` = 2; exam -> breast -> view -> acquisition)::

    exam: age <age> implant <yes|no|unknown> manufacturer <m> model <words>.
    breast: side <left|right|unknown>.
    view: projection <v> modifiers <words>.
    acquisition: thickness <t> force <f> kvp <k> exposure <e> anode <material>
    filter <materials> detector <type> spacing <fine|standard|coarse> intent <intent>.

Version 1 (packages trained before version 2; the manifest says which a package reads) had no
acquisition level: its view sentence carried thickness ... intent, without detector and spacing.
The text is built as levels of (key, value) fields (:func:`clinical_fields`) and rendered by
:func:`render`, so training can drop and reorder fields without a second builder. There is no
breast-density word: no standard attribute carries density (vendors put it in private tags).
"""

from __future__ import annotations

import logging
import math
import re
from bisect import bisect_right
from collections.abc import Callable, Iterable
from datetime import date
from typing import TYPE_CHECKING, Any

from cadnode.dicom.enum import View, ViewModifier
from cadnode.dicom.views import (
    MALFORMED_VALUE,
    header_value,
    presentation_intent,
    view_modifiers,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pydicom

    from cadnode.dicom.views import ViewInfo

log = logging.getLogger(__name__)

TEXT_TEMPLATE_VERSION = "2"
#: Every template this builder can write (a package names the one it was trained on).
TEXT_TEMPLATE_VERSIONS: tuple[str, ...] = ("1", "2")

UNKNOWN = "unknown"
OTHER = "other"
NONE = "none"

# --- bins (edges in the attribute's DICOM unit; value >= edge goes to the next bin) -------------
#: Age in years. Screening populations are mostly 40-75.
AGE_EDGES: tuple[float, ...] = (40.0, 50.0, 60.0, 70.0, 80.0)
AGE_WORDS: tuple[str, ...] = ("under forty", "forties", "fifties", "sixties", "seventies",
                              "eighty plus")
#: Plausible ages; outside this range the value is treated as malformed.
AGE_RANGE: tuple[float, float] = (10.0, 120.0)

#: BodyPartThickness (0018,11A0): compressed breast thickness in mm (typical 20-90, mean ~55).
THICKNESS_EDGES: tuple[float, ...] = (45.0, 65.0)
THICKNESS_WORDS: tuple[str, ...] = ("thin", "medium", "thick")
THICKNESS_RANGE: tuple[float, float] = (1.0, 200.0)

#: CompressionForce (0018,11A2) in newtons (typical 50-200 N).
FORCE_EDGES: tuple[float, ...] = (80.0, 140.0)
FORCE_WORDS: tuple[str, ...] = ("low", "medium", "high")
FORCE_RANGE: tuple[float, float] = (0.0, 500.0)

#: KVP (0018,0060) in kV (digital mammography 24-35, contrast / tomosynthesis up to 49).
KVP_EDGES: tuple[float, ...] = (28.0, 32.0)
KVP_WORDS: tuple[str, ...] = ("low", "medium", "high")
KVP_RANGE: tuple[float, float] = (10.0, 60.0)

#: Exposure in mAs: ExposureInuAs (0018,1153) / 1000 when present, else Exposure (0018,1152).
EXPOSURE_EDGES: tuple[float, ...] = (60.0, 120.0)
EXPOSURE_WORDS: tuple[str, ...] = ("low", "medium", "high")
EXPOSURE_RANGE: tuple[float, float] = (0.0, 2000.0)

#: ImagerPixelSpacing (0018,1164) in mm: ~0.05-0.07 fine (many DBT/FFDM), ~0.1 standard FFDM,
#: coarser for CR and digitised film.
SPACING_EDGES: tuple[float, ...] = (0.075, 0.12)
SPACING_WORDS: tuple[str, ...] = ("fine", "standard", "coarse")
SPACING_RANGE: tuple[float, float] = (0.005, 2.0)

# --- closed vocabularies for coded / free-text attributes ------------------------------------
#: Manufacturer: any of these (lower-case) name tokens -> word; no match -> "other".
MANUFACTURER_TOKENS: dict[str, str] = {
    "hologic": "hologic", "lorad": "hologic",
    "ge": "ge", "gehc": "ge", "general": "ge",
    "siemens": "siemens",
    "fuji": "fujifilm", "fujifilm": "fujifilm",
    "philips": "philips",
    "sectra": "sectra",
    "konica": "konica",
    "agfa": "agfa",
    "carestream": "carestream", "kodak": "carestream",
    "planmed": "planmed",
    "ims": "giotto", "giotto": "giotto",
    "metaltronica": "metaltronica",
    "canon": "canon", "toshiba": "canon",
}
#: ManufacturerModelName: these (lower-case) tokens are kept, in header order; none -> "other".
MODEL_WORDS: tuple[str, ...] = (
    "selenia", "dimensions", "lorad", "senographe", "essential", "pristina", "ds", "crystal",
    "mammomat", "inspiration", "revelation", "fusion", "novation", "amulet", "innovality",
    "aspire", "microdose", "mammodiagnost", "nuance", "clarity", "tomo", "giotto",
)
_MODEL_ALIASES: dict[str, str] = {"3dimensions": "dimensions", "3d": "tomo",
                                  "tomosynthesis": "tomo"}

#: ViewInfo.view codes that are spoken as themselves (lower-case); others -> "other".
VIEW_CODES: tuple[str, ...] = tuple(v.value.lower() for v in (
    View.CC, View.MLO, View.ML, View.LM, View.LMO, View.XCCL, View.XCCM, View.FB, View.SIO,
    View.AT, View.CV))
#: View modifiers (cadnode.dicom.views.view_modifiers) -> the words the text speaks.
MODIFIER_WORDS: dict[ViewModifier, str] = {
    ViewModifier.MAGNIFICATION: "magnification",
    ViewModifier.SPOT_COMPRESSION: "spot",
    ViewModifier.ROLLED: "rolled",
    ViewModifier.IMPLANT_DISPLACED: "displaced",
    ViewModifier.TANGENTIAL: "tangential",
    ViewModifier.CLEAVAGE: "cleavage",
    ViewModifier.AXILLARY: "axillary",
    ViewModifier.NIPPLE_IN_PROFILE: "nipple",
    ViewModifier.INFRAMAMMARY_FOLD: "inframammary",
    ViewModifier.OTHER: OTHER,
}
#: Target / filter materials (CS defined terms) -> words; others -> "other".
MATERIAL_WORDS: dict[str, str] = {
    "MOLYBDENUM": "molybdenum", "RHODIUM": "rhodium", "TUNGSTEN": "tungsten",
    "ALUMINUM": "aluminum", "ALUMINIUM": "aluminum", "SILVER": "silver", "COPPER": "copper",
    "TITANIUM": "titanium", "NIOBIUM": "niobium", "LEAD": "lead", "TIN": "tin",
}

#: DetectorType (0018,7004) defined terms -> words.
DETECTOR_WORDS: dict[str, str] = {"DIRECT": "direct", "SCINTILLATOR": "scintillator",
                                  "STORAGE": "storage", "FILM": "film"}

#: Fixed words of the template itself.
_TEMPLATE_WORDS: tuple[str, ...] = (
    "exam", "age", "implant", "manufacturer", "model", "breast", "side", "view", "projection",
    "modifiers", "thickness", "force", "kvp", "exposure", "anode", "filter", "intent",
    "acquisition", "detector", "spacing",
    "yes", "no", "left", "right", "presentation", "processing", UNKNOWN, OTHER, NONE, ":", ".",
)
#: Words of the report-style sentences training adds (train.data.header_report): from the
#: header only, never from a label.
REPORT_WORDS: tuple[str, ...] = (
    "screening", "mammogram", "of", "the", "a", "patient", "in", "her", "with", "without",
    "implants", "acquired", "on", "unit", "compressed", "compression", "image", "for",
    "woman", "aged", "cc", "mlo", ",",
)


def _to_float(value: Any) -> float | None:
    """First value of a (possibly multi-valued) number; None when not a finite number."""
    try:
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            value = value[0]
        number = float(value)
    except MALFORMED_VALUE:
        return None
    return number if math.isfinite(number) else None


def _bin(value: float | None, edges: tuple[float, ...], words: tuple[str, ...],
         valid: tuple[float, float]) -> str:
    if value is None or not (valid[0] <= value <= valid[1]):
        return UNKNOWN
    return words[bisect_right(edges, value)]


def _parse_da(value: Any) -> date | None:
    text = str(value).strip() if value is not None else ""
    if not re.fullmatch(r"\d{8}", text):
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None


def _age_years(ds: Any) -> float | None:
    """PatientAge ('nnnY/M/W/D'), else StudyDate - PatientBirthDate."""
    raw = header_value(ds, "PatientAge")
    if raw is not None:
        match = re.fullmatch(r"\s*(\d{1,3})\s*([YMWDymwd]?)\s*", str(raw))
        if match:
            per_year = {"Y": 1.0, "": 1.0, "M": 12.0, "W": 365.25 / 7, "D": 365.25}
            return int(match.group(1)) / per_year[match.group(2).upper()]
    birth = _parse_da(header_value(ds, "PatientBirthDate"))
    study = _parse_da(header_value(ds, "StudyDate"))
    if birth is None or study is None:
        return None
    years = study.year - birth.year - ((study.month, study.day) < (birth.month, birth.day))
    return float(years)


def _words_of(text: Any) -> list[str]:
    return re.findall(r"[a-z0-9]+", str(text).lower())


def _manufacturer(ds: Any) -> str:
    raw = header_value(ds, "Manufacturer")
    if raw is None:
        return UNKNOWN
    for token in _words_of(raw):
        if token in MANUFACTURER_TOKENS:
            return MANUFACTURER_TOKENS[token]
    return OTHER if _words_of(raw) else UNKNOWN


def _model(ds: Any) -> str:
    raw = header_value(ds, "ManufacturerModelName")
    if raw is None or not _words_of(raw):
        return UNKNOWN
    kept: list[str] = []
    for token in _words_of(raw):
        word = _MODEL_ALIASES.get(token, token)
        if word in MODEL_WORDS and word not in kept:
            kept.append(word)
    return " ".join(kept) if kept else OTHER


def _implant(ds: Any) -> str:
    raw = header_value(ds, "BreastImplantPresent")
    text = str(raw).strip().upper() if raw is not None else ""
    return {"YES": "yes", "NO": "no"}.get(text, UNKNOWN)


def _side(view: Any) -> str:
    lat = getattr(view, "laterality", None)
    return {"L": "left", "R": "right"}.get(str(lat).upper() if lat else "", UNKNOWN)


def _projection(view: Any) -> str:
    code = getattr(view, "view", None)
    if not code:
        return UNKNOWN
    word = re.sub(r"[^a-z]", "", str(code).lower())
    return word if word in VIEW_CODES else OTHER


def _modifiers(ds: Any) -> str:
    """The view modifiers as words; ``unknown`` when the header cannot say, ``none`` when it
    says there are none (see :func:`cadnode.dicom.views.view_modifiers`)."""
    modifiers = view_modifiers(ds)
    if modifiers is None:
        return UNKNOWN
    words = sorted({MODIFIER_WORDS[m] for m in modifiers})
    return " ".join(words) if words else NONE


def _exposure_mas(ds: Any) -> float | None:
    micro = _to_float(header_value(ds, "ExposureInuAs"))
    if micro is not None:
        return micro / 1000.0
    return _to_float(header_value(ds, "Exposure"))


def _materials(ds: Any, keyword: str) -> str:
    raw = header_value(ds, keyword)
    if raw is None:
        return UNKNOWN
    try:
        values = [raw] if isinstance(raw, (str, bytes)) else list(raw)
        words: list[str] = []
        for value in values:
            text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
            text = text.strip().upper()
            if not text:
                continue
            word = MATERIAL_WORDS.get(text, OTHER)
            if word not in words:
                words.append(word)
    except MALFORMED_VALUE:
        return UNKNOWN
    return " ".join(words) if words else UNKNOWN


def _intent(ds: Any) -> str:
    intent = presentation_intent(ds)
    return UNKNOWN if intent is None else intent.value


def _safe(fn: Callable[..., str], *args: Any) -> str:
    """Run one field builder; a malformed header value -> unknown (the text never fails on
    what a modality wrote)."""
    try:
        return fn(*args)
    except MALFORMED_VALUE as exc:
        log.debug("clinical text: a header value could not be read (%s): unknown", exc)
        return UNKNOWN


def age_band(ds: pydicom.Dataset) -> str:
    """The age word of the text ("fifties", "unknown"); also the training subgroup key."""
    return _safe(lambda d: _bin(_age_years(d), AGE_EDGES, AGE_WORDS, AGE_RANGE), ds)


def _detector(ds: Any) -> str:
    raw = header_value(ds, "DetectorType")
    text = str(raw).strip().upper() if raw is not None else ""
    return DETECTOR_WORDS.get(text, OTHER if text else UNKNOWN)


def _spacing_mm(ds: Any) -> float | None:
    for keyword in ("ImagerPixelSpacing", "PixelSpacing"):
        value = _to_float(header_value(ds, keyword))
        if value is not None:
            return value
    return None


#: One level of the text: its name and its (key, value) fields, in template order.
Level = tuple[str, list[tuple[str, str]]]


def clinical_fields(ds: pydicom.Dataset, view: ViewInfo,
                    version: str = TEXT_TEMPLATE_VERSION) -> list[Level]:
    """The text's levels (exam, breast, view[, acquisition]) as (key, value) fields, from the
    header alone; deterministic, never raises."""
    if version not in TEXT_TEMPLATE_VERSIONS:
        raise ValueError(f"text template version {version!r}; this builder writes "
                         f"{', '.join(TEXT_TEMPLATE_VERSIONS)}")

    def binned(keyword: str, edges: tuple[float, ...], words: tuple[str, ...],
               valid: tuple[float, float]) -> str:
        return _safe(lambda d: _bin(_to_float(header_value(d, keyword)), edges, words, valid),
                     ds)

    exam = [("age", age_band(ds)), ("implant", _safe(_implant, ds)),
            ("manufacturer", _safe(_manufacturer, ds)), ("model", _safe(_model, ds))]
    breast = [("side", _safe(_side, view))]
    projection = [("projection", _safe(_projection, view)), ("modifiers", _safe(_modifiers, ds))]
    acquisition = [
        ("thickness", binned("BodyPartThickness", THICKNESS_EDGES, THICKNESS_WORDS,
                             THICKNESS_RANGE)),
        ("force", binned("CompressionForce", FORCE_EDGES, FORCE_WORDS, FORCE_RANGE)),
        ("kvp", binned("KVP", KVP_EDGES, KVP_WORDS, KVP_RANGE)),
        ("exposure", _safe(lambda d: _bin(_exposure_mas(d), EXPOSURE_EDGES, EXPOSURE_WORDS,
                                          EXPOSURE_RANGE), ds)),
        ("anode", _safe(_materials, ds, "AnodeTargetMaterial")),
        ("filter", _safe(_materials, ds, "FilterMaterial")),
    ]
    intent = [("intent", _safe(_intent, ds))]
    if version == "1":
        return [("exam", exam), ("breast", breast), ("view", projection + acquisition + intent)]
    details = [("detector", _safe(_detector, ds)),
               ("spacing", _safe(lambda d: _bin(_spacing_mm(d), SPACING_EDGES, SPACING_WORDS,
                                                SPACING_RANGE), ds))]
    return [("exam", exam), ("breast", breast), ("view", projection),
            ("acquisition", acquisition + details + intent)]


def render(levels: list[Level]) -> str:
    """``level: key value key value.`` for each level, joined by spaces."""
    return " ".join(f"{name}: " + " ".join(f"{k} {v}" for k, v in fields) + "."
                    for name, fields in levels)


def build_clinical_text(ds: pydicom.Dataset, view: ViewInfo,
                        version: str = TEXT_TEMPLATE_VERSION) -> str:
    """Hierarchical text from the header; deterministic, never raises."""
    return render(clinical_fields(ds, view, version))


def _split_words(phrases: Iterable[str]) -> set[str]:
    return {word for phrase in phrases for word in phrase.split()}


def template_vocabulary() -> list[str]:
    """Every word (and punctuation mark) the builder can emit, sorted; builds the tokenizer."""
    words = set(_TEMPLATE_WORDS)
    words |= _split_words(AGE_WORDS + THICKNESS_WORDS + FORCE_WORDS + KVP_WORDS + EXPOSURE_WORDS
                          + SPACING_WORDS + REPORT_WORDS)
    words |= set(DETECTOR_WORDS.values())
    words |= set(MANUFACTURER_TOKENS.values()) | set(MODEL_WORDS) | set(VIEW_CODES)
    words |= set(MODIFIER_WORDS.values()) | set(MATERIAL_WORDS.values())
    return sorted(words)
