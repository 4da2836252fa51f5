"""What the GSPS draws and how it windows: graphic annotations and the Softcopy VOI LUT.

Per analysed view, on its own source image (PIXEL units, the image's pixel grid, 0..Columns /
0..Rows, the same coordinates as the SRs):

- layer ``CAD_FINDINGS``: the finding outline (closed POLYLINE) and its centre (POINT), only
  where the cancer score reaches its operating threshold;
- layer ``CAD_TEXT``: the scores with their thresholds as text, anchored at the centre when a
  region is drawn ("R-CC cancer 55.0 % (threshold 50 %) !"; below it, "no region marked";
  for an image unlike the training images, "OUTSIDE THE MODEL'S VALIDATED DOMAIN: <reasons>"),
  for demonstration models, "DEMONSTRATION MODEL - NOT FOR CLINICAL USE" near the bottom of
  the displayed area (DISPLAY units), and for an incomplete exam its INCOMPLETE EXAM
  statement above that.

A failed view gets only a text annotation saying why it was not analysed.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.multival import MultiValue

from cadnode.results.common import NO_REGION, cancer_label, completeness_lines, domain_text
from cadnode.results.findings import StudyFindings, ViewFinding
from cadnode.results.uids import tracking_uid

FINDINGS_LAYER = hd.pr.GraphicLayer(
    "CAD_FINDINGS", order=1, description="CAD finding outline and centre",
    display_color=hd.color.CIELabColor.from_rgb(255, 255, 0),
)
TEXT_LAYER = hd.pr.GraphicLayer(
    "CAD_TEXT", order=2, description="CAD scores and notices",
    display_color=hd.color.CIELabColor.from_rgb(255, 255, 255),
)
LAYERS = [FINDINGS_LAYER, TEXT_LAYER]
DEMO_BANNER = "DEMONSTRATION MODEL - NOT FOR CLINICAL USE"
_PIXEL = hd.pr.AnnotationUnitsValues.PIXEL
_DISPLAY = hd.pr.AnnotationUnitsValues.DISPLAY


def _clip(points: Sequence[tuple[float, float]], v: ViewFinding) -> np.ndarray:
    arr = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    arr[:, 0] = np.clip(arr[:, 0], 0.0, float(v.columns))
    arr[:, 1] = np.clip(arr[:, 1], 0.0, float(v.rows))
    return arr.astype(np.float32)


def score_text(v: ViewFinding, thresholds: dict[str, float]) -> str:
    """One line per view, each score with its operating threshold; "!" marks a score at or
    above it. Below the cancer threshold no region is drawn, and the text says so."""
    if v.failed:
        return f"{v.view_key} not analysed: {v.error or 'no score'}"
    cancer = float(v.cancer or 0.0)
    t_cancer = thresholds.get("cancer", 0.5)
    text = f"{v.view_key} cancer {cancer * 100:.1f} % (threshold {t_cancer * 100:.0f} %)"
    text += " !" if cancer >= t_cancer else ""
    if v.calcification is not None:
        calc = float(v.calcification)
        t_calc = thresholds.get("calcification", 0.5)
        text += (f", calcification {calc * 100:.1f} % (threshold {t_calc * 100:.0f} %, "
                 "no location)")
        text += " !" if calc >= t_calc else ""
    if not v.marked(thresholds):
        text += f"; {NO_REGION}"
    if v.outside_domain:
        text += f"; {domain_text(v).upper()}"
    return text


def incomplete_text(findings: StudyFindings) -> str:
    """The INCOMPLETE EXAM statements, shown on every image ("" for a complete exam); the
    per-image reasons for what was not analysed are in the SRs and the SC."""
    return "; ".join(line for line in completeness_lines(findings)
                     if line.startswith("INCOMPLETE EXAM"))


def _text_box(v: ViewFinding) -> tuple[float, float, float, float]:
    """A box in the upper part of the image, away from the borders (PIXEL units)."""
    return (0.05 * v.columns, 0.02 * v.rows, 0.95 * v.columns, 0.06 * v.rows)


def view_annotations(
    v: ViewFinding, image: Dataset, findings: StudyFindings, uid_root: str
) -> list[hd.pr.GraphicAnnotation]:
    """The annotations drawn on one source image; the outline and centre carry the tracking
    identifier of the same finding in the TID 1500 SR."""
    label = cancer_label(v)
    uid = tracking_uid(uid_root, findings.study_uid, findings.model_version, label)
    graphics: list[hd.pr.GraphicObject] = []
    marked = v.marked(findings.thresholds)
    if marked and len(v.outline) >= 3:
        pts = list(v.outline)
        if tuple(pts[0]) != tuple(pts[-1]):
            pts.append(pts[0])
        graphics.append(hd.pr.GraphicObject(
            graphic_type=hd.pr.GraphicTypeValues.POLYLINE, graphic_data=_clip(pts, v),
            units=_PIXEL, tracking_id=label, tracking_uid=uid,
        ))
    if marked and v.center is not None:
        graphics.append(hd.pr.GraphicObject(
            graphic_type=hd.pr.GraphicTypeValues.POINT, graphic_data=_clip([v.center], v),
            units=_PIXEL, tracking_id=label, tracking_uid=uid,
        ))
    texts = [hd.pr.TextObject(
        text_value=score_text(v, findings.thresholds)[:1024], units=_PIXEL,
        bounding_box=_text_box(v),
        anchor_point=(
            tuple(float(x) for x in _clip([v.center], v)[0])  # type: ignore[arg-type]
            if marked and v.center is not None else None
        ),
        text_justification=hd.pr.TextJustificationValues.LEFT,
    )]
    if findings.demo_model:
        texts.append(hd.pr.TextObject(
            text_value=DEMO_BANNER, units=_DISPLAY, bounding_box=(0.02, 0.92, 0.98, 0.98),
            text_justification=hd.pr.TextJustificationValues.CENTER,
        ))
    incomplete = incomplete_text(findings)
    if incomplete:
        texts.append(hd.pr.TextObject(
            text_value=incomplete[:1024], units=_DISPLAY, bounding_box=(0.02, 0.84, 0.98, 0.90),
            text_justification=hd.pr.TextJustificationValues.CENTER,
        ))
    out = [hd.pr.GraphicAnnotation([image], TEXT_LAYER, text_objects=texts)]
    if graphics:
        out.insert(0, hd.pr.GraphicAnnotation([image], FINDINGS_LAYER, graphic_objects=graphics))
    return out


def _first(value: object) -> float:
    """First value of a possibly multi-valued DS (several windows: the first is the default)."""
    if isinstance(value, MultiValue | list | tuple):
        value = value[0]
    result = float(value)  # type: ignore[arg-type]
    if result != result or result in (float("inf"), float("-inf")):
        raise ValueError(f"not a finite number: {value!r}")
    return result


def voi_transformation(image: Dataset) -> hd.pr.SoftcopyVOILUTTransformation | None:
    """The window for one image: the source's own first window or VOI LUT when it has one
    (the modality chose it for display), else its smallest..largest pixel value, else the
    full range of Bits Stored. None when nothing is known."""
    refs = hd.ReferencedImageSequence([image])
    window: tuple[float, float] | None
    try:
        window = _first(image.get("WindowCenter")), _first(image.get("WindowWidth"))
    except (TypeError, ValueError):  # absent, or not a number (`abc`): use what else is known
        window = None
    if window is not None:
        center, width = window
        explanation = image.get("WindowCenterWidthExplanation")
        return hd.pr.SoftcopyVOILUTTransformation(
            window_center=center,
            window_width=max(1.0, width),
            window_explanation=(_first_text(explanation) if explanation else None),
            voi_lut_function=image.get("VOILUTFunction") or None,
            referenced_images=refs,
        )
    if image.get("VOILUTSequence"):
        item = image.VOILUTSequence[0]
        bits = int(item.LUTDescriptor[2])
        data = np.frombuffer(item.LUTData if isinstance(item.LUTData, bytes)
                             else np.asarray(item.LUTData, np.uint16).tobytes(),
                             np.uint8 if bits == 8 else np.uint16)
        return hd.pr.SoftcopyVOILUTTransformation(
            voi_luts=[hd.VOILUT(int(item.LUTDescriptor[1]), data,
                                item.get("LUTExplanation") or None)],
            referenced_images=refs,
        )
    slope = float(image.get("RescaleSlope", 1) or 1)
    intercept = float(image.get("RescaleIntercept", 0) or 0)
    lo = image.get("SmallestImagePixelValue")
    hi = image.get("LargestImagePixelValue")
    if isinstance(lo, int) and isinstance(hi, int) and hi > lo:
        lo_m, hi_m = sorted((lo * slope + intercept, hi * slope + intercept))
        explanation = "smallest to largest pixel value"
    elif image.get("BitsStored"):
        lo_m, hi_m = intercept, (2 ** int(image.BitsStored) - 1) * slope + intercept
        explanation = "full range of stored values"
    else:
        return None
    return hd.pr.SoftcopyVOILUTTransformation(
        window_center=(lo_m + hi_m + 1) / 2.0,
        window_width=max(1.0, hi_m - lo_m + 1),
        window_explanation=explanation,
        referenced_images=refs,
    )


def _first_text(value: object) -> str:
    if isinstance(value, MultiValue | list | tuple):
        return str(value[0])
    return str(value)


def displayed_area(image: Dataset) -> Dataset:
    """Displayed Area Selection item for one image: the whole image, scaled to fit."""
    item = Dataset()
    item.ReferencedImageSequence = hd.ReferencedImageSequence([image])
    item.DisplayedAreaTopLeftHandCorner = [1, 1]
    item.DisplayedAreaBottomRightHandCorner = [int(image.Columns), int(image.Rows)]
    item.PresentationSizeMode = "SCALE TO FIT"
    item.PresentationPixelAspectRatio = [1, 1]
    return item
