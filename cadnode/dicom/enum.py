"""The mammography header vocabulary: sides, views, view modifiers and presentation intent.

One enum per concept, shared by the view detector, the view selection, the text builder and the
result objects. The values are the strings DICOM headers carry (``ViewPosition`` terms of PS3.3
C.8.11.7) or that cadnode writes into its job database, so an enum member compares equal to the
plain string.
"""

from __future__ import annotations

from enum import StrEnum


class Laterality(StrEnum):
    LEFT = "L"
    RIGHT = "R"


class View(StrEnum):
    """Mammographic projections (CID 4014 abbreviations, as in ``ViewPosition``)."""

    CC = "CC"
    MLO = "MLO"
    ML = "ML"
    LM = "LM"
    LMO = "LMO"
    XCC = "XCC"
    XCCL = "XCCL"
    XCCM = "XCCM"
    FB = "FB"
    SIO = "SIO"
    ISO = "ISO"
    CV = "CV"
    AT = "AT"
    RL = "RL"
    RM = "RM"
    RS = "RS"
    RI = "RI"
    TAN = "TAN"
    SPECIMEN = "SPECIMEN"


#: The projections of a screening exam, per breast; every other projection is "not analysed".
SCREENING_VIEWS: tuple[View, ...] = (View.CC, View.MLO)
#: The four screening views that the model reads, in the order results list them.
STANDARD_VIEW_KEYS: tuple[str, ...] = ("L-CC", "L-MLO", "R-CC", "R-MLO")


class ViewModifier(StrEnum):
    """View modifiers for mammography (CID 4015); any of them makes a view non-screening."""

    SPOT_COMPRESSION = "spot compression"
    MAGNIFICATION = "magnification"
    IMPLANT_DISPLACED = "implant displaced"
    ROLLED = "rolled"
    TANGENTIAL = "tangential"
    CLEAVAGE = "cleavage"
    AXILLARY = "axillary"
    NIPPLE_IN_PROFILE = "nipple in profile"
    INFRAMAMMARY_FOLD = "inframammary fold"
    OTHER = "other modifier"


class Intent(StrEnum):
    """Presentation intent: what the pixels are for."""

    PRESENTATION = "presentation"
    PROCESSING = "processing"


class PixelPipeline(StrEnum):
    """How :func:`cadnode.dicom.pixels.prepare_image` turns a breast into the model input; a
    model package names the one it was trained with (``pixel_pipeline`` in its manifest)."""

    #: The breast's bounding box stretched to the input size; intensities clipped at the
    #: breast's 0.5th and 99.5th percentiles (saturates the brightest specks). Packages that
    #: name no pipeline were trained with this one.
    STRETCH_CLIP = "v1"
    #: The box grown to the input's aspect ratio (on the nipple side, and evenly above and
    #: below) and padded with background, so shapes keep their proportions; intensities
    #: linear up to the 99.5th percentile at 0.8, then compressed smoothly towards 1, so
    #: microcalcifications brighter than the tissue stay brighter instead of saturating.
    PAD_KNEE = "v2"


#: What new models train with, and what :func:`cadnode.dicom.pixels.prepare_image` does when
#: no package names a pipeline (serving always passes the manifest's).
NEWEST_PIXEL_PIPELINE = PixelPipeline.PAD_KNEE
