"""Engine-neutral types shared by every backend (kept apart so backends avoid import cycles)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from cadnode.runtime.manifest import ModelManifest


@dataclass(frozen=True)
class ViewOutputs:
    """Per-view probabilities for a batch of B views."""

    cancer: np.ndarray  # float32 (B,)
    calcification: np.ndarray  # float32 (B,)
    heatmap: np.ndarray  # float32 (B, h, w) in [0, 1]

    def __len__(self) -> int:
        return int(self.cancer.shape[0])


class Engine(Protocol):
    """What the worker needs from any backend (ONNX Runtime, TensorRT, torch, Triton)."""

    manifest: ModelManifest
    backend: str  # a cadnode.runtime.enum.Backend value
    providers: list[str]  # what it runs on, most preferred first (e.g. CUDA, then CPU)

    def predict(self, images: np.ndarray, input_ids: np.ndarray,
                attention_mask: np.ndarray) -> ViewOutputs: ...
