"""The result objects the node writes, by the name settings, the outbox and file names use."""

from __future__ import annotations

from enum import StrEnum


class ResultKind(StrEnum):
    """One member per result object; ``cadnode.results.BUILDERS`` has a builder for each."""

    CAD_SR = "cad_sr"  # Mammography CAD SR (TID 4000)
    TID1500 = "tid1500"  # Comprehensive 3D SR, TID 1500 measurement report
    SC = "sc"  # Secondary Capture montage
    GSPS = "gsps"  # Grayscale Softcopy Presentation State
