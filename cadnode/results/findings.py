"""What the worker hands to the result builders: scores and findings on the original pixel grid.

The builders (`cad_sr`, `sc`, ...) turn these into DICOM; they never see an engine, so this
module is the whole contract between inference and reporting.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


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
    error: str | None = None  # why the view failed (not decodable...)

    @property
    def failed(self) -> bool:
        """A view with an error or without a score is reported as failed, never dropped."""
        return self.error is not None or self.cancer is None


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
