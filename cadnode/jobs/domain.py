"""Is a view like the images the model was trained on? The one definition of a training domain.

A score on an image unlike every training image means nothing, however confident it looks, so
the worker checks each analysed view against the package's :class:`TrainingDomain` and the
result objects say "outside the model's validated domain" next to its score, with the reasons.

Training and the check share this module: :func:`domain_from_views` summarises training views
(their headers and the :class:`PreparedImage` the node's own pixel pipeline makes of them) into
the manifest's ``domain``; :func:`outside_domain` compares one view with it, reading the same
header attributes and the same statistics of the prepared input. Rules:

- vendors match case-insensitively on their first word ("HOLOGIC, Inc." = "HOLOGIC"); model
  names when one's words begin the other's ("Selenia Dimensions" = "SELENIA DIMENSIONS 3D");
- a header attribute that training never lacked must be present; "" in a value list means
  training views lacked it (so ``conversion_types: [""]`` says no training image was converted
  or digitised, and a scanned film's ConversionType is outside);
- numeric facts (decoded size, pixel spacing, bits stored) must lie in the training range;
- statistics of the prepared input must lie in the recorded range, which is the training range
  widened by ``STATISTICS_MARGIN`` of its width on each side (a few hundred views do not reach
  the tails).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset

from cadnode.dicom.pixels import PreparedImage
from cadnode.dicom.views import MALFORMED_VALUE, header_value, presentation_intent
from cadnode.runtime.manifest import IMAGE_STATISTICS, Range, TrainingDomain

NO_DOMAIN = "the model package records no training domain"
STATISTICS_MARGIN = 0.1
#: A prepared-input value below this is background (air, or the padding around the crop).
DARK_LEVEL = 0.02
_LABELS = {
    "manufacturers": "manufacturer",
    "models": "model name",
    "conversion_types": "conversion type",
    "presentation_intents": "presentation intent",
}


def _text(ds: Dataset, keyword: str) -> str:
    """A header attribute as one stripped string ("" when absent or malformed)."""
    value = header_value(ds, keyword)
    if value is None:
        return ""
    try:
        if isinstance(value, bytes):
            return value.decode("ascii", "replace").strip()
        if isinstance(value, str | int | float):
            return str(value).strip()
        return "\\".join(str(v).strip() for v in value)
    except MALFORMED_VALUE:
        return ""


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = header_value(ds, keyword)
        return None if value is None else int(value)
    except MALFORMED_VALUE:
        return None


def _spacing(ds: Dataset) -> tuple[float, float] | None:
    """Detector pixel spacing (ImagerPixelSpacing, else PixelSpacing), in mm, or None."""
    for keyword in ("ImagerPixelSpacing", "PixelSpacing"):
        try:
            value = header_value(ds, keyword)
            pair = (float(value[0]), float(value[1])) if value is not None else None
        except MALFORMED_VALUE:
            pair = None
        if pair is not None and all(math.isfinite(v) and v > 0 for v in pair):
            return pair
    return None


def header_values(ds: Dataset) -> dict[str, str]:
    """The header facts a domain lists, keyed as in the manifest ("" when absent)."""
    intent = presentation_intent(ds)
    return {
        "manufacturers": _text(ds, "Manufacturer"),
        "models": _text(ds, "ManufacturerModelName"),
        "conversion_types": _text(ds, "ConversionType"),
        "presentation_intents": "" if intent is None else intent.value,
    }


def image_statistics(prepared: PreparedImage) -> dict[str, float]:
    """Statistics of the model input, named as in ``IMAGE_STATISTICS``."""
    a = np.asarray(prepared.array, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std()), "median": float(np.median(a)),
            "dark_fraction": float((a < DARK_LEVEL).mean())}


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Z0-9]+", text.upper())


def _same(key: str, value: str, allowed: str) -> bool:
    if not value or not allowed:
        return value == allowed
    a, b = _words(value), _words(allowed)
    if key == "manufacturers":
        return a[:1] == b[:1]
    if key == "models":
        n = min(len(a), len(b))
        return n > 0 and a[:n] == b[:n]
    return value.strip().upper() == allowed.strip().upper()


def _shown(value: str) -> str:
    return value or "not recorded"


def _span(r: Range, digits: int = 0) -> str:
    lo, hi = (f"{v:.{digits}f}" for v in r)
    return lo if lo == hi else f"{lo}-{hi}"


def _inside(value: float, r: Range) -> bool:
    return r[0] <= value <= r[1]


def outside_domain(domain: TrainingDomain | None, header: Dataset,
                   prepared: PreparedImage) -> list[str]:
    """Why this view is unlike the training images, one reader-facing phrase each; empty when
    it is inside. A package without a domain flags every view (nobody can say it is inside)."""
    if domain is None:
        return [NO_DOMAIN]
    reasons = []
    for key, value in header_values(header).items():
        allowed = getattr(domain, key)
        if allowed is None or any(_same(key, value, a) for a in allowed):
            continue
        if key == "conversion_types" and tuple(allowed) == ("",):
            reasons.append(f"a converted or digitised image (conversion type {value}; no "
                           "training image was)")
            continue
        listed = " / ".join(_shown(a) for a in sorted(allowed)) or "none"
        reasons.append(f"{_LABELS[key]} {_shown(value)} (training: {listed})")
    bits = _int(header, "BitsStored")
    if domain.bits_stored is not None and bits not in domain.bits_stored:
        listed = " / ".join(str(b) for b in sorted(domain.bits_stored))
        reasons.append(f"bits stored {bits if bits is not None else 'not recorded'} "
                       f"(training: {listed})")
    rows, columns = prepared.original_shape
    if ((domain.rows is not None and not _inside(rows, domain.rows))
            or (domain.columns is not None and not _inside(columns, domain.columns))):
        train = " x ".join(_span(r) if r is not None else "any"
                           for r in (domain.rows, domain.columns))
        reasons.append(f"image size {rows} x {columns} px (training: {train} px)")
    if domain.pixel_spacing_mm is not None:
        spacing = _spacing(header)
        train = f"{_span(domain.pixel_spacing_mm, 3)} mm"
        if spacing is None:
            reasons.append(f"pixel spacing not recorded (training: {train})")
        elif not all(_inside(s, domain.pixel_spacing_mm) for s in spacing):
            reasons.append(f"pixel spacing {spacing[0]:.3f} x {spacing[1]:.3f} mm "
                           f"(training: {train})")
    stats = image_statistics(prepared)
    for name, r in domain.image_statistics.items():
        if not _inside(stats[name], r):
            reasons.append(f"prepared image {name.replace('_', ' ')} {stats[name]:.3f} "
                           f"(training: {_span(r, 3)})")
    return reasons


def _value_range(values: Sequence[float]) -> Range | None:
    return (float(min(values)), float(max(values))) if values else None


def domain_from_views(headers: Sequence[Dataset], prepared: Sequence[PreparedImage],
                      source: str) -> TrainingDomain:
    """The training domain of these views (header i with prepared image i), for the manifest:
    ``export_package(..., domain=domain_from_views(...).as_json())``. Training should pass the
    views it trained on, prepared by :func:`cadnode.dicom.pixels.prepare_image` at the package's
    input size, so that the statistics are those of what the model saw."""
    if len(headers) != len(prepared) or not headers:
        raise ValueError("domain_from_views needs one prepared image per header, and some")
    values: dict[str, set[str]] = {key: set() for key in _LABELS}
    for ds in headers:
        for key, value in header_values(ds).items():
            values[key].add(value)
    bits = sorted({b for b in (_int(ds, "BitsStored") for ds in headers) if b is not None})
    spacings = [s for s in (_spacing(ds) for ds in headers) if s is not None]
    stats = [image_statistics(p) for p in prepared]
    widened: dict[str, Range] = {}
    for name in IMAGE_STATISTICS:
        lo, hi = min(s[name] for s in stats), max(s[name] for s in stats)
        pad = STATISTICS_MARGIN * (hi - lo)
        widened[name] = (round(max(0.0, lo - pad), 4), round(min(1.0, hi + pad), 4))
    return TrainingDomain(
        source=source,
        views=len(headers),
        manufacturers=tuple(sorted(values["manufacturers"])),
        models=tuple(sorted(values["models"])),
        conversion_types=tuple(sorted(values["conversion_types"])),
        presentation_intents=tuple(sorted(values["presentation_intents"])),
        bits_stored=tuple(bits) or None,
        rows=_value_range([p.original_shape[0] for p in prepared]),
        columns=_value_range([p.original_shape[1] for p in prepared]),
        pixel_spacing_mm=_value_range([v for s in spacings for v in s]),
        image_statistics=widened,
    )
