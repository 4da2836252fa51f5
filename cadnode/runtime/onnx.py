"""ONNX Runtime engine: the node's default backend; no torch anywhere on this path.

On the CPU by default; with ``onnxruntime-gpu`` installed and a CUDA device present, the
TensorRT and CUDA execution providers are taken in that order (``providers`` says which ONNX
Runtime actually used: it falls back to the CPU when a provider's libraries or device are
missing, so the request alone proves nothing).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from cadnode.runtime.enum import DEVICES, BackendUnavailable
from cadnode.runtime.manifest import INPUT_NAMES, ModelManifest, read_manifest
from cadnode.runtime.types import ViewOutputs

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
#: GPU execution providers, most preferred first.
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
#: Device memory the CUDA provider may hold for its arena (the arena grows by what is asked for,
#: not by doubling, so a 4-view batch does not reserve twice its need).
CUDA_MEMORY_LIMIT = 8 * 2**30


def gpu_providers() -> list[str]:
    """The GPU execution providers this ONNX Runtime build offers (a device may still be
    missing: only a session says whether one was taken)."""
    available = set(ort.get_available_providers())
    return [p for p in GPU_PROVIDERS if p in available]


def session_options(intra_op_threads: int = 0) -> ort.SessionOptions:
    """Options for one model on a server: every graph optimisation; ``intra_op_threads`` 0
    lets ONNX Runtime take one thread per physical core; one inter-op thread (the graph is
    one chain of convolutions and attention); warnings and errors only in the log."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(intra_op_threads)
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return opts


def _requested(device: str) -> list[str | tuple[str, dict[str, object]]]:
    if device not in DEVICES:
        raise ValueError(f"device {device!r} is not one of {', '.join(DEVICES)}")
    gpu = [] if device == "cpu" else gpu_providers()
    if device == "gpu" and not gpu:
        raise BackendUnavailable(
            "no GPU execution provider in this ONNX Runtime (install onnxruntime-gpu, with an "
            f"NVIDIA driver and CUDA; available: {', '.join(ort.get_available_providers())})")
    chosen: list[str | tuple[str, dict[str, object]]] = []
    for name in gpu:
        if name == "CUDAExecutionProvider":
            chosen.append((name, {"arena_extend_strategy": "kSameAsRequested",
                                  "gpu_mem_limit": CUDA_MEMORY_LIMIT}))
        else:
            chosen.append(name)
    return [*chosen, CPU]


class OnnxEngine:
    """Runs a model package's model.onnx with ONNX Runtime."""

    backend = "onnxruntime"

    def __init__(self, package: str | Path | ModelManifest, *, intra_op_threads: int = 0,
                 verify_checksums: bool = True, device: str = "auto") -> None:
        """``device``: "auto" (a GPU provider when one can run, else the CPU), "cpu", or
        "gpu" (BackendUnavailable when no GPU provider is taken)."""
        self.manifest = (package if isinstance(package, ModelManifest)
                         else read_manifest(package, verify_checksums=verify_checksums))
        requested = _requested(device)
        self.session = ort.InferenceSession(str(self.manifest.model_path),
                                            sess_options=session_options(intra_op_threads),
                                            providers=requested)
        #: the execution providers ONNX Runtime took, in order of preference
        self.providers: list[str] = list(self.session.get_providers())
        if device == "gpu" and not set(self.providers) & set(GPU_PROVIDERS):
            raise BackendUnavailable(
                "ONNX Runtime offers a GPU provider but could not use it (no CUDA device, or "
                f"its libraries are missing); it took only {', '.join(self.providers)}")
        log.info("model %s %s on ONNX Runtime %s (%s)", self.manifest.name,
                 self.manifest.version, ort.__version__, ", ".join(self.providers))
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
