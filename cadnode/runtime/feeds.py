"""The model's three inputs, checked once for every backend: dtypes, shapes and names."""

from __future__ import annotations

import numpy as np

from cadnode.runtime.manifest import ModelManifest


def check_feeds(manifest: ModelManifest, images: np.ndarray, input_ids: np.ndarray,
                attention_mask: np.ndarray) -> dict[str, np.ndarray]:
    """Contiguous float32 images (B, 1, H, W) and int64 tokens (B, L) by input name; a
    ValueError names the input whose shape is not the package's."""
    images = np.ascontiguousarray(images, dtype=np.float32)
    input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
    attention_mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
    h, w = manifest.input_size
    if images.ndim != 4 or images.shape[1:] != (1, h, w):
        raise ValueError(f"images must be (B, 1, {h}, {w}), got {images.shape}")
    length = manifest.max_text_len
    b = images.shape[0]
    for name, arr in (("input_ids", input_ids), ("attention_mask", attention_mask)):
        if arr.shape != (b, length):
            raise ValueError(f"{name} must be ({b}, {length}), got {arr.shape}")
    return {"image": images, "input_ids": input_ids, "attention_mask": attention_mask}
