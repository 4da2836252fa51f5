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

Label rules, per image. A clinical row's ``side`` is the side of its finding and assessment;
its ``path_severity`` belongs to the biopsied side ``bside`` (``side`` when ``bside`` is empty or
absent). A row applies to a breast when that side is the breast's, ``B`` (both) or empty (exam
level):

* cancer: 1 when any pathology of the breast has path_severity 0 (invasive) or 1 (in situ), or
  an assessment is ``K`` (BI-RADS 6, known malignancy). Else, when the breast is pending (an
  assessment ``A``, ``S`` or ``M``: BI-RADS 0 recall, 4, 5) and this exam records no pathology of
  it, the outcome follows the patient's later exams within ``FOLLOW_UP_DAYS`` (by
  ``study_date_anon``): a recall's diagnostic workup and biopsy are recorded there. Malignant
  pathology of that side -> 1 (a screen-detected cancer); benign pathology of it or a final
  assessment ``N``/``B``/``P`` (BI-RADS 1/2/3) -> 0; nothing -> None (outcome unknown). Else 0
  (benign pathology included).
* calcification: 1 when any row of the breast (by ``side``) has a non-empty ``calcfind`` or
  ``calcdistri``, else 0.
* exam type: ``desc`` ("MG Screening Bilateral", "MG Diagnostic Left", ...) -> ``screening`` /
  ``diagnostic`` in ``groups["exam_type"]``; ``exam_types=("screening",)`` keeps screening
  exams only (what the node reads).
* density: ``tissueden`` 1-4 -> A-D (5, male, -> None). Images of an exam with no clinical row are
  skipped and counted in one warning.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, timedelta
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
_RESOLVED = {"N", "B", "P"}
#: How long after a pending assessment a later exam's pathology or assessment settles it.
FOLLOW_UP_DAYS = 180


def _date(row: Row) -> date | None:
    raw = row.get("study_date_anon")
    if raw is None:
        return None
    try:
        return date.fromisoformat(raw[:10])
    except ValueError:
        raise row.error(f"column 'study_date_anon': not a date: {raw!r}") from None


def _clinical(path: Path, problems: Problems) -> dict[str, list[Row]]:
    """Clinical rows by accession, validated once here so labels never meet a bad value."""
    by_exam: dict[str, list[Row]] = {}
    for row in read_csv(path, CLINICAL_REQUIRED):
        try:
            check_ragged(row)
            acc = row.require("acc_anon")
            for column in ("side", "bside"):
                value = row.get(column)
                if value is not None and value.upper() not in ("L", "R", "B"):
                    raise row.error(f"column {column!r}: expected L, R, B or empty, got "
                                    f"{value!r}")
            asses = row.get("asses")
            if asses is not None and asses.upper() not in ASSESSMENTS:
                raise row.error(f"column 'asses': unknown BI-RADS letter {asses!r}")
            severity = parse_number(row, "path_severity")
            if severity is not None and severity not in range(7):
                raise row.error(f"column 'path_severity': expected 0-6, got {severity!r}")
            parse_age(row, "age_at_study")
            _date(row)
            if row.get("tissueden") not in (None, "5", "5.0"):
                parse_density(row, "tissueden")
        except DatasetError as exc:
            problems.add(exc)
            continue
        by_exam.setdefault(acc, []).append(row)
    return by_exam


def _on(row: Row, side: str, column: str) -> bool:
    return (row.get(column) or "B").upper() in (side, "B")


def _pathology(rows: Iterable[Row], side: str) -> list[float]:
    """path_severity values of ``side``, matched on the biopsied side ``bside``."""
    return [sev for r in rows
            if (sev := parse_number(r, "path_severity")) is not None
            and _on(r, side, "bside" if r.get("bside") else "side")]


def _assessments(rows: Iterable[Row], side: str) -> set[str]:
    return {(r.get("asses") or "").upper() for r in rows if _on(r, side, "side")}


def exam_dates(clinical: dict[str, list[Row]]) -> dict[str, list[tuple[date, str]]]:
    """Per patient (``empi_anon``), the (date, accession) of every dated exam."""
    out: dict[str, list[tuple[date, str]]] = {}
    for acc, rows in clinical.items():
        day = next((d for d in map(_date, rows) if d is not None), None)
        patient = next((p for r in rows if (p := r.get("empi_anon"))), None)
        if day is not None and patient is not None:
            out.setdefault(patient, []).append((day, acc))
    return out


def follow_up(clinical: dict[str, list[Row]], dates: dict[str, list[tuple[date, str]]],
              acc: str) -> list[Row]:
    """Clinical rows of the same patient's later exams within ``FOLLOW_UP_DAYS`` of ``acc``."""
    rows = clinical.get(acc, [])
    patient = next((p for r in rows if (p := r.get("empi_anon"))), None)
    start = next((day for day, a in dates.get(patient or "", []) if a == acc), None)
    if start is None or patient is None:
        return []
    end = start + timedelta(days=FOLLOW_UP_DAYS)
    return [r for day, other in dates[patient] if start < day <= end for r in clinical[other]]


def labels(rows: list[Row], side: str, later: Iterable[Row] = ()) -> tuple[int | None, int]:
    """(cancer, calcification) of one breast by the module's documented rules; ``later`` are
    the follow-up rows (:func:`follow_up`) that settle a pending assessment."""
    severities = _pathology(rows, side)
    assessments = _assessments(rows, side)
    cancer: int | None = 0
    if any(s in (0, 1) for s in severities) or "K" in assessments:
        cancer = 1
    elif assessments & _PENDING and not severities:
        later = list(later)
        outcome = _pathology(later, side)
        if any(s in (0, 1) for s in outcome) or "K" in _assessments(later, side):
            cancer = 1
        elif not outcome and not _assessments(later, side) & _RESOLVED:
            cancer = None
    matching = [r for r in rows if _on(r, side, "side")]
    calc = int(any(r.get("calcfind") or r.get("calcdistri") for r in matching))
    return cancer, calc


def exam_type(rows: Iterable[Row]) -> str | None:
    """``screening`` / ``diagnostic`` from the exam's ``desc``; None when it says neither."""
    for r in rows:
        desc = (r.get("desc") or "").lower()
        if "screen" in desc:
            return "screening"
        if "diag" in desc:
            return "diagnostic"
    return None


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
         exam_types: Iterable[str] | None = None, on_error: str = "raise") -> list[Sample]:
    """Samples of an EMBED-style tree; see the module docstring for paths and label rules.
    ``exam_types`` (e.g. ``("screening",)``) keeps only exams whose ``desc`` says so."""
    root = Path(root)
    problems = Problems(f"{root / CLINICAL_CSV}, {root / METADATA_CSV}", on_error)
    clinical = _clinical(root / CLINICAL_CSV, problems)
    wanted = {t.strip().lower() for t in image_types}
    kinds = None if exam_types is None else {t.strip().lower() for t in exam_types}
    dates = exam_dates(clinical)
    later: dict[str, list[Row]] = {}
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
            kind = exam_type(rows)
            if kinds is not None and kind not in kinds:
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
        if acc not in later:
            later[acc] = follow_up(clinical, dates, acc)
        cancer, calcification = labels(rows, info.laterality or side, later[acc])
        samples.append(Sample(
            image=image, header=header, view=info, cancer=cancer, calcification=calcification,
            patient_id=patient, exam_id=acc, density=density,
            groups=groups_for(header, exam_type=kind),
        ))
    if unmatched:
        log.warning("%s: skipped %d image(s) whose acc_anon has no clinical row",
                    root / METADATA_CSV, unmatched)
    problems.finish()
    return samples
