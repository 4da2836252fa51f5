"""View scores -> breast and exam scores.

Per breast: the maximum over that breast's views (a lesion is often seen well in only one
projection, so averaging would dilute it); per exam: the maximum over breasts. Views whose score is
missing (None) or not finite (a failed view) are skipped; a breast or exam with no valid view for a
score has no entry for it. Score names are taken from the inner keys (usually "cancer" and
"calcification").
"""

from __future__ import annotations

import math
from collections.abc import Mapping

SIDES: tuple[str, ...] = ("L", "R")


def _side(view_key: str) -> str:
    side = view_key.split("-", 1)[0].strip().upper()
    if side not in SIDES or "-" not in view_key:
        raise ValueError(f"view key {view_key!r} is not of the form 'L-CC' / 'R-MLO'")
    return side


def aggregate(view_scores: Mapping[str, Mapping[str, float | None]]
              ) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """{"L-CC": {"cancer": p, ...}, ...} -> ({"L": {...}, "R": {...}}, {"cancer": p, ...})."""
    breasts: dict[str, dict[str, float]] = {}
    for key in sorted(view_scores):
        side = _side(key)
        for name, value in view_scores[key].items():
            if value is None:
                continue
            score = float(value)
            if not math.isfinite(score):
                continue
            current = breasts.setdefault(side, {})
            current[name] = max(score, current.get(name, -math.inf))
    exam: dict[str, float] = {}
    for side in sorted(breasts):
        for name, score in breasts[side].items():
            exam[name] = max(score, exam.get(name, -math.inf))
    return breasts, exam
