"""Laterality, view, view modifiers and presentation intent of a mammogram, from any vendor's
header: the one copy of these header rules (the view selection, the text builder, the pixel
pipeline and the result objects call it).

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

* modifiers (spot compression, magnification, implant displaced...): see :func:`view_modifiers`;
* presentation intent: the SOP class, else ``PresentationIntentType`` (:func:`presentation_intent`).

Malformed values never raise; they are skipped as if absent.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.sequence import Sequence

from cadnode.dicom.enum import (
    SCREENING_VIEWS,
    STANDARD_VIEW_KEYS,
    Intent,
    View,
    ViewModifier,
)

__all__ = [
    "MALFORMED_VALUE",
    "STANDARD_VIEW_KEYS",
    "ViewInfo",
    "detect_view",
    "header_value",
    "orientation_directions",
    "presentation_intent",
    "view_modifiers",
]

#: What pydicom (or code reading a value) raises for a malformed header value: the value is
#: treated as absent ("unknown" in the clinical text). Any other exception is a bug and is
#: not hidden (in the text it would change the model's input silently).
MALFORMED_VALUE = (ValueError, TypeError, IndexError, KeyError, OverflowError, OSError,
                   EOFError, NotImplementedError, struct.error, InvalidDicomError,
                   BytesLengthException)


@dataclass(frozen=True)
class ViewInfo:
    """Side and view of one image and which header attributes decided them."""

    laterality: str | None  # "L" | "R" | None (unknown)
    view: str | None  # "CC" | "MLO" | "ML" | "LM" | "XCCL" | ... | None
    for_presentation: bool  # False for "For Processing" images
    source: str  # which attribute decided, e.g. "ViewPosition+ImageLaterality"
    modifiers: tuple[ViewModifier, ...] = ()  # spot, magnification, implant displaced...

    @property
    def screening(self) -> bool:
        """A CC or MLO without modifiers: what a screening read uses."""
        return self.view in SCREENING_VIEWS and not self.modifiers

    @property
    def key(self) -> str | None:
        """``"L-CC"``-style key, or None when side or view is unknown."""
        if self.laterality is None or self.view is None:
            return None
        return f"{self.laterality}-{self.view}"


# ViewPosition defined terms for mammography (PS3.3 C.8.11.7 / CID 4014 abbreviations).
_VIEW_TERMS: frozenset[str] = frozenset(v.value for v in View)

# CID 4014 "View for Mammography": SNOMED-CT (SCT) and legacy SNOMED-RT (SRT) code values.
# Checked against pydicom's SNOMED mapping (pydicom.sr._snomed_dict).
_VIEW_CODE_VALUES: dict[View, tuple[str, str]] = {  # (SCT, SRT)
    View.CC: ("399162004", "R-10242"),
    View.MLO: ("399368009", "R-10226"),
    View.ML: ("399260004", "R-10224"),
    View.LM: ("399352003", "R-10228"),
    View.LMO: ("399099002", "R-10230"),
    View.XCCL: ("399192008", "R-1024A"),
    View.XCCM: ("399101009", "R-1024B"),
    View.FB: ("399196006", "R-10244"),
    View.SIO: ("399188001", "R-102D0"),
    View.ISO: ("441555000", "R-40AAA"),
}
_VIEW_CODES: dict[str, View] = {code: v for v, codes in _VIEW_CODE_VALUES.items() for code in codes}

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


def header_value(ds: Any, keyword: str) -> Any:
    """``ds.keyword``, or None when absent, empty or malformed: one header attribute read the
    way view detection, the clinical text and the domain check all read it (never raises)."""
    if ds is None:
        return None
    try:
        value = getattr(ds, keyword, None)
    except MALFORMED_VALUE:  # pydicom raises on some malformed values when converting
        return None
    return None if value is None or value == "" else value


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


_VIEW_POSITION = re.compile(
    rf"^(?:(?P<pre>MAG|M|SPOT)[ _-]?)?(?P<view>{_VIEW_ALT})"
    r"(?:[ _-]?(?P<post>ID|IMP|SPOT|MAG))?$"
)
_POSITION_MODIFIERS: dict[str, ViewModifier] = {
    "ID": ViewModifier.IMPLANT_DISPLACED,
    "IMP": ViewModifier.IMPLANT_DISPLACED,
    "SPOT": ViewModifier.SPOT_COMPRESSION,
    "MAG": ViewModifier.MAGNIFICATION,
    "M": ViewModifier.MAGNIFICATION,
}


def _view_position(value: Any) -> tuple[str | None, tuple[ViewModifier, ...]]:
    """(view, modifiers) of a ViewPosition: "CC", or vendor forms such as "CCID" / "MLO ID"
    (implant displaced), "MCC" / "CC MAG" (magnified), "CC SPOT"."""
    vals = _strings(value)
    if len(vals) != 1:
        return None, ()
    m = _VIEW_POSITION.match(vals[0])
    if m is None:
        return None, ()
    mods = tuple(_POSITION_MODIFIERS[g] for g in (m.group("pre"), m.group("post")) if g)
    return m.group("view"), mods


def _first_item(seq: Any) -> Any:
    try:
        return seq[0] if seq is not None and len(seq) > 0 else None
    except Exception:  # noqa: BLE001
        return None


def _view_from_codes(ds: Dataset) -> str | None:
    try:
        seq = header_value(ds, "ViewCodeSequence")
        for item in seq or []:
            code = str(header_value(item, "CodeValue") or "").strip().upper()
            if code in _VIEW_CODES:
                return _VIEW_CODES[code]
            meaning = header_value(item, "CodeMeaning")
            if meaning:
                _, view = _parse_text(str(meaning))
                if view is not None:
                    return view
    except Exception:  # noqa: BLE001
        return None
    return None


def _frame_laterality(ds: Dataset) -> str | None:
    for seq_kw in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        group = _first_item(header_value(ds, seq_kw))
        anatomy = _first_item(header_value(group, "FrameAnatomySequence"))
        side = _side(header_value(anatomy, "FrameLaterality"))
        if side is not None:
            return side
    return None


def orientation_directions(ds: Dataset) -> tuple[str, str] | None:
    """PatientOrientation as its two direction strings (e.g. ("A", "R")), or None.

    Real modalities store the direction of increasing column index (left to right across the
    image) and of increasing row index; scanned film (CBIS-DDSM) stores a view code there
    instead, which is not a direction and gives None.
    """
    vals = _strings(header_value(ds, "PatientOrientation"))
    if len(vals) == 2 and all(re.fullmatch(r"[APLRHF]+", v) for v in vals):
        return vals[0], vals[1]
    return None


def chest_wall_on_right(directions: tuple[str, str] | None) -> bool | None:
    """Where the chest wall is, from the row direction: rows running towards anterior ("A")
    start at the chest wall, so it is on the left; towards posterior ("P"), on the right."""
    if directions is None:
        return None
    row = directions[0]
    if "A" in row and "P" not in row:
        return False
    if "P" in row and "A" not in row:
        return True
    return None


def _orientation(ds: Dataset) -> tuple[str | None, str | None]:
    """(side, view) from PatientOrientation.

    CBIS-DDSM stores the view there ("CC", "MLO"). For direction strings: in the standard display
    the chest wall of a left breast is on the image's left, of a right breast on its right.
    """
    vals = _strings(header_value(ds, "PatientOrientation"))
    view = next((v for v in vals if v in _VIEW_TERMS), None)
    side = {False: "L", True: "R", None: None}[chest_wall_on_right(orientation_directions(ds))]
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


def presentation_intent(ds: Dataset) -> Intent | None:
    """For Presentation or For Processing: the SOP class decides (it is the IOD), else
    ``PresentationIntentType``; None when the header says neither."""
    sop = _text(header_value(ds, "SOPClassUID")).strip()
    if sop in _MG_PRESENTATION_CLASSES:
        return Intent.PRESENTATION if _MG_PRESENTATION_CLASSES[sop] else Intent.PROCESSING
    intent = " ".join(_strings(header_value(ds, "PresentationIntentType")))
    if "PROCESSING" in intent:
        return Intent.PROCESSING
    if "PRESENTATION" in intent:
        return Intent.PRESENTATION
    return None


# CID 4015 View Modifier for Mammography: SNOMED-CT and legacy SNOMED-RT codes (checked against
# pydicom's SNOMED mapping, pydicom.sr._snomed_dict).
_MODIFIER_CODE_VALUES: dict[ViewModifier, tuple[str, ...]] = {  # SCT, SRT[, SCT, SRT ...]
    ViewModifier.SPOT_COMPRESSION: ("399055006", "R-102D7"),
    ViewModifier.MAGNIFICATION: ("399163009", "R-102D6"),
    ViewModifier.IMPLANT_DISPLACED: ("399209000", "R-102D5"),
    ViewModifier.ROLLED: ("399197002", "R-102D3", "399226006", "R-102D4",  # lateral, medial
                          "414493004", "R-102CA", "415670009", "R-102C9"),  # inferior, superior
    ViewModifier.TANGENTIAL: ("399110001", "R-102C2"),
    ViewModifier.CLEAVAGE: ("399161006", "R-102D2"),
    ViewModifier.AXILLARY: ("399011000", "R-102D1", "442580003", "R-40AB2"),  # tail, tissue
    ViewModifier.NIPPLE_IN_PROFILE: ("442581004", "R-40AB3"),
    ViewModifier.INFRAMAMMARY_FOLD: ("442593008", "R-40ABE"),
}
_MODIFIER_CODES = {code: m for m, codes in _MODIFIER_CODE_VALUES.items() for code in codes}
#: CodeMeaning keywords -> modifier, matched in this order; the meaning a sender wrote wins over
#: the code (legacy codes are often mis-mapped by vendors).
_MODIFIER_KEYWORDS: tuple[tuple[str, ViewModifier], ...] = (
    ("magnif", ViewModifier.MAGNIFICATION),
    ("spot", ViewModifier.SPOT_COMPRESSION),
    ("rolled", ViewModifier.ROLLED),
    ("implant displaced", ViewModifier.IMPLANT_DISPLACED),
    ("tangential", ViewModifier.TANGENTIAL),
    ("cleavage", ViewModifier.CLEAVAGE),
    ("axillary", ViewModifier.AXILLARY),
    ("nipple", ViewModifier.NIPPLE_IN_PROFILE),
    ("infra", ViewModifier.INFRAMAMMARY_FOLD),
)
# Words of a SeriesDescription that name a modifier ("L CC SPOT", "RMLO MAG"); "ID" only after
# a view word (see _description_modifiers).
_MODIFIER_WORDS: dict[str, ViewModifier] = {
    "SPOT": ViewModifier.SPOT_COMPRESSION,
    "MAG": ViewModifier.MAGNIFICATION, "MAGN": ViewModifier.MAGNIFICATION,
    "MAGNIFICATION": ViewModifier.MAGNIFICATION, "MAGNIFIED": ViewModifier.MAGNIFICATION,
    "EKLUND": ViewModifier.IMPLANT_DISPLACED,
}


def _modifier_item(item: Any) -> ViewModifier:
    meaning = _text(header_value(item, "CodeMeaning")).lower()
    for key, modifier in _MODIFIER_KEYWORDS:
        if key in meaning:
            return modifier
    code = _text(header_value(item, "CodeValue")).strip().upper()
    return _MODIFIER_CODES.get(code, ViewModifier.OTHER)


def _description_modifiers(ds: Dataset) -> list[ViewModifier]:
    """Modifier words of a SeriesDescription: SPOT, MAG..., EKLUND, IMPLANT DISPLACED, and
    "ID" only right after a view ("L CC ID", "LCCID"), never alone ("PATIENT ID 123")."""
    text = _text(header_value(ds, "SeriesDescription")).upper()
    words = [w for w in re.split(r"[^A-Z0-9]+", text) if w]
    found = [_MODIFIER_WORDS[w] for w in words if w in _MODIFIER_WORDS]
    view_word = re.compile(rf"[LR]?({_VIEW_ALT})|({_VIEW_ALT})[LR]")
    for i, w in enumerate(words):
        after_view = i > 0 and view_word.fullmatch(words[i - 1]) is not None
        if (w == "ID" and after_view) or re.fullmatch(rf"[LR]?({_VIEW_ALT})ID", w):
            found.append(ViewModifier.IMPLANT_DISPLACED)
    if "IMPLANT DISPLACED" in " ".join(words):
        found.append(ViewModifier.IMPLANT_DISPLACED)
    return found


def view_modifiers(ds: Dataset) -> tuple[ViewModifier, ...] | None:
    """The view's modifiers, sorted and without repeats; None when the header cannot say.

    Read from ``ViewModifierCodeSequence`` (inside ``ViewCodeSequence``, and at the top level
    where older modalities put it), vendor ``ViewPosition`` forms ("CCID", "MCC") and
    ``SeriesDescription`` words ("SPOT", "MAG", "ID" after a view; only when no code and no
    ViewPosition form says anything). A ``ViewCodeSequence`` without
    modifiers means none (the modifier sequence is Type 2 there); no view code sequence and no
    other sign means unknown.
    """
    found: list[ViewModifier] = []
    known = False
    try:
        view_codes = header_value(ds, "ViewCodeSequence")
        sequences = []
        if view_codes is not None and len(view_codes) > 0:
            known = True
            sequences.append(header_value(view_codes[0], "ViewModifierCodeSequence"))
        top = header_value(ds, "ViewModifierCodeSequence")
        if top is not None:
            known = True
            sequences.append(top)
        for seq in sequences:  # only real sequences: a wrong VR ("SPOT" as LO) is ignored
            if isinstance(seq, Sequence):
                found.extend(_modifier_item(item) for item in seq)
        found.extend(_view_position(header_value(ds, "ViewPosition"))[1])
        if not known and not found:  # free text only where the codes and ViewPosition are silent
            found.extend(_description_modifiers(ds))
    except Exception:  # noqa: BLE001 - a malformed value is as good as absent
        pass
    if not found and not known:
        return None
    return tuple(sorted(set(found)))


def detect_view(ds: Dataset) -> ViewInfo:
    """Side, view and presentation intent of ``ds`` by the module's documented precedence."""
    view: str | None = None
    view_src = "none"
    side: str | None = None
    side_src = "none"

    for kw in ("ViewPosition", "ViewCodeSequence"):
        v = (_view_position(header_value(ds, kw))[0] if kw == "ViewPosition"
             else _view_from_codes(ds))
        if v is not None:
            view, view_src = v, kw
            break

    for kw in ("ImageLaterality", "Laterality"):
        s = _side(header_value(ds, kw))
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
        raw = header_value(ds, kw)
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
        for_presentation=presentation_intent(ds) is not Intent.PROCESSING,
        source=f"{view_src}+{side_src}",
        modifiers=view_modifiers(ds) or (),
    )
