"""Dataset adapters: each reads a layout users already have and yields `Sample` records."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cadnode.dicom.selection import ImplantPolicy
from train.datasets import cbis_ddsm, csv_manifest, dicom_folder, embed, rsna, vindr
from train.datasets._common import DatasetError, screening_samples
from train.datasets.base import Sample

__all__ = ["ADAPTERS", "DatasetError", "Sample", "load_dataset", "screening_samples"]

#: Layout name -> loader(root, **options). Layouts and label rules: docs/training.md, "Datasets".
ADAPTERS: dict[str, Callable[..., list[Sample]]] = {
    "rsna": rsna.load,
    "vindr": vindr.load,
    "cbis-ddsm": cbis_ddsm.load,
    "embed": embed.load,
    "csv": csv_manifest.load,
    "dicom-folder": dicom_folder.load,
}


def load_dataset(kind: str, root: Path, *, views: str = "screening",
                 implant_views: str = ImplantPolicy.FALLBACK.value,
                 include_processing: bool = False, **options: Any) -> list[Sample]:
    """Samples of the dataset at ``root`` in layout ``kind`` (``cbis_ddsm`` = ``cbis-ddsm``).

    ``views="screening"`` (default) keeps, per exam, the images the node reads when serving
    (:func:`screening_samples`: the node's own view selection); ``views="all"`` keeps every
    image the adapter yields. Other options are the adapter's keyword arguments; all take
    ``on_error="raise"|"skip"``.
    """
    key = kind.strip().lower().replace("_", "-")
    if key not in ADAPTERS:
        raise ValueError(f"unknown dataset kind {kind!r}; known: {', '.join(ADAPTERS)}")
    if views not in ("screening", "all"):
        raise ValueError(f"views must be 'screening' or 'all', not {views!r}")
    samples = ADAPTERS[key](Path(root), **options)
    if views == "all":
        return samples
    return screening_samples(samples, ImplantPolicy(implant_views), include_processing,
                             source=str(root))
