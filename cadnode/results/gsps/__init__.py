"""Grayscale Softcopy Presentation State (highdicom): the CAD marks drawn on the source images.

The object Weasis-style viewers and many PACS apply on top of the mammograms: per view the
finding outline (POLYLINE) and centre (POINT), the scores as text, a "not for clinical use"
notice for demonstration models, and a window taken from the source header (or its pixel
value range) so that the images look as intended while the presentation state is applied.
One GSPS per study, referencing all views. See ``content`` and docs/results.md.
"""

from cadnode.results.gsps.content import (
    DEMO_BANNER,
    FINDINGS_LAYER,
    TEXT_LAYER,
    score_text,
    view_annotations,
    voi_transformation,
)
from cadnode.results.gsps.sop import CONTENT_LABEL, GSPS, KIND, SERIES_NUMBER, build_gsps

__all__ = [
    "CONTENT_LABEL",
    "DEMO_BANNER",
    "FINDINGS_LAYER",
    "GSPS",
    "KIND",
    "SERIES_NUMBER",
    "TEXT_LAYER",
    "build_gsps",
    "score_text",
    "view_annotations",
    "voi_transformation",
]
