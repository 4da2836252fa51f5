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


#: The dtype of every tensor a package's model takes or gives.
TENSOR_DTYPES: dict[str, np.dtype] = {
    "image": np.dtype(np.float32), "input_ids": np.dtype(np.int64),
    "attention_mask": np.dtype(np.int64), "cancer": np.dtype(np.float32),
    "calcification": np.dtype(np.float32), "heatmap": np.dtype(np.float32)}


def view_shapes(manifest: ModelManifest) -> dict[str, tuple[int, ...] | None]:
    """Per-view shape (the batch dimension left out) of every tensor; None for a heatmap whose
    size the manifest does not record. Engines check a compiled or served model against it."""
    h, w = manifest.input_size
    length = manifest.max_text_len
    return {"image": (1, h, w), "input_ids": (length,), "attention_mask": (length,),
            "cancer": (), "calcification": (),
            "heatmap": tuple(manifest.heatmap_size) if manifest.heatmap_size else None}
