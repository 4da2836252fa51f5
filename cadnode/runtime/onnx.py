"""ONNX Runtime engine (CPU): the node's default backend; no torch anywhere on this path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from cadnode.runtime.manifest import INPUT_NAMES, ModelManifest, read_manifest
from cadnode.runtime.types import ViewOutputs


class OnnxEngine:
    """Runs a model package's model.onnx with the CPUExecutionProvider."""

    backend = "onnxruntime"

    def __init__(self, package: str | Path | ModelManifest, *, intra_op_threads: int = 0,
                 verify_checksums: bool = True) -> None:
        """``intra_op_threads`` 0 lets ONNX Runtime pick (one per physical core)."""
        self.manifest = (package if isinstance(package, ModelManifest)
                         else read_manifest(package, verify_checksums=verify_checksums))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(intra_op_threads)
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.manifest.model_path), sess_options=opts,
                                            providers=["CPUExecutionProvider"])
        self._inputs = [i.name for i in self.session.get_inputs()]
        unknown = sorted(set(self._inputs) - set(INPUT_NAMES))
        if unknown:
            raise ValueError(f"model package {self.manifest.package}: graph has unknown inputs "
                             f"{unknown}")
        outputs = {o.name for o in self.session.get_outputs()}
        if not set(self.manifest.outputs) <= outputs:
            raise ValueError(f"model package {self.manifest.package}: graph outputs "
                             f"{sorted(outputs)} lack {list(self.manifest.outputs)}")

    def _check(self, images: np.ndarray, input_ids: np.ndarray,
               attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        images = np.ascontiguousarray(images, dtype=np.float32)
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        attention_mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        h, w = self.manifest.input_size
        if images.ndim != 4 or images.shape[1:] != (1, h, w):
            raise ValueError(f"images must be (B, 1, {h}, {w}), got {images.shape}")
        length = self.manifest.max_text_len
        b = images.shape[0]
        for name, arr in (("input_ids", input_ids), ("attention_mask", attention_mask)):
            if arr.shape != (b, length):
                raise ValueError(f"{name} must be ({b}, {length}), got {arr.shape}")
        feeds = {"image": images, "input_ids": input_ids, "attention_mask": attention_mask}
        return {name: feeds[name] for name in self._inputs}

    def predict(self, images: np.ndarray, input_ids: np.ndarray,
                attention_mask: np.ndarray) -> ViewOutputs:
        """images float32 (B,1,H,W) in [0,1]; tokens int64 (B,L) -> probabilities per view."""
        feeds = self._check(images, input_ids, attention_mask)
        names = ["cancer", "calcification", "heatmap"]
        cancer, calc, heat = self.session.run(names, feeds)
        return ViewOutputs(cancer=np.asarray(cancer, dtype=np.float32).reshape(-1),
                           calcification=np.asarray(calc, dtype=np.float32).reshape(-1),
                           heatmap=np.asarray(heat, dtype=np.float32))
