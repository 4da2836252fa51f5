"""The Grayscale Softcopy Presentation State IOD (highdicom) over all analysed views."""

from __future__ import annotations

from collections.abc import Sequence
from copy import deepcopy

import highdicom as hd
from pydicom import Dataset

from cadnode import __version__
from cadnode.results.common import (
    MANUFACTURER,
    NotApplicable,
    contributing_equipment,
    copy_patient_study,
    file_meta,
    reference_stub,
)
from cadnode.results.enum import ResultKind
from cadnode.results.findings import StudyFindings
from cadnode.results.gsps.content import (
    LAYERS,
    displayed_area,
    view_annotations,
    voi_transformation,
)
from cadnode.results.uids import DEFAULT_UID_ROOT, result_identity

KIND = ResultKind.GSPS
SERIES_NUMBER = 9004
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"
CONTENT_LABEL = "CADNODE"


def build_gsps(
    findings: StudyFindings, sources: Sequence[Dataset], uid_root: str = DEFAULT_UID_ROOT
) -> Dataset:
    """Build one GSPS referencing every view of the study, in a new series.

    highdicom 0.28 assumes that all images of a presentation state share one size (one
    Displayed Area item); the four views of a mammogram rarely do. The object is therefore
    built with same-size copies of the image headers (the sizes are used only for that check
    and that item), then given one Displayed Area Selection item and one VOI LUT item per image,
    each with its Referenced Image Sequence, as PS3.3 C.10.4 and C.11.8 allow. Annotations are
    built and checked against the real sizes.
    """
    if not sources:
        raise ValueError("build_gsps needs at least one source header (patient/study)")
    first = sources[0]
    by_uid = {str(s.SOPInstanceUID): s for s in sources}
    images: list[Dataset] = []
    annotations: list[hd.pr.GraphicAnnotation] = []
    for v in findings.views:
        src = by_uid.get(v.sop_instance_uid)
        if v.rows <= 0 or v.columns <= 0 or int((src or Dataset()).get("SamplesPerPixel", 1)) != 1:
            continue  # no pixel grid to draw on, or not a grayscale image: nothing to present
        image = reference_stub(src, v, findings.study_uid, first)
        images.append(image)
        annotations.extend(view_annotations(v, image, findings, uid_root))
    if not images:
        raise NotApplicable("no grayscale view with a pixel grid to annotate")
    rows, columns = images[0].Rows, images[0].Columns
    same_size = []
    for image in images:
        copy = deepcopy(image)
        copy.Rows, copy.Columns = rows, columns
        same_size.append(copy)
    vois = [t for t in (voi_transformation(im) for im in images) if t is not None]
    monochrome1 = all(str(im.PhotometricInterpretation) == "MONOCHROME1" for im in images)
    identity = result_identity(uid_root, findings, KIND)
    series_uid, sop_uid = identity.series_uid, identity.sop_instance_uid
    description = f"CAD marks {findings.model_name} {findings.model_version}"
    if findings.demo_model:
        description = "NOT FOR CLINICAL USE (demo model) - " + description
    pr = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=same_size,
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=identity.instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MANUFACTURER,
        software_versions=__version__,
        device_serial_number=None,  # type: ignore[arg-type]
        content_label=CONTENT_LABEL,
        content_description=description[:64],
        graphic_annotations=annotations,
        graphic_layers=LAYERS,
        voi_lut_transformations=vois or None,
        presentation_lut_transformation=hd.PresentationLUTTransformation(
            presentation_lut_shape=(
                hd.PresentationLUTShapeValues.INVERSE if monochrome1
                else hd.PresentationLUTShapeValues.IDENTITY
            )
        ),
        series_description=(
            "CAD marks GSPS " + ("(DEMO MODEL)" if findings.demo_model else "cadnode")
        ),
    )
    pr.DisplayedAreaSelectionSequence = [displayed_area(im) for im in images]
    copy_patient_study(pr, first, findings.study_uid)
    sides = {v.laterality for v in findings.views}
    # General Series Laterality is Type 2C for a paired organ and has no value for "both":
    # one side when all views share it, else present and empty (docs/results.md, warnings).
    pr.Laterality = sides.pop() if len(sides) == 1 and sides <= {"R", "L"} else None
    pr.ContributingEquipmentSequence = [
        contributing_equipment(findings)  # type: ignore[list-item]
    ]
    pr.file_meta = file_meta(GSPS, sop_uid)
    return pr
