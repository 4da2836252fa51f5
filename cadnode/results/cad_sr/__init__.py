"""Mammography CAD SR (SOP class 1.2.840.10008.5.1.4.1.1.88.50, root template TID 4000).

Mammography workstations read this object to show CAD marks. highdicom has no TID 4000 builder,
so the tree is assembled from highdicom content items and then written out as plain pydicom
datasets, because TID 4021 (geometry) needs by-reference relationships (R-SELECTED FROM the
Image Library entry) that highdicom's content item classes cannot express.

Content tree (TID numbers of PS3.16 in brackets)::

    CONTAINER Mammography CAD Report                              [4000]
      HAS CONCEPT MOD  Language of Content Item and Descendants   [1204]
      CONTAINS  CONTAINER Image Library
        CONTAINS  IMAGE (every view read, failed ones too)        [4020]
          HAS ACQ CONTEXT  Image Laterality, Image View, Study Date/Time, [orientation, spacing]
      CONTAINS  CODE CAD Processing and Findings Summary          [4001]
        HAS PROPERTIES  TEXT Impression Description (exam level)  [4002]
        INFERRED FROM  CONTAINER Individual Impression/Recommendation, one per breast  [4003]
          HAS CONCEPT MOD  Rendering Intent
          CONTAINS  TEXT Impression Description (breast level, failed views named)
          CONTAINS  CODE Composite Feature = Selected region (cancer, breast level)  [4004]
            HAS PROPERTIES  Certainty of Feature, Probability of cancer, algorithm  [4019]
            HAS PROPERTIES  TEXT Comment "outside the model's validated domain: ..." (if so)
            INFERRED FROM  CODE Single Image Finding = Selected region, one per view  [4006]
              HAS CONCEPT MOD  Rendering Intent
              HAS PROPERTIES  algorithm, Certainty of Finding, Probability of cancer
              HAS PROPERTIES  TEXT Comment "outside the model's validated domain: <reasons>"
              HAS PROPERTIES  SCOORD Center (POINT) / Outline (closed POLYLINE)     [4021]
                R-SELECTED FROM  -> Image Library entry
          CONTAINS  CODE Composite Feature = Calcification Cluster (same shape, no geometry)
      CONTAINS  CODE Summary of Detections  (Succeeded | Partially Succeeded | Failed)
        INFERRED FROM  CONTAINER Successful Detections / Failed Detections   [4015]
          CONTAINS  CODE Detection Performed, algorithm, R-HAS PROPERTIES -> library entries
      CONTAINS  CODE Summary of Analyses  (same, per-breast and overall analyses)  [4016]

Choices worth knowing:
- Scores are NUM items in percent (UCUM "%"), rounded to 0.01.
- "with findings" in the summary means at least one finding is above its operating point
  (``StudyFindings.thresholds``), i.e. marked "Presentation Required"; findings below it are
  still reported, marked "Presentation Optional".
- Geometry (TID 4021) only for cancer findings at or above the cancer operating point; below
  it the view's text says "no region marked". The model's calcification output is image-level:
  its single image findings carry no geometry, and the text says so.
- An exam with a missing or undecodable standard view is "Not all algorithms succeeded"; the
  exam-level Impression Descriptions say INCOMPLETE EXAM, name each missing view and each
  received image that was not analysed, with why (``StudyFindings.missing``/``not_analysed``).
- A view unlike the model's training images (``ViewFinding.outside_domain``) keeps its scores,
  but a TEXT Comment next to them says "outside the model's validated domain" with the
  reasons, as do its view line and an exam-level Impression Description.
- SCOORDs are clipped to the image (0..Columns, 0..Rows); outlines are closed (last = first).
- A second version of the report names the first in the Predecessor Documents Sequence.
"""

from cadnode.results.cad_sr.content import CALC_FINDING, CANCER_FINDING, content_dataset
from cadnode.results.cad_sr.sop import KIND, MAMMOGRAPHY_CAD_SR, SERIES_NUMBER, build_cad_sr

__all__ = [
    "CALC_FINDING",
    "CANCER_FINDING",
    "KIND",
    "MAMMOGRAPHY_CAD_SR",
    "SERIES_NUMBER",
    "build_cad_sr",
    "content_dataset",
]
