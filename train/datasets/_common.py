"""Shared parsing for the adapters: CSV rows with file/line in every error, headers, images.

Every adapter follows one error policy so users learn it once: a malformed row (bad value, missing
image, unreadable DICOM) raises :class:`DatasetError` naming the file and the CSV line, unless the
adapter is called with ``on_error="skip"``; then such rows are skipped and one warning with the
count and the first problem is logged.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from cadnode.dicom.selection import (
    Candidate,
    ImplantPolicy,
    Rule,
    acquisition_datetime,
    select_views,
)
from cadnode.dicom.views import ViewInfo, detect_view
from cadnode.text.clinical import UNKNOWN, age_band
from train.datasets.base import Sample

log = logging.getLogger("train.datasets")

DICOM_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom")
IMAGE_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom", ".png")
_MISSING = {"", "nan", "none", "null", "na", "n/a"}
ON_ERROR = ("raise", "skip")


class DatasetError(ValueError):
    """A dataset file or one of its rows cannot be used; the message names file and line."""

    def __init__(self, file: Path | str, line: int | None, message: str) -> None:
        self.file, self.line, self.reason = Path(file), line, message
        where = f"{file}, line {line}" if line is not None else str(file)
        super().__init__(f"{where}: {message}")


@dataclass
class Row:
    """One CSV row plus where it came from, so every parse error can say file and line."""

    file: Path
    line: int
    values: dict[str, str]

    def error(self, message: str) -> DatasetError:
        return DatasetError(self.file, self.line, message)

    def get(self, column: str) -> str | None:
        """Stripped value; empty, missing and pandas-style NaN all read as None."""
        raw = self.values.get(column)
        if raw is None:
            return None
        text = raw.strip()
        return None if text.lower() in _MISSING else text

    def first(self, *columns: str) -> str | None:
        """Value of the first of ``columns`` that has one (datasets rename columns)."""
        for column in columns:
            value = self.get(column)
            if value is not None:
                return value
        return None

    def require(self, column: str) -> str:
        value = self.get(column)
        if value is None:
            raise self.error(f"column {column!r} is empty")
        return value


def read_csv(path: Path, required: Iterable[str] = ()) -> Iterator[Row]:
    """Rows of ``path``; a missing file, missing columns or a ragged row raise DatasetError."""
    if not path.is_file():
        raise DatasetError(path, None, "file not found")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise DatasetError(path, None, "empty file (no header row)") from None
        missing = [c for c in required if c not in header]
        if missing:
            raise DatasetError(path, 1, f"missing column(s) {missing}; header has {header}")
        end = reader.line_num
        for fields in reader:
            line, end = end + 1, reader.line_num  # a quoted newline spans lines: report the first
            if not fields or all(not f.strip() for f in fields):
                continue
            row = Row(path, line, dict(zip(header, fields, strict=False)))
            if len(fields) != len(header):
                row.values["__ragged__"] = f"{len(fields)} fields, header has {len(header)}"
            yield row


def csv_columns(path: Path) -> list[str]:
    """The header row of ``path`` (stripped), for layouts whose columns choose a mode."""
    if not path.is_file():
        raise DatasetError(path, None, "file not found")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        return [h.strip() for h in next(csv.reader(fh), [])]


def check_ragged(row: Row) -> None:
    """Raise for a row whose field count differs from the header's (a shifted row)."""
    if "__ragged__" in row.values:
        raise row.error(f"malformed row: {row.values['__ragged__']}")


class Problems:
    """Applies the ``on_error`` policy and counts skipped rows."""

    def __init__(self, source: str, on_error: str = "raise") -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, not {on_error!r}")
        self.source, self.on_error = source, on_error
        self.skipped: list[DatasetError] = []

    def add(self, error: DatasetError) -> None:
        if self.on_error == "raise":
            raise error
        self.skipped.append(error)

    def finish(self) -> None:
        if self.skipped:
            log.warning("%s: skipped %d malformed row(s); first: %s", self.source,
                        len(self.skipped), self.skipped[0])


# --- value parsers -------------------------------------------------------------------------

