"""VinDr-Mammo layout (PhysioNet release 1.0).

``<root>/breast-level_annotations.csv`` (study_id, series_id, image_id, laterality, view_position,
height, width, breast_birads, breast_density, split), ``<root>/finding_annotations.csv`` (same keys
plus finding_categories such as ``"['Suspicious Calcification', 'Mass']"``, finding_birads, xmin,
ymin, xmax, ymax) and images at ``<root>/images/<study_id>/<image_id>.dicom`` (``.dcm``/``.png``
also accepted).

Label rules (VinDr-Mammo has no pathology, only radiologist BI-RADS):

* cancer: breast-level BI-RADS 4 or 5 (or 6) -> 1; BI-RADS 1, 2 or 3 -> 0; BI-RADS 0 or empty ->
  None (incomplete assessment).
* calcification: 1 when any finding row of that image lists "Suspicious Calcification", else 0;
  None when ``finding_annotations.csv`` is absent.
* lesions: each finding row with a box becomes ``Sample.lesions`` (kind from its categories,
  malignant when its finding BI-RADS is 4-6), which trains and scores the heatmap.
* ``split`` ("training"/"test") is the official split: ``Sample.official_split`` ("train"/"test",
  which :func:`train.data.patient_split` follows) and ``groups["split"]``; ``split=`` filters on it.
* boxes are clipped to the image (``width``/``height`` columns): some released boxes have
  negative coordinates.
* The public release has no patient ids, so ``patient_id`` is the study id.
"""

from __future__ import annotations

import ast
from pathlib import Path

from train.datasets._common import (
    DatasetError,
    Problems,
    Row,
    build_header,
    check_ragged,
    find_image,
    groups_for,
    log,
    parse_birads,
    parse_density,
    parse_number,
    parse_side,
    parse_view,
    read_csv,
)
from train.datasets.base import Lesion, Sample

BREAST_CSV = "breast-level_annotations.csv"
FINDING_CSV = "finding_annotations.csv"
REQUIRED = ("study_id", "image_id", "laterality", "view_position", "breast_birads")
CALCIFICATION = "suspicious calcification"
OFFICIAL_SPLITS = {"training": "train", "train": "train", "test": "test"}


def finding_categories(row: Row) -> list[str]:
    """The list literal in ``finding_categories`` (a plain string is one category)."""
    raw = row.get("finding_categories")
    if raw is None:
        return []
    if not raw.startswith("["):
        return [raw]
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        raise row.error(f"column 'finding_categories': not a list: {raw!r}") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise row.error(f"column 'finding_categories': not a list of names: {raw!r}")
    return value


def _lesion(row: Row) -> Lesion | None:
    """The finding's box (``xmin``..``ymax``, stored-image pixels); None for "No Finding" rows.

    Malignant (the cause of a positive cancer label) when its own BI-RADS is 4-6, the rule the
    breast-level label follows.
    """
    coords = [parse_number(row, c) for c in ("xmin", "ymin", "xmax", "ymax")]
    if all(c is None for c in coords):
        return None
    if any(c is None for c in coords):
        raise row.error("xmin, ymin, xmax and ymax must all be given or all be empty")
    x0, y0, x1, y1 = (float(c) for c in coords if c is not None)
    if x1 < x0 or y1 < y0:
        raise row.error(f"box ({x0}, {y0}, {x1}, {y1}) has xmax < xmin or ymax < ymin")
    # Some released boxes reach past the image (negative coordinates): clip to its pixels.
    height, width = parse_number(row, "height"), parse_number(row, "width")
    x0, y0 = max(x0, 0.0), max(y0, 0.0)
    if width is not None:
        x1 = min(x1, width - 1)
    if height is not None:
        y1 = min(y1, height - 1)
    x1, y1 = max(x1, x0), max(y1, y0)
    names = [c.strip().lower() for c in finding_categories(row)]
    kind = "calcification" if CALCIFICATION in names else (names[0] if names else "finding")
    return Lesion(kind, (x0, y0, x1, y1), cancer_from_birads(parse_birads(row, "finding_birads"))
                  == 1)


def _read_findings(path: Path, problems: Problems) -> tuple[set[str], dict[str, list[Lesion]]]:
    """Images with a suspicious calcification, and every image's finding boxes."""
    calcified: set[str] = set()
    lesions: dict[str, list[Lesion]] = {}
    for row in read_csv(path, ("image_id", "finding_categories")):
        try:
            check_ragged(row)
            image_id = row.require("image_id")
            if any(c.strip().lower() == CALCIFICATION for c in finding_categories(row)):
                calcified.add(image_id)
            lesion = _lesion(row)
            if lesion is not None:
                lesions.setdefault(image_id, []).append(lesion)
        except DatasetError as exc:
            problems.add(exc)
    return calcified, lesions


def cancer_from_birads(birads: int | None) -> int | None:
    """BI-RADS 4-6 -> 1, 1-3 -> 0, 0/unknown -> None (the module's documented rule)."""
    if birads is None or birads == 0:
        return None
    return 1 if birads >= 4 else 0


def load(root: Path, *, split: str | None = None, on_error: str = "raise") -> list[Sample]:
    """Samples of a VinDr-Mammo tree; ``split`` keeps only rows of that split."""
    root = Path(root)
    problems = Problems(str(root / BREAST_CSV), on_error)
    finding_path = root / FINDING_CSV
    calcified: set[str] | None = None
    lesions: dict[str, list[Lesion]] = {}
    if finding_path.is_file():
        calcified, lesions = _read_findings(finding_path, problems)
    else:
        log.warning("%s absent: calcification labels are unknown (None)", finding_path)
    samples: list[Sample] = []
    for row in read_csv(root / BREAST_CSV, REQUIRED):
        try:
            check_ragged(row)
            row_split = row.get("split")
            if split is not None and row_split != split:
                continue
            study, image_id = row.require("study_id"), row.require("image_id")
            side, view = parse_side(row, "laterality"), parse_view(row, "view_position")
            if side is None or view is None:
                raise row.error("laterality and view_position must not be empty")
            cancer = cancer_from_birads(parse_birads(row, "breast_birads"))
            density = parse_density(row, "breast_density")
            image = find_image(row, root / "images" / study / image_id,
                               (".dicom", ".dcm", ".png"))
            header, info = build_header(image, {"PatientID": study}, side, view, row)
        except DatasetError as exc:
            problems.add(exc)
            continue
        samples.append(Sample(
            image=image, header=header, view=info, cancer=cancer,
            calcification=None if calcified is None else int(image_id in calcified),
            patient_id=study, exam_id=study, density=density,
            groups=groups_for(header, split=row_split), lesions=lesions.get(image_id, []),
            official_split=OFFICIAL_SPLITS.get((row_split or "").lower()),
        ))
    problems.finish()
    return samples
