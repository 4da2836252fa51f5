"""EMBED (Emory Breast Imaging Dataset) style CSVs.

``<root>/EMBED_OpenData_clinical.csv``: one row per finding (or one per exam without findings):
empi_anon, acc_anon, side (L/R/B/empty), asses (BI-RADS letter), path_severity, calcfind,
calcdistri, age_at_study, tissueden, ... ``<root>/EMBED_OpenData_metadata.csv``: one row per
image: empi_anon, acc_anon, anon_dicom_path, ImageLateralityFinal, ViewPosition, FinalImageType,
Manufacturer, ManufacturerModelName, spot_mag, ... The metadata's ``anon_dicom_path`` is the path
on Emory's server; it is used as is when it exists, else relative to ``root``, else with leading
components dropped until it exists under ``root`` (``/mnt/NAS2/.../cohort_1/x.dcm`` ->
``root/cohort_1/x.dcm``). A ``.png`` beside a missing ``.dcm`` is accepted.

Only ``FinalImageType`` 2D images are read by default (``image_types=``; C-view synthetic 2D and ROI
captures are excluded), and spot/magnification views (``spot_mag`` = 1) are skipped.

Label rules, per image, over the clinical rows of the same ``acc_anon`` whose ``side`` is the
image's side, ``B`` (both) or empty (exam level):

* cancer: 1 when any has path_severity 0 (invasive) or 1 (in situ), or asses ``K`` (BI-RADS 6,
  known malignancy); else None when any has asses ``A``, ``S`` or ``M`` (BI-RADS 0/4/5) without a
  recorded path_severity (the outcome is not in the table); else 0.
* calcification: 1 when any has a non-empty ``calcfind`` or ``calcdistri``, else 0.
* density: ``tissueden`` 1-4 -> A-D (5, male, -> None). Images of an exam with no clinical row are
  skipped and counted in one warning.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from train.datasets._common import (
    DatasetError,
    Problems,
    Row,
    build_header,
    check_image,
    check_ragged,
    groups_for,
    log,
    parse_age,
    parse_density,
    parse_number,
    parse_side,
    parse_view,
    read_csv,
)
from train.datasets.base import Sample

CLINICAL_CSV = "EMBED_OpenData_clinical.csv"
METADATA_CSV = "EMBED_OpenData_metadata.csv"
CLINICAL_REQUIRED = ("acc_anon", "side", "asses", "path_severity")
METADATA_REQUIRED = ("empi_anon", "acc_anon", "anon_dicom_path", "ImageLateralityFinal",
                     "ViewPosition")
ASSESSMENTS = {"A", "N", "B", "P", "S", "M", "K", "X"}
_PENDING = {"A", "S", "M"}


def _clinical(path: Path, problems: Problems) -> dict[str, list[Row]]:
    """Clinical rows by accession, validated once here so labels never meet a bad value."""
    by_exam: dict[str, list[Row]] = {}
    for row in read_csv(path, CLINICAL_REQUIRED):
        try:
            check_ragged(row)
            acc = row.require("acc_anon")
            side = row.get("side")
            if side is not None and side.upper() not in ("L", "R", "B"):
                raise row.error(f"column 'side': expected L, R, B or empty, got {side!r}")
            asses = row.get("asses")
            if asses is not None and asses.upper() not in ASSESSMENTS:
                raise row.error(f"column 'asses': unknown BI-RADS letter {asses!r}")
            severity = parse_number(row, "path_severity")
            if severity is not None and severity not in range(7):
                raise row.error(f"column 'path_severity': expected 0-6, got {severity!r}")
            parse_age(row, "age_at_study")
            if row.get("tissueden") not in (None, "5", "5.0"):
                parse_density(row, "tissueden")
        except DatasetError as exc:
            problems.add(exc)
            continue
        by_exam.setdefault(acc, []).append(row)
    return by_exam


def labels(rows: list[Row], side: str) -> tuple[int | None, int]:
    """(cancer, calcification) of one breast by the module's documented rules."""
    matching = [r for r in rows if (r.get("side") or "B").upper() in (side, "B")]
    severities = [parse_number(r, "path_severity") for r in matching]
    assessments = [(r.get("asses") or "").upper() for r in matching]
    if any(s in (0, 1) for s in severities) or "K" in assessments:
        cancer: int | None = 1
    elif any(a in _PENDING and s is None for a, s in zip(assessments, severities, strict=True)):
        cancer = None
    else:
        cancer = 0
    calc = int(any(r.get("calcfind") or r.get("calcdistri") for r in matching))
    return cancer, calc


def _resolve(row: Row, root: Path, raw: str) -> Path:
    pure = PurePosixPath(raw.replace("\\", "/"))
    candidates = [Path(raw)] if pure.is_absolute() else []
    parts = [p for p in pure.parts if p != "/"]
    candidates += [root.joinpath(*parts[i:]) for i in range(len(parts))]
    for path in candidates:
        for candidate in (path, path.with_suffix(".png")):
            if candidate.is_file():
                return check_image(row, candidate)
    raise row.error(f"image not found: {raw!r} (nor under {root})")


def load(root: Path, *, image_types: Iterable[str] = ("2D",), include_spot_mag: bool = False,
         on_error: str = "raise") -> list[Sample]:
    """Samples of an EMBED-style tree; see the module docstring for paths and label rules."""
    root = Path(root)
    problems = Problems(f"{root / CLINICAL_CSV}, {root / METADATA_CSV}", on_error)
    clinical = _clinical(root / CLINICAL_CSV, problems)
    wanted = {t.strip().lower() for t in image_types}
    unmatched = 0
    samples: list[Sample] = []
    for row in read_csv(root / METADATA_CSV, METADATA_REQUIRED):
        try:
            check_ragged(row)
            image_type = row.get("FinalImageType")
            if image_type is not None and image_type.lower() not in wanted:
                continue
            if not include_spot_mag and row.get("spot_mag") in ("1", "1.0", "True", "true"):
                continue
            acc, patient = row.require("acc_anon"), row.require("empi_anon")
            rows = clinical.get(acc)
            if not rows:
                unmatched += 1
                continue
            side = parse_side(row, "ImageLateralityFinal")
            view = parse_view(row, "ViewPosition")
            if side is None or view is None:
                raise row.error("ImageLateralityFinal and ViewPosition must not be empty")
            image = _resolve(row, root, row.require("anon_dicom_path"))
            age = next((a for a in (parse_age(r, "age_at_study") for r in rows) if a), None)
            density = next((d for r in rows if r.get("tissueden") not in (None, "5", "5.0")
                            for d in [parse_density(r, "tissueden")]), None)
            fields = {"PatientID": patient, "PatientAge": age,
                      "Manufacturer": row.get("Manufacturer"),
                      "ManufacturerModelName": row.get("ManufacturerModelName")}
            header, info = build_header(image, fields, side, view, row)
        except DatasetError as exc:
            problems.add(exc)
            continue
        cancer, calcification = labels(rows, info.laterality or side)
        samples.append(Sample(
            image=image, header=header, view=info, cancer=cancer, calcification=calcification,
            patient_id=patient, exam_id=acc, density=density, groups=groups_for(header),
        ))
    if unmatched:
        log.warning("%s: skipped %d image(s) whose acc_anon has no clinical row",
                    root / METADATA_CSV, unmatched)
    problems.finish()
    return samples
