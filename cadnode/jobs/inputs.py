"""DICOM views -> the model's three inputs, the one way every caller makes them.

The worker decodes pixels in a child process (:class:`cadnode.jobs.decoding.DecodePool`) and
encodes text with :func:`encode_texts`; calibration (``trt_engines``), backend parity tests and
benchmarks read files in this process with :func:`file_inputs`. Both go through the node's own
pixel pipeline (:func:`cadnode.dicom.pixels.prepare_image`) and text builder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from cadnode.dicom.pixels import prepare_image
from cadnode.dicom.views import ViewInfo, detect_view
from cadnode.runtime.manifest import ModelManifest
from cadnode.text.clinical import build_clinical_text
from cadnode.text.tokenizer import ClinicalTokenizer


@dataclass(frozen=True)
class ModelInputs:
    """A batch of views as every backend takes it."""

    images: np.ndarray  # float32 (B, 1, H, W) in [0, 1]
    input_ids: np.ndarray  # int64 (B, L)
    attention_mask: np.ndarray  # int64 (B, L)
    keys: tuple[str, ...]  # one label per view, e.g. "L-CC" (file name when unknown)

    def __len__(self) -> int:
        return int(self.images.shape[0])


def encode_texts(tokenizer: ClinicalTokenizer, views: Sequence[tuple[Dataset, ViewInfo]],
                 template_version: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask of each view's clinical text, built from its header with
    the template the model package was trained on."""
    encoded = [tokenizer.encode(build_clinical_text(ds, info, template_version))
               for ds, info in views]
    ids = np.stack([e[0] for e in encoded]).astype(np.int64)
    mask = np.stack([e[1] for e in encoded]).astype(np.int64)
    return ids, mask


def stack_images(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Prepared (H, W) model inputs as the (B, 1, H, W) float32 batch every engine takes."""
    return np.stack(arrays)[:, None].astype(np.float32)


def file_inputs(paths: Sequence[str | Path], manifest: ModelManifest,
                tokenizer: ClinicalTokenizer) -> ModelInputs:
    """Read, decode and prepare each DICOM file in this process (no child, no limits: for
    trusted files such as a calibration folder or a test exam)."""
    if not paths:
        raise ValueError("no DICOM files given")
    images, views, keys = [], [], []
    for path in paths:
        ds = pydicom.dcmread(str(path))
        info = detect_view(ds)
        images.append(prepare_image(ds, manifest.input_size, info.laterality,
                                    pipeline=manifest.pixel_pipeline).array)
        views.append((ds, info))
        keys.append(info.key or Path(path).name)
    ids, mask = encode_texts(tokenizer, views, manifest.text_template_version)
    return ModelInputs(stack_images(images), ids, mask, tuple(keys))
