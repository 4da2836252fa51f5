"""Laterality, view and presentation intent of a mammogram, from any vendor's header.

Real headers disagree about where they put the side and the view: digital modalities fill
``ViewPosition``/``ImageLaterality``, some only ``ViewCodeSequence``, scanned film (CBIS-DDSM) puts
the view in ``PatientOrientation`` and the side in ``Laterality``, tomosynthesis puts the side in
``FrameLaterality``. :func:`detect_view` tries each place in a fixed precedence and records which
attribute decided in ``ViewInfo.source`` so a wrong answer can be traced to the header.

Precedence (first usable value wins, later sources are not consulted, so a contradiction is
resolved in favour of the earlier source):

* view: ``ViewPosition`` > ``ViewCodeSequence`` > ``PatientOrientation`` (view codes such as
  ``CC``/``MLO`` in that attribute) > ``SeriesDescription`` > ``ProtocolName`` >
  ``StudyDescription``
* side: ``ImageLaterality`` > ``Laterality`` > ``FrameLaterality`` (shared, then first per-frame
  functional group) > ``PatientOrientation`` row direction > the same description texts.

Malformed values never raise; they are skipped as if absent.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from pydicom.dataset import Dataset

__all__ = ["ViewInfo", "detect_view", "select_views", "STANDARD_VIEW_KEYS"]

K = TypeVar("K")

#: The four screening views that the model reads, in the order results list them.
STANDARD_VIEW_KEYS: tuple[str, ...] = ("L-CC", "L-MLO", "R-CC", "R-MLO")


@dataclass(frozen=True)
class ViewInfo:
    """Side and view of one image and which header attributes decided them."""

    laterality: str | None  # "L" | "R" | None (unknown)
    view: str | None  # "CC" | "MLO" | "ML" | "LM" | "XCCL" | ... | None
    for_presentation: bool  # False for "For Processing" images
    source: str  # which attribute decided, e.g. "ViewPosition+ImageLaterality"

    @property
    def key(self) -> str | None:
        """``"L-CC"``-style key, or None when side or view is unknown."""
        if self.laterality is None or self.view is None:
            return None
        return f"{self.laterality}-{self.view}"


# ViewPosition defined terms for mammography (PS3.3 C.8.11.7 / CID 4014 abbreviations).
_VIEW_TERMS: frozenset[str] = frozenset(
    {
        "CC",
        "MLO",
        "ML",
        "LM",
        "LMO",
        "XCC",
        "XCCL",
        "XCCM",
        "FB",
        "SIO",
        "ISO",
        "CV",
        "AT",
        "RL",
        "RM",
        "RS",
        "RI",
        "TAN",
        "SPECIMEN",
    }
)

# CID 4014 "View for Mammography": SNOMED-CT (SCT) and legacy SNOMED-RT (SRT) code values.
# Checked against pydicom's SNOMED mapping (pydicom.sr._snomed_dict).
_VIEW_CODES: dict[str, str] = {
    "399162004": "CC",
    "R-10242": "CC",
    "399368009": "MLO",
    "R-10226": "MLO",
    "399260004": "ML",
    "R-10224": "ML",
    "399352003": "LM",
    "R-10228": "LM",
    "399099002": "LMO",
    "R-10230": "LMO",
    "399192008": "XCCL",
    "R-1024A": "XCCL",
    "399101009": "XCCM",
    "R-1024B": "XCCM",
    "399196006": "FB",
    "R-10244": "FB",
    "399188001": "SIO",
    "R-102D0": "SIO",
    "441555000": "ISO",
    "R-40AAA": "ISO",
}

# Words in free text (series description, protocol name) that name a view.
_VIEW_WORDS: dict[str, str] = {
    "CRANIOCAUDAL": "CC",
    "CRANIO-CAUDAL": "CC",
    "CAUDAL": "CC",
    "MEDIOLATERAL": "ML",
    "LATEROMEDIAL": "LM",
}
_SIDE_WORDS: dict[str, str] = {
    "L": "L",
    "LEFT": "L",
    "LT": "L",
    "LINKS": "L",
    "GAUCHE": "L",
    "SINISTRA": "L",
    "R": "R",
    "RIGHT": "R",
    "RT": "R",
    "RECHTS": "R",
    "DROITE": "R",
    "DESTRA": "R",
}
_VIEW_ALT = "|".join(sorted(_VIEW_TERMS, key=len, reverse=True))
_COMPACT = re.compile(rf"^([LR])({_VIEW_ALT})$")  # "RMLO", "LCC"
_COMPACT_REV = re.compile(rf"^({_VIEW_ALT})([LR])$")  # "CCL", "MLOR"

_MG_PRESENTATION_CLASSES: dict[str, bool] = {
    "1.2.840.10008.5.1.4.1.1.1.2": True,  # Digital Mammography X-Ray - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.2.1": False,  # Digital Mammography X-Ray - For Processing
    "1.2.840.10008.5.1.4.1.1.1.1": True,  # Digital X-Ray - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1": False,  # Digital X-Ray - For Processing
    "1.2.840.10008.5.1.4.1.1.1.3": True,  # Intra-oral X-Ray - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.3.1": False,  # Intra-oral X-Ray - For Processing
    "1.2.840.10008.5.1.4.1.1.13.1.4": True,  # Breast Projection X-Ray - For Presentation
    "1.2.840.10008.5.1.4.1.1.13.1.5": False,  # Breast Projection X-Ray - For Processing
}


def _get(ds: Any, keyword: str) -> Any:
    """``ds.keyword`` or None; a malformed element never raises."""
    try:
        return getattr(ds, keyword, None) if ds is not None else None
    except Exception:  # noqa: BLE001 - bad VR/values in real files must not stop a study
        return None


def _strings(value: Any) -> list[str]:
    """A DICOM value (single or multi) as a list of stripped upper-case strings."""
    if value is None:
        return []
    try:
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        if isinstance(value, str):
            items = value.split("\\")
        else:
            items = [str(v) for v in value]
    except Exception:  # noqa: BLE001
        return []
    return [s.strip().upper() for s in items if s is not None and str(s).strip()]


def _side(value: Any) -> str | None:
    vals = _strings(value)
    if len(vals) == 1 and vals[0] in ("L", "R"):
        return vals[0]
    return None


def _view_term(value: Any) -> str | None:
    vals = _strings(value)
    if len(vals) == 1 and vals[0] in _VIEW_TERMS:
        return vals[0]
    return None


def _first_item(seq: Any) -> Any:
    try:
        return seq[0] if seq is not None and len(seq) > 0 else None
    except Exception:  # noqa: BLE001
        return None


def _view_from_codes(ds: Dataset) -> str | None:
    try:
        seq = _get(ds, "ViewCodeSequence")
        for item in seq or []:
            code = str(_get(item, "CodeValue") or "").strip().upper()
            if code in _VIEW_CODES:
                return _VIEW_CODES[code]
            meaning = _get(item, "CodeMeaning")
            if meaning:
                _, view = _parse_text(str(meaning))
                if view is not None:
                    return view
    except Exception:  # noqa: BLE001
        return None
    return None


def _frame_laterality(ds: Dataset) -> str | None:
    for seq_kw in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        group = _first_item(_get(ds, seq_kw))
        anatomy = _first_item(_get(group, "FrameAnatomySequence"))
        side = _side(_get(anatomy, "FrameLaterality"))
        if side is not None:
            return side
    return None


def _orientation(ds: Dataset) -> tuple[str | None, str | None]:
    """(side, view) from PatientOrientation.

    CBIS-DDSM stores the view there ("CC", "MLO"). Real modalities store two direction
    strings; the first is the direction of increasing column index (left to right across the
    image). In the standard display the chest wall of a left breast is on the image's left, so the
    rows run towards anterior ("A"); for a right breast they run towards posterior ("P").
    """
    vals = _strings(_get(ds, "PatientOrientation"))
    view = next((v for v in vals if v in _VIEW_TERMS), None)
    side = None
    if len(vals) == 2 and all(re.fullmatch(r"[APLRHF]+", v) for v in vals):
        row = vals[0]
        if "A" in row and "P" not in row:
            side = "L"
        elif "P" in row and "A" not in row:
            side = "R"
    return side, view


def _parse_text(text: str) -> tuple[str | None, str | None]:
    """(side, view) named in a free-text description such as "L CC", "RMLO", "LEFT_CC"."""
    words = [w for w in re.split(r"[^A-Z0-9]+", text.upper()) if w]
    side: str | None = None
    view: str | None = None
    for w in words:
        if w in _VIEW_TERMS:
            view = view or w
            continue
        m = _COMPACT.match(w) or _COMPACT_REV.match(w)
        if m:
            a, b = m.groups()
            s, v = (a, b) if a in ("L", "R") and b in _VIEW_TERMS else (b, a)
            side, view = side or s, view or v
            continue
        if side is None and w in _SIDE_WORDS:
            side = _SIDE_WORDS[w]
    if view is None:
        joined = " ".join(words)
        if "OBLIQUE" in words or "OBL" in words:
            view = "LMO" if "LATERO" in joined else "MLO"
        else:
            view = next((_VIEW_WORDS[w] for w in words if w in _VIEW_WORDS), None)
    return side, view


def _text(value: Any) -> str:
    """A plain value as text; "" for anything else (a sequence under a wrong VR, for example,
    whose ``str()`` would convert, and may fail on, every element it holds)."""
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return str(value) if isinstance(value, (str, int, float)) else ""


def _for_presentation(ds: Dataset) -> bool:
    """For Processing images are raw detector data the model must not read."""
    sop = _text(_get(ds, "SOPClassUID")).strip()
    if sop in _MG_PRESENTATION_CLASSES:
        return _MG_PRESENTATION_CLASSES[sop]
    intent = " ".join(_strings(_get(ds, "PresentationIntentType")))
    if "PROCESSING" in intent:
        return False
    return True


def detect_view(ds: Dataset) -> ViewInfo:
    """Side, view and presentation intent of ``ds`` by the module's documented precedence."""
    view: str | None = None
    view_src = "none"
    side: str | None = None
    side_src = "none"

    for kw, fn in (("ViewPosition", _view_term), ("ViewCodeSequence", None)):
        v = fn(_get(ds, kw)) if fn is not None else _view_from_codes(ds)
        if v is not None:
            view, view_src = v, kw
            break

    for kw in ("ImageLaterality", "Laterality"):
        s = _side(_get(ds, kw))
        if s is not None:
            side, side_src = s, kw
            break
    if side is None:
        s = _frame_laterality(ds)
        if s is not None:
            side, side_src = s, "FrameLaterality"

    if view is None or side is None:
        o_side, o_view = _orientation(ds)
        if view is None and o_view is not None:
            view, view_src = o_view, "PatientOrientation"
        if side is None and o_side is not None:
            side, side_src = o_side, "PatientOrientation"

    for kw in ("SeriesDescription", "ProtocolName", "StudyDescription"):
        if view is not None and side is not None:
            break
        raw = _get(ds, kw)
        if not raw:
            continue
        try:
            t_side, t_view = _parse_text(_text(raw))
        except Exception:  # noqa: BLE001
            continue
        if view is None and t_view is not None:
            view, view_src = t_view, kw
        if side is None and t_side is not None:
            side, side_src = t_side, kw

    return ViewInfo(
        laterality=side,
        view=view,
        for_presentation=_for_presentation(ds),
        source=f"{view_src}+{side_src}",
    )


def select_views(candidates: Iterable[tuple[K, ViewInfo]]) -> dict[str, K]:
    """One image per standard view key ("L-CC", "L-MLO", "R-CC", "R-MLO").

    A For Presentation image beats a For Processing one; among equals the one given last wins
    (callers pass images in arrival order, so a re-sent or re-taken image replaces the earlier
    one). Images of unknown side or view, and other views (ML, XCCL...), are ignored.
    """
    chosen: dict[str, tuple[K, bool]] = {}
    for ref, info in candidates:
        key = info.key
        if key not in STANDARD_VIEW_KEYS:
            continue
        prev = chosen.get(key)
        if prev is None or info.for_presentation or not prev[1]:
            chosen[key] = (ref, info.for_presentation)
    return {k: chosen[k][0] for k in STANDARD_VIEW_KEYS if k in chosen}
