"""What the worker hands to the result builders: scores and findings on the original pixel grid.

The builders (`cad_sr`, `sc`, ...) turn these into DICOM; they never see an engine, so this
module is the whole contract between inference and reporting. It also says what was *not* read:
every received image that was passed over, with why, and every standard view that is missing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from cadnode import __version__


@dataclass
class ViewFinding:
    """One analysed (or failed) image of the study, in the source image's own pixel grid."""

    view_key: str  # "L-CC"
    laterality: str  # "L" | "R"
    view: str  # "CC" | "MLO" | ...
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    rows: int
    columns: int
    cancer: float | None  # probability, None when the view failed
    calcification: float | None
    center: tuple[float, float] | None  # (column, row) on the original grid
    outline: list[tuple[float, float]] = field(default_factory=list)  # closed polygon, same grid
    heatmap: np.ndarray | None = None  # float32 (h, w) in [0, 1] over the whole original image
    display: np.ndarray | None = None  # uint8 (h', w') whole image, original orientation
    error: str | None = None  # why the view failed, one line for a reader (no exception text)
    selected_because: str = ""  # why this image was read for its view (cadnode.dicom.selection)
    #: why the image is unlike the model's training images (cadnode.jobs.domain); empty: inside
    outside_domain: tuple[str, ...] = ()

    @property
    def failed(self) -> bool:
        """A view with an error or without a score is reported as failed, never dropped."""
        return self.error is not None or self.cancer is None

    def marked(self, thresholds: dict[str, float]) -> bool:
        """Whether the cancer region is drawn: analysed, localised, and at or above the cancer
        operating point (regions below it are not shown, in any object)."""
        return (not self.failed and self.center is not None
                and float(self.cancer or 0.0) >= thresholds.get("cancer", 0.5))


@dataclass(frozen=True)
class NotAnalysed:
    """A received image that the screening read passed over, and why."""

    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    label: str  # "L-CC spot compression+magnification", "R-ML", "unknown view"
    laterality: str | None
    reason: str  # one line

    @property
    def text(self) -> str:
        return f"{self.label} image {self.sop_instance_uid} not analysed: {self.reason}"


@dataclass(frozen=True)
class ObjectVersion:
    """An earlier result object of the same kind for the study, which a new one replaces."""

    sop_instance_uid: str
    series_uid: str
    sop_class_uid: str
    instance_number: int
    predecessor: ObjectVersion | None = None
    content_key: str = ""  # StudyFindings.content_key() of what it said ("" if not recorded)


@dataclass
class StudyFindings:
    """Everything the result objects report for one study."""

    study_uid: str
    views: list[ViewFinding]
    breasts: dict[str, dict[str, float]]  # {"L": {"cancer": p, "calcification": p}, "R": ...}
    exam: dict[str, float]  # {"cancer": p, "calcification": p}
    model_name: str
    model_version: str
    demo_model: bool
    thresholds: dict[str, float]  # operating points from the manifest ("cancer", "calcification")
    not_analysed: list[NotAnalysed] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)  # standard view key -> why
    previous: dict[str, ObjectVersion] = field(default_factory=dict)  # kind -> what it replaces

    @property
    def incomplete(self) -> bool:
        """A standard view is missing or could not be read: the exam was not fully analysed."""
        return bool(self.missing) or any(v.failed for v in self.views)

    def content_key(self) -> str:
        """A digest of what the objects say: the images read and passed over, the missing
        views, the rounded scores, failures and training-domain flags, the thresholds, the
        model and cadnode's own version. Result UIDs derive from it, so they change exactly
        when the content does."""
        doc = {
            "cadnode": __version__,
            "model": [self.model_name, self.model_version, self.demo_model],
            "thresholds": sorted((k, round(v, 6)) for k, v in self.thresholds.items()),
            "views": sorted(
                (v.view_key, v.sop_instance_uid, _pct(v.cancer), _pct(v.calcification),
                 v.error or "", v.marked(self.thresholds), list(v.outside_domain))
                for v in self.views),
            "breasts": sorted((s, sorted((k, _pct(p)) for k, p in d.items()))
                              for s, d in self.breasts.items()),
            "not_analysed": sorted((n.sop_instance_uid, n.reason) for n in self.not_analysed),
            "missing": sorted(self.missing.items()),
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode("utf-8")).hexdigest()


def _pct(p: float | None) -> float | None:
    return None if p is None else round(float(p) * 100.0, 2)
