"""ONNX Runtime engine: the node's default backend; no torch anywhere on this path.

On the CPU by default; with ``onnxruntime-gpu`` installed and a CUDA device present, the
TensorRT and CUDA execution providers are taken in that order (``providers`` says which ONNX
Runtime actually used: it falls back to the CPU when a provider's libraries or device are
missing, so the request alone proves nothing). ``precision="int8"`` runs the package's
quantised variant, made on this machine by ``cadnode engine quantize`` and kept under the
node's home only when it scores the benchmark as well as fp32 (see ``int8_model_path``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from cadnode.runtime.engine_cache import engines_dir, file_slug
from cadnode.runtime.enum import DEVICES, Backend, BackendUnavailable, Precision, precision_for
from cadnode.runtime.feeds import check_feeds
from cadnode.runtime.manifest import INPUT_NAMES, MODEL_NAME, ModelManifest, read_manifest, sha256
from cadnode.runtime.types import ViewOutputs

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
#: GPU execution providers, most preferred first.
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
#: Device memory the CUDA provider may hold for its arena (the arena grows by what is asked for,
#: not by doubling, so a 4-view batch does not reserve twice its need).
CUDA_MEMORY_LIMIT = 8 * 2**30


def int8_model_path(manifest: ModelManifest, home: Path) -> Path:
    """Where the quantised variant of ``manifest``'s ONNX lives: named by the ONNX file's
    sha256, so a changed model never meets an old quantisation."""
    digest = manifest.sha256.get(MODEL_NAME) or sha256(manifest.model_path)
    return engines_dir(Path(home)) / f"{file_slug(manifest.name)}-{digest[:12]}-ort-int8.onnx"


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

    backend = Backend.ONNXRUNTIME.value

    def __init__(self, package: str | Path | ModelManifest, *, intra_op_threads: int = 0,
                 verify_checksums: bool = True, device: str = "auto", precision: str = "",
                 home: str | Path | None = None) -> None:
        """``device``: "auto" (a GPU provider when one can run, else the CPU), "cpu", or
        "gpu" (BackendUnavailable when no GPU provider is taken); ``precision`` fp32 or int8
        (the quantised variant under ``home``)."""
        self.manifest = (package if isinstance(package, ModelManifest)
                         else read_manifest(package, verify_checksums=verify_checksums))
        self.precision = precision_for(Backend.ONNXRUNTIME, precision)
        model = self.manifest.model_path
        if self.precision is Precision.INT8:
            if home is None:
                raise BackendUnavailable("int8 needs the node's home, where the quantised "
                                         "model is kept")
            model = int8_model_path(self.manifest, Path(home))
            if not model.is_file():
                raise BackendUnavailable(
                    f"no int8 model for {self.manifest.name} {self.manifest.version} at "
                    f"{model}; make it with: cadnode engine quantize --package "
                    f"{self.manifest.package}")
        requested = _requested(device)
        self.session = ort.InferenceSession(str(model),
                                            sess_options=session_options(intra_op_threads),
                                            providers=requested)
        #: the execution providers ONNX Runtime took, in order of preference
        self.providers: list[str] = list(self.session.get_providers())
        if device == "gpu" and not set(self.providers) & set(GPU_PROVIDERS):
            raise BackendUnavailable(
                "ONNX Runtime offers a GPU provider but could not use it (no CUDA device, or "
                f"its libraries are missing); it took only {', '.join(self.providers)}")
        log.info("model %s %s (%s) on ONNX Runtime %s (%s)", self.manifest.name,
                 self.manifest.version, self.precision.value, ort.__version__,
                 ", ".join(self.providers))
        self._inputs = [i.name for i in self.session.get_inputs()]
        unknown = sorted(set(self._inputs) - set(INPUT_NAMES))
        if unknown:
            raise ValueError(f"model package {self.manifest.package}: graph has unknown inputs "
                             f"{unknown}")
        outputs = {o.name for o in self.session.get_outputs()}
        if not set(self.manifest.outputs) <= outputs:
            raise ValueError(f"model package {self.manifest.package}: graph outputs "
                             f"{sorted(outputs)} lack {list(self.manifest.outputs)}")

    def predict(self, images: np.ndarray, input_ids: np.ndarray,
                attention_mask: np.ndarray) -> ViewOutputs:
        """images float32 (B,1,H,W) in [0,1]; tokens int64 (B,L) -> probabilities per view."""
        feeds = check_feeds(self.manifest, images, input_ids, attention_mask)
        names = ["cancer", "calcification", "heatmap"]
        cancer, calc, heat = self.session.run(names, {n: feeds[n] for n in self._inputs})
        return ViewOutputs(cancer=np.asarray(cancer, dtype=np.float32).reshape(-1),
                           calcification=np.asarray(calc, dtype=np.float32).reshape(-1),
                           heatmap=np.asarray(heat, dtype=np.float32))
