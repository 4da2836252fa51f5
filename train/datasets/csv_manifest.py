"""The generic CSV manifest: the documented format for users' own data.

``root`` is the CSV file, or a folder holding ``manifest.csv``. Required columns: path, patient_id,
exam_id, laterality (L/R), view (CC, MLO, ...), cancer (0/1), calcification (0/1). Optional: age
(years), density (A-D or 1-4), manufacturer, implant (0/1 or yes/no). ``path`` is relative to the
CSV's folder (or absolute) and names a DICOM or PNG file. An empty cancer/calcification is None
(unknown). laterality/view may be empty for a DICOM whose header has them; the file's own header
wins over every CSV column, which only fills what the header lacks.
"""

from __future__ import annotations

from pathlib import Path

from train.datasets._common import (
    DatasetError,
    Problems,
    build_header,
    check_image,
    check_ragged,
    groups_for,
    parse_age,
    parse_binary,
    parse_density,
    parse_side,
    parse_view,
    read_csv,
)
from train.datasets.base import Sample

REQUIRED = ("path", "patient_id", "exam_id", "laterality", "view", "cancer", "calcification")


def load(root: Path, *, manifest: str = "manifest.csv", on_error: str = "raise") -> list[Sample]:
    """Samples of the manifest at ``root`` (a CSV file, or a folder holding ``manifest``)."""
    root = Path(root)
    csv_path = root if root.is_file() else root / manifest
    base = csv_path.parent
    problems = Problems(str(csv_path), on_error)
    samples: list[Sample] = []
    for row in read_csv(csv_path, REQUIRED):
        try:
            check_ragged(row)
            patient, exam = row.require("patient_id"), row.require("exam_id")
            side, view = parse_side(row, "laterality"), parse_view(row, "view")
            image = check_image(row, base / row.require("path"))
            implant = parse_binary(row, "implant")
            fields = {
                "PatientID": patient,
                "PatientAge": parse_age(row, "age"),
                "Manufacturer": row.get("manufacturer"),
                "BreastImplantPresent": None if implant is None else ("YES" if implant else "NO"),
            }
            cancer, calc = parse_binary(row, "cancer"), parse_binary(row, "calcification")
            density = parse_density(row, "density")
            header, info = build_header(image, fields, side, view, row)
            if info.laterality is None or info.view is None:
                raise row.error("laterality/view are empty and the image header has none")
        except DatasetError as exc:
            problems.add(exc)
            continue
        samples.append(Sample(
            image=image, header=header, view=info, cancer=cancer, calcification=calc,
            patient_id=patient, exam_id=exam, density=density, groups=groups_for(header),
        ))
    problems.finish()
    return samples