_TRUE = {"1", "1.0", "true", "yes", "y", "t"}
_FALSE = {"0", "0.0", "false", "no", "n", "f"}


def parse_binary(row: Row, column: str) -> int | None:
    """0/1 (also true/false, yes/no); empty -> None; anything else is a row error."""
    value = row.get(column)
    if value is None:
        return None
    low = value.lower()
    if low in _TRUE:
        return 1
    if low in _FALSE:
        return 0
    raise row.error(f"column {column!r}: expected 0 or 1, got {value!r}")


def parse_number(row: Row, column: str) -> float | None:
    value = row.get(column)
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        raise row.error(f"column {column!r}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise row.error(f"column {column!r}: expected a finite number, got {value!r}")
    return number


def parse_age(row: Row, column: str) -> str | None:
    """Age in years -> DICOM AS (``"061Y"``); implausible ages are row errors."""
    age = parse_number(row, column)
    if age is None:
        return None
    if not 0 <= age < 130:
        raise row.error(f"column {column!r}: implausible age {age!r}")
    return f"{int(age):03d}Y"


def parse_side(row: Row, column: str) -> str | None:
    value = row.get(column)
    if value is None:
        return None
    side = {"L": "L", "LEFT": "L", "R": "R", "RIGHT": "R"}.get(value.upper())
    if side is None:
        raise row.error(f"column {column!r}: expected L or R, got {value!r}")
    return side


def parse_view(row: Row, column: str) -> str | None:
    """A mammography view code (CC, MLO, ML, ...); checked with the node's own view parser."""
    value = row.get(column)
    if value is None:
        return None
    code = value.upper()
    probe = Dataset()
    probe.ViewPosition = code
    if detect_view(probe).view != code:
        raise row.error(f"column {column!r}: unknown view {value!r}")
    return code


def parse_density(row: Row, column: str) -> str | None:
    """BI-RADS density as ``"A"``..``"D"`` from A-D, 1-4 or ``"DENSITY C"``."""
    value = row.get(column)
    if value is None:
        return None
    text = value.upper().replace("DENSITY", "").strip()
    letter = {"1": "A", "2": "B", "3": "C", "4": "D", "1.0": "A", "2.0": "B", "3.0": "C",
              "4.0": "D"}.get(text, text)
    if letter not in ("A", "B", "C", "D"):
        raise row.error(f"column {column!r}: expected density A-D or 1-4, got {value!r}")
    return letter


def parse_birads(row: Row, column: str) -> int | None:
    """BI-RADS category as an int from ``"BI-RADS 4"``, ``"4"``, ``"4a"``; empty -> None."""
    value = row.get(column)
    if value is None:
        return None
    match = re.fullmatch(r"(?:BI-?RADS)?\s*([0-6])(?:\.0)?\s*[ABC]?", value.strip(), re.IGNORECASE)
    if match is None:
        raise row.error(f"column {column!r}: expected a BI-RADS category 0-6, got {value!r}")
    return int(match.group(1))


# --- images and headers --------------------------------------------------------------------


def image_kind(path: Path) -> str:
    """``"dicom"`` or ``"png"`` from the file's magic bytes (suffixes lie), else ``"other"``."""
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return "other"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[128:132] == b"DICM" or path.suffix.lower() in DICOM_SUFFIXES:
        return "dicom"
    return "other"


def find_image(row: Row, stem: Path, suffixes: Iterable[str] = IMAGE_SUFFIXES) -> Path:
    """The first of ``stem`` + each suffix that exists (DICOM before PNG); else a row error."""
    tried = [stem.with_name(stem.name + s) for s in suffixes]
    for path in tried:
        if path.is_file():
            return path
    names = ", ".join(p.name for p in tried)
    raise row.error(f"image not found: {stem.parent}/ has none of {names}")


def read_header(path: Path, row: Row | None = None) -> Dataset:
    """The file's own header without pixels; an unreadable file is a (row) error."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on bad files
        message = f"cannot read DICOM {path}: {exc}"
        raise (row.error(message) if row else DatasetError(path, None, message)) from exc


def _present(ds: Dataset, keyword: str) -> bool:
    try:
        value = getattr(ds, keyword, None)
    except Exception:  # noqa: BLE001 - malformed element counts as absent
        return False
    return value is not None and str(value).strip() != ""


def build_header(image: Path | None, fields: dict[str, Any], side: str | None,
                 view: str | None, row: Row | None = None) -> tuple[Dataset, ViewInfo]:
    """Header the text builder reads, and the view detected on it.

    A DICOM image's own header wins; CSV ``fields`` only fill keywords it lacks, and the CSV's
    side/view are written only when :func:`detect_view` finds none in the file (writing
    ImageLaterality over a file that has only Laterality would change which one decides).
    """
    is_dicom = image is not None and image_kind(image) == "dicom"
    ds = read_header(image, row) if is_dicom and image is not None else Dataset()
    for keyword, value in fields.items():
        if value is not None and not _present(ds, keyword):
            setattr(ds, keyword, value)
    found = detect_view(ds) if is_dicom else ViewInfo(None, None, True, "none")
    if side is not None and found.laterality is None:
        ds.ImageLaterality = side
    if view is not None and found.view is None:
        ds.ViewPosition = view
    return ds, detect_view(ds)


def check_image(row: Row, path: Path) -> Path:
    """``path`` if it exists and is DICOM or PNG; else a row error."""
    if not path.is_file():
        raise row.error(f"image not found: {path}")
    if image_kind(path) == "other":
        raise row.error(f"image is neither DICOM nor PNG: {path}")
    return path


def manufacturer_group(ds: Dataset) -> str:
    """Manufacturer as written in the header (lower case), or ``"unknown"``."""
    try:
        raw = str(getattr(ds, "Manufacturer", "") or "").strip()
    except Exception:  # noqa: BLE001
        raw = ""
    return raw.lower() if raw else UNKNOWN


def groups_for(ds: Dataset, **extra: str | None) -> dict[str, str]:
    """Subgroup keys for evaluation: manufacturer, age_band and any adapter-specific ones."""
    groups = {"manufacturer": manufacturer_group(ds), "age_band": age_band(ds)}
    groups.update({k: v for k, v in extra.items() if v is not None})
    return groups


# --- which images are used -------------------------------------------------------------------


def screening_samples(samples: list[Sample], policy: ImplantPolicy = ImplantPolicy.FALLBACK,
                      include_processing: bool = False, source: str = "") -> list[Sample]:
    """The samples the node would read, per exam: its own view selection
    (:func:`cadnode.dicom.selection.select_views`) over each exam's headers, so that training
    sees the images serving sees. Spot/magnified and other modified views, other projections,
    priors and superseded repeats are dropped, counted by rule in one warning. For Processing
    images are dropped too, unless ``include_processing``: then they are kept by the same rules
    applied among themselves. An exam may keep fewer than four
    views: selection only drops."""
    by_exam: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_exam.setdefault(s.exam_id, []).append(i)
    keep: set[int] = set()
    skipped: Counter[str] = Counter()
    for members in by_exam.values():
        candidates = [Candidate(i, samples[i].view, acquisition_datetime(samples[i].header), n)
                      for n, i in enumerate(members)]
        raw: list[Candidate[int]] = []
        for d in select_views(candidates, policy).decisions:
            if d.analysed:
                keep.add(d.candidate.ref)
            elif include_processing and d.rule is Rule.FOR_PROCESSING:
                raw.append(replace(d.candidate, info=replace(d.candidate.info,
                                                             for_presentation=True)))
            else:
                skipped[d.rule.value] += 1
        # For Processing images, when wanted, by the same rules among themselves
        for d in select_views(raw, policy).decisions:
            if d.analysed:
                keep.add(d.candidate.ref)
            else:
                skipped[f"For Processing {d.rule.value}"] += 1
    if skipped:
        log.warning("%s: %d of %d image(s) not used, as the node would not read them: %s",
                    source or "dataset", sum(skipped.values()), len(samples),
                    ", ".join(f"{n} {why}" for why, n in sorted(skipped.items())))
    return [s for i, s in enumerate(samples) if i in keep]
