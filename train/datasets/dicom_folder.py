"""A folder of DICOM files plus a label CSV: what a site exports from its own PACS.

Every DICOM file under ``root`` (any depth, found by its ``DICM`` preamble or a .dcm/.dicom
suffix) is read without pixels; side and view come from :func:`detect_view` on its real header,
patient from PatientID and exam from StudyInstanceUID.

The label CSV (``root/labels.csv`` unless ``labels=`` names another) has ``cancer`` and
``calcification`` columns (0/1; empty = None; calcification may be absent) and is keyed either by
``SOPInstanceUID`` (one row per image) or by ``StudyInstanceUID`` + ``laterality`` (one row per
breast). When both key styles are present a row's SOPInstanceUID wins over its breast row. An
optional ``density`` column (A-D or 1-4) is kept.

Skipped and counted in one warning, not errors: files that are not images (no Rows, e.g. SR) and
images without a label row. Which images of a study are used (For Processing, spot views,
priors...) is decided by the node's view selection in ``train.datasets.load_dataset``.
Malformed label rows and unreadable DICOM files follow the usual ``on_error`` policy.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from cadnode.dicom.views import detect_view
from train.datasets._common import (
    DatasetError,
    Problems,
    check_ragged,
    csv_columns,
    groups_for,
    image_kind,
    log,
    parse_binary,
    parse_density,
    parse_side,
    read_csv,
    read_header,
)
from train.datasets.base import Sample

Labels = tuple[int | None, int | None, str | None]


def _labels(path: Path, problems: Problems) -> tuple[dict[str, Labels], dict[tuple[str, str],
                                                                               Labels]]:
    by_sop: dict[str, Labels] = {}
    by_breast: dict[tuple[str, str], Labels] = {}
    cols = set(csv_columns(path))
    if "SOPInstanceUID" not in cols and not {"StudyInstanceUID", "laterality"} <= cols:
        raise DatasetError(path, 1, "needs a SOPInstanceUID column, or StudyInstanceUID and "
                                    f"laterality columns; header has {sorted(cols)}")
    for row in read_csv(path, ("cancer",)):
        try:
            check_ragged(row)
            value = (parse_binary(row, "cancer"), parse_binary(row, "calcification"),
                     parse_density(row, "density"))
            sop = row.get("SOPInstanceUID")
            if sop is not None:
                if sop in by_sop:
                    raise row.error(f"duplicate SOPInstanceUID {sop}")
                by_sop[sop] = value
                continue
            study, side = row.get("StudyInstanceUID"), parse_side(row, "laterality")
            if study is None or side is None:
                raise row.error("needs SOPInstanceUID, or StudyInstanceUID and laterality")
            if (study, side) in by_breast:
                raise row.error(f"duplicate breast {study} {side}")
            by_breast[(study, side)] = value
        except DatasetError as exc:
            problems.add(exc)
    return by_sop, by_breast


def load(root: Path, *, labels: Path | str = "labels.csv",
         on_error: str = "raise") -> list[Sample]:
    """Samples of the DICOM files under ``root`` that the label CSV labels (every image;
    ``train.datasets.load_dataset`` then keeps the ones the node's view selection reads)."""
    root = Path(root)
    label_path = Path(labels) if Path(labels).is_absolute() else root / labels
    problems = Problems(str(label_path), on_error)
    by_sop, by_breast = _labels(label_path, problems)
    skipped: Counter[str] = Counter()
    samples: list[Sample] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path == label_path or image_kind(path) != "dicom":
            continue
        try:
            header = read_header(path)
        except DatasetError as exc:
            problems.add(exc)
            continue
        if "Rows" not in header:
            skipped["not an image"] += 1
            continue
        info = detect_view(header)
        study = str(header.get("StudyInstanceUID", "") or "")
        sop = str(header.get("SOPInstanceUID", "") or "")
        value = by_sop.get(sop)
        if value is None and info.laterality is not None:
            value = by_breast.get((study, info.laterality))
        if value is None:
            skipped["no label row"] += 1
            continue
        cancer, calcification, density = value
        samples.append(Sample(
            image=path, header=header, view=info, cancer=cancer, calcification=calcification,
            patient_id=str(header.get("PatientID", "") or "unknown"), exam_id=study or sop,
            density=density, groups=groups_for(header),
        ))
    if skipped:
        log.warning("%s: skipped %s", root, ", ".join(f"{n} {why}" for why, n in skipped.items()))
    problems.finish()
    return samples
