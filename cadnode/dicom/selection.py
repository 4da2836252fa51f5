"""Which image is read for each screening view, and why every other image is not.

A real study holds more than the four screening images: spot-compression and magnified views,
implant-displaced views, repeats, For Processing copies, a prior routed into the same study. The
screening read uses, per breast, the current, unmodified For Presentation CC and MLO. The rules,
applied in this order to every received image (the first that applies decides):

1. side and view must be known (``cadnode.dicom.views.detect_view``);
2. For Processing images are not read (raw detector data; the model reads For Presentation);
3. only CC and MLO are read; ML, LM, XCCL and the other projections are "not analysed", and the
   report names them beside the standard view they do not replace;
4. a view with modifiers (spot compression, magnification, rolled, tangential, cleavage...) is a
   diagnostic view and is not read; implant-displaced views follow :class:`ImplantPolicy`;
5. an image acquired on an earlier day than the latest image that passes rules 1-4 is a prior
   and is not read (acquisition date/time, else content, else series date/time; an image
   without any date counts as current). The whole study is one exam: a prior never stands in
   for a view the current exam lacks;
6. of what remains for one view, the later acquisition wins (a repeat after a rejected image)
   when every one of them has an acquisition time; otherwise the last received wins.

This module is the one place these rules live: the assembler (is the study complete?), the
worker (what is read), the results (what is reported) and the training adapters all call
:func:`select_views`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Generic, TypeVar

from pydicom.dataset import Dataset

from cadnode.dicom.enum import SCREENING_VIEWS, STANDARD_VIEW_KEYS, ViewModifier
from cadnode.dicom.views import ViewInfo, detect_view

__all__ = [
    "Candidate",
    "Decision",
    "ImplantPolicy",
    "Rule",
    "Selection",
    "acquisition_datetime",
    "candidate",
    "select_views",
]

K = TypeVar("K")


class Rule(StrEnum):
    """Which rule decided an image (the numbered rules of the module docstring)."""

    READ = "read"
    UNKNOWN_VIEW = "unknown view"
    FOR_PROCESSING = "For Processing"
    OTHER_PROJECTION = "not a screening projection"
    MODIFIED = "diagnostic (modified) view"
    IMPLANT_DISPLACED = "implant-displaced view"
    PRIOR = "prior exam"
    SUPERSEDED = "another image of the view was read"


class ImplantPolicy(StrEnum):
    """What is read for a breast with implant-displaced (ID) views (CADNODE_IMPLANT_VIEWS)."""

    FALLBACK = "fallback"  # the standard view; its ID view only when the standard one is missing
    STANDARD = "standard"  # the standard view only; ID views are never read
    PREFER = "prefer"  # the ID view when there is one, else the standard view


@dataclass(frozen=True)
class Candidate(Generic[K]):
    """One received image as the selection sees it."""

    ref: K  # what the caller wants back (a path, a row id)
    info: ViewInfo
    acquired: str = ""  # "YYYYMMDDHHMMSS.ffffff" (see acquisition_datetime), "" when unknown
    arrival: int = 0  # order of arrival; later is larger
    uid: str = ""  # SOP Instance UID, for the report

    @property
    def label(self) -> str:
        """"L-CC", "L-CC spot compression+magnification", "R-ML", "unknown view"."""
        key = self.info.key or (
            f"{self.info.laterality or '?'}-{self.info.view or '?'}"
            if self.info.laterality or self.info.view else "unknown view")
        mods = "+".join(m.value for m in self.info.modifiers)
        return f"{key} {mods}" if mods else key


@dataclass(frozen=True)
class Decision(Generic[K]):
    """What the selection decided for one image: read (for ``key``) or not, and why."""

    candidate: Candidate[K]
    key: str | None  # the view key it was judged for; None when side or view is unknown
    analysed: bool
    reason: str  # one line, for the report and the job record
    rule: Rule = Rule.READ


@dataclass(frozen=True)
class Selection(Generic[K]):
    """The decisions for every image of a study and the standard views left without one."""

    decisions: tuple[Decision[K], ...]
    missing: dict[str, str]  # standard view key -> why nothing is read for it

    @property
    def chosen(self) -> dict[str, K]:
        """Standard view key -> the image read for it, in STANDARD_VIEW_KEYS order."""
        by_key = {d.key: d.candidate.ref for d in self.decisions if d.analysed and d.key}
        return {k: by_key[k] for k in STANDARD_VIEW_KEYS if k in by_key}

    @property
    def complete(self) -> bool:
        """All four standard views have an image to read."""
        return not self.missing

    @property
    def not_analysed(self) -> list[Decision[K]]:
        return [d for d in self.decisions if not d.analysed]


_DATE_TIME_KEYWORDS = (
    ("AcquisitionDate", "AcquisitionTime"),
    ("ContentDate", "ContentTime"),
    ("SeriesDate", "SeriesTime"),
)


def _value(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - a malformed element counts as absent
        return ""
    return str(value).strip() if isinstance(value, (str, int, float)) else ""


def _normalise(date: str, time: str) -> str:
    """"YYYYMMDD" + "HHMMSS[.ffffff]" -> "YYYYMMDDHHMMSS.ffffff" (missing time parts as 0)."""
    if not re.fullmatch(r"\d{8}", date):
        return ""
    m = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?", time.replace(":", ""))
    if m is None:
        return f"{date}000000.000000"
    hh, mm, ss, frac = (m.group(i) or "" for i in range(1, 5))
    return f"{date}{hh}{mm or '00'}{ss or '00'}.{frac.ljust(6, '0')}"


def acquisition_datetime(ds: Dataset) -> str:
    """When the image was acquired, as a sortable string; "" when the header does not say.

    AcquisitionDateTime, else AcquisitionDate/Time, else ContentDate/Time, else SeriesDate/Time.
    StudyDate is not used: every image of a study shares it, a prior routed into it too.
    """
    dt = _value(ds, "AcquisitionDateTime")
    if len(dt) >= 8:
        found = _normalise(dt[:8], re.split(r"[+-]", dt[8:])[0])
        if found:
            return found
    for date_kw, time_kw in _DATE_TIME_KEYWORDS:
        found = _normalise(_value(ds, date_kw), _value(ds, time_kw))
        if found:
            return found
    return ""


def candidate(ref: K, ds: Dataset, arrival: int = 0) -> Candidate[K]:
    """The candidate for one header (the worker's and the training adapters' entry point)."""
    return Candidate(ref, detect_view(ds), acquisition_datetime(ds), arrival,
                     _value(ds, "SOPInstanceUID"))


def _day(acquired: str) -> str:
    return f"{acquired[:4]}-{acquired[4:6]}-{acquired[6:8]}" if acquired else "unknown"


def _implant_only(info: ViewInfo) -> bool:
    return bool(info.modifiers) and set(info.modifiers) == {ViewModifier.IMPLANT_DISPLACED}


def _excluded(c: Candidate[Any], current_day: str,
              policy: ImplantPolicy) -> tuple[Rule, str] | None:
    """Why ``c`` cannot be read for any view (rules 1-5), or None (``current_day`` "" skips
    rule 5)."""
    info = c.info
    if info.key is None:
        return Rule.UNKNOWN_VIEW, "side or view could not be identified from the header"
    if not info.for_presentation:
        return Rule.FOR_PROCESSING, ("For Processing image (raw detector data); the model "
                                     "reads For Presentation images")
    if info.view not in SCREENING_VIEWS:
        return Rule.OTHER_PROJECTION, (f"{info.view} is not a screening projection (the model "
                                       "reads CC and MLO)")
    if info.modifiers and not _implant_only(info):
        mods = ", ".join(m.value for m in info.modifiers if m is not ViewModifier.IMPLANT_DISPLACED)
        return Rule.MODIFIED, f"{mods} view: a diagnostic view, not a screening view"
    if _implant_only(info) and policy is ImplantPolicy.STANDARD:
        return Rule.IMPLANT_DISPLACED, ("implant-displaced view (CADNODE_IMPLANT_VIEWS=standard: "
                                        "never read)")
    if c.acquired and current_day and c.acquired[:8] < current_day:
        return Rule.PRIOR, (f"prior exam: acquired {_day(c.acquired)}, the current exam on "
                            f"{_day(current_day)}")
    return None


def _rank(c: Candidate[Any], policy: ImplantPolicy, by_time: bool) -> tuple[int, str, int]:
    implant = _implant_only(c.info)
    preferred = implant if policy is ImplantPolicy.PREFER else not implant
    return (int(preferred), c.acquired if by_time else "", c.arrival)


def _passed_over(loser: Candidate[Any], winner: Candidate[Any], policy: ImplantPolicy,
                 by_time: bool) -> str:
    if _implant_only(loser.info) != _implant_only(winner.info):
        if _implant_only(loser.info):
            return (f"implant-displaced view; the standard {winner.label} was read "
                    f"(CADNODE_IMPLANT_VIEWS={policy.value})")
        return (f"standard view; the implant-displaced {winner.label} was read "
                f"(CADNODE_IMPLANT_VIEWS={policy.value})")
    if by_time and loser.acquired < winner.acquired:
        return (f"earlier acquisition of {winner.label} (repeat); the later one, acquired "
                f"{_clock(winner.acquired)}, was read")
    return f"another image of {winner.label} was received later and was read"


def _clock(acquired: str) -> str:
    return f"{_day(acquired)} {acquired[8:10]}:{acquired[10:12]}:{acquired[12:14]}"


def _read_reason(c: Candidate[Any], rivals: int) -> str:
    parts = ["For Presentation", "implant-displaced view" if _implant_only(c.info)
             else "screening view"]
    if c.acquired:
        parts.append(f"acquired {_clock(c.acquired)}")
    if rivals:
        parts.append(f"chosen over {rivals} other image(s) of this view")
    return ", ".join(parts)


def _missing_reason(key: str, decisions: list[Decision[Any]]) -> str:
    side = key[0]
    related = [d for d in decisions if not d.analysed and (
        d.key == key or (d.key is not None and d.key[0] == side
                         and d.candidate.info.view not in SCREENING_VIEWS))]
    if not related:
        return f"no {key} image received"
    names = "; ".join(f"{d.candidate.label}: {d.reason}" for d in related)
    return f"no {key} image that can be read; received but not analysed: {names}"


def select_views(
    candidates: Iterable[Candidate[K]], policy: ImplantPolicy = ImplantPolicy.FALLBACK
) -> Selection[K]:
    """Decide, for every image, whether it is read for its standard view, and why (see the
    module docstring for the rules)."""
    items = list(candidates)
    # the current exam: the latest day on which an image that could be read (rules 1-4) was
    # acquired; a diagnostic work-up or an unidentified image routed in must not decide it
    dated = [c.acquired[:8] for c in items
             if c.acquired and _excluded(c, "", policy) is None]
    current_day = max(dated, default="")
    decisions: dict[int, Decision[K]] = {}
    eligible: dict[str, list[tuple[int, Candidate[K]]]] = {}
    for i, c in enumerate(items):
        why = _excluded(c, current_day, policy)
        if why is not None:
            decisions[i] = Decision(c, c.info.key, False, why[1], why[0])
        else:
            eligible.setdefault(str(c.info.key), []).append((i, c))
    for key, group in eligible.items():
        by_time = all(c.acquired for _, c in group)  # mixed or unknown times: arrival decides
        best_i, best = max(group, key=lambda ic: _rank(ic[1], policy, by_time))
        decisions[best_i] = Decision(best, key, True, _read_reason(best, len(group) - 1))
        for i, c in group:
            if i != best_i:
                rule = (Rule.IMPLANT_DISPLACED if _implant_only(c.info) != _implant_only(best.info)
                        else Rule.SUPERSEDED)
                decisions[i] = Decision(c, key, False, _passed_over(c, best, policy, by_time),
                                        rule)
    ordered = [decisions[i] for i in range(len(items))]
    read = {d.key for d in ordered if d.analysed}
    missing = {k: _missing_reason(k, ordered) for k in STANDARD_VIEW_KEYS if k not in read}
    return Selection(tuple(ordered), missing)
