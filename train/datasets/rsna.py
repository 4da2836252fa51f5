"""RSNA Screening Mammography Breast Cancer Detection (Kaggle 2022) layout.

``<root>/train.csv`` (site_id, patient_id, image_id, laterality, view, age, cancer, biopsy,
invasive, BIRADS, implant, density, machine_id, difficult_negative_case) and images at
``<root>/train_images/<patient_id>/<image_id>.dcm`` (or ``.png`` after conversion).

Labels: ``cancer`` as given (0/1; None when the column is absent, as in ``test.csv``);
calcification is not annotated in this dataset, so it is always None. The CSV has no study id and
the training set has one screening exam per patient, so ``exam_id`` is the patient id.
"""

from __future__ import annotations

from pathlib import Path

from train.datasets._common import (
    DatasetError,
    Problems,
    build_header,
    check_ragged,
    find_image,
    groups_for,
    parse_age,
    parse_binary,
    parse_density,
    parse_side,
    parse_view,
    read_csv,
)
from train.datasets.base import Sample

REQUIRED = ("patient_id", "image_id", "laterality", "view")


def load(root: Path, *, csv_name: str = "train.csv", images: str = "train_images",
         on_error: str = "raise") -> list[Sample]:
    """Samples of ``<root>/<csv_name>``; see the module docstring for the layout."""
    root = Path(root)
    csv_path = root / csv_name
    problems = Problems(str(csv_path), on_error)
    samples: list[Sample] = []
    for row in read_csv(csv_path, REQUIRED):
        try:
            check_ragged(row)
            patient, image_id = row.require("patient_id"), row.require("image_id")
            side, view = parse_side(row, "laterality"), parse_view(row, "view")
            if side is None or view is None:
                raise row.error("laterality and view must not be empty")
            implant = parse_binary(row, "implant")
            machine = row.get("machine_id")
            fields = {
                "PatientID": patient,
                "PatientAge": parse_age(row, "age"),
                "BreastImplantPresent": None if implant is None else ("YES" if implant else "NO"),
                "ManufacturerModelName": f"machine {machine}" if machine else None,
            }
            density = parse_density(row, "density")
            cancer = parse_binary(row, "cancer")
            image = find_image(row, root / images / patient / image_id)
            header, info = build_header(image, fields, side, view, row)
        except DatasetError as exc:
            problems.add(exc)
            continue
        samples.append(Sample(
            image=image, header=header, view=info, cancer=cancer, calcification=None,
            patient_id=patient, exam_id=patient, density=density,
            groups=groups_for(header, machine=machine, site=row.get("site_id")),
        ))
    problems.finish()
    return samples
