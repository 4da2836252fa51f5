"""The record every dataset adapter yields, whatever its layout."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from cadnode.dicom.views import ViewInfo


@dataclass(frozen=True)
class Lesion:
    """A marked finding on the source image: where it is, what it is, whether it counts.

    ``box`` is (x0, y0, x1, y1) in pixels of the image as stored (column, row; pixel centres),
    the frame in which the node reports coordinates. ``malignant`` says whether the finding is
    the reason for a positive cancer label (the heatmap is scored on those).
    """

    kind: str  # "mass" | "calcification" | another finding name
    box: tuple[float, float, float, float]
    malignant: bool


@dataclass
class Sample:
    """One view of one exam, with what the model reads and what it should answer.

    ``header`` is what the text builder reads. For DICOM inputs it is the file's own header
    (without pixels); for CSV layouts the adapter writes the CSV's fields into a pydicom Dataset
    under their DICOM keywords (PatientAge, ViewPosition, ImageLaterality, BreastImplantPresent,
    Manufacturer, ...), so training and serving build text with the same code.
    """

    image: Path | Callable[[], Dataset | np.ndarray]  # DICOM/PNG path, or a loader
    header: Dataset
    view: ViewInfo
    cancer: int | None  # 1 malignant, 0 not; None when the dataset does not say
    calcification: int | None  # 1 (suspicious) calcification present, 0 absent, None unknown
    patient_id: str
    exam_id: str  # views of one exam share it; splits are made by patient
    density: str | None = None  # "A".."D" when the dataset provides it
    groups: dict[str, str] = field(default_factory=dict)  # subgroup keys: manufacturer, age_band
    lesions: list[Lesion] = field(default_factory=list)  # marked findings, when the data has them
    official_split: str | None = None  # "train" | "test" where the dataset publishes a split
