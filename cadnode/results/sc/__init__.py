"""Secondary Capture montage of the CAD result: the one result object every PACS can show.

Choice: ONE montage per study, not one SC per view. A single RGB image with the four views side
by side in the usual radiological hanging (R-CC, L-CC, R-MLO, L-MLO; each view in its original
orientation) shows the whole exam at a glance in any viewer, keeps the outbox to one object,
and lets one deterministic SOP Instance UID replace it on re-processing. Each panel shows
``ViewFinding.display`` with ``ViewFinding.heatmap`` blended in colour, the finding outline,
and the scores burned in as text (so BurnedInAnnotation is YES). A failed view is a grey panel
with its error text; a view the study lacks is a dark panel. A demonstration model adds a red
"NOT FOR DIAGNOSTIC USE - DEMONSTRATION MODEL" banner.
"""

from cadnode.results.sc.content import (
    BANNER_TEXT,
    FAILED_GREY,
    HANGING,
    HEADER_H,
    PANEL_H,
    PANEL_W,
    render_montage,
)
from cadnode.results.sc.sop import KIND, SERIES_NUMBER, build_secondary_capture

__all__ = [
    "BANNER_TEXT",
    "FAILED_GREY",
    "HANGING",
    "HEADER_H",
    "KIND",
    "PANEL_H",
    "PANEL_W",
    "SERIES_NUMBER",
    "build_secondary_capture",
    "render_montage",
]
