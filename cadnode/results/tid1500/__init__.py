"""Comprehensive 3D SR with a TID 1500 Measurement Report, built with highdicom.

The object OHIF-style viewers read: measurement groups per view, per breast and for the exam,
the scores as NUM in percent (UCUM "%"), the finding outline as an Image Region on the source
image's pixel grid, tracking identifiers, algorithm identification and a device observer.
See ``content`` for the groups and docs/results.md for the choices.
"""

from cadnode.results.tid1500.content import (
    CALC_FINDING,
    CALC_SCORE,
    CANCER_FINDING,
    CANCER_SCORE,
    cancer_label,
    measurement_groups,
    measurement_report,
)
from cadnode.results.tid1500.sop import (
    COMPREHENSIVE_3D_SR,
    KIND,
    SERIES_NUMBER,
    build_tid1500_sr,
    evidence_stubs,
)

__all__ = [
    "CALC_FINDING",
    "CALC_SCORE",
    "CANCER_FINDING",
    "CANCER_SCORE",
    "cancer_label",
    "COMPREHENSIVE_3D_SR",
    "KIND",
    "SERIES_NUMBER",
    "build_tid1500_sr",
    "evidence_stubs",
    "measurement_groups",
    "measurement_report",
]
