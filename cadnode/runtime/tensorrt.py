"""TensorRT engine: a plan built from the package's ONNX for this GPU, run with the TensorRT 10
Python API (name-based I/O, ``execute_async_v3``).

TensorRT is imported only when an engine is opened, so this module imports cleanly without it.
A plan is found in the engine cache (:mod:`cadnode.runtime.engine_cache`) by the package's ONNX
sha256, the TensorRT version, the GPU, its compute capability, the precision and the most views
per call; anything that does not fit is refused with one line saying what is missing and which
``cadnode engine build`` command makes it. Device buffers for the most views are allocated once
and reused; batches with more views are run in slices.
"""

from __future__ import annotations

import functools
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from cadnode.runtime import cuda as cuda_layer
from cadnode.runtime.engine_cache import (
    TRT_PRECISIONS,
    EngineKey,
    check_precision,
    other_plans,
    sidecar_problem,
)
from cadnode.runtime.enum import Backend, BackendUnavailable
from cadnode.runtime.feeds import TENSOR_DTYPES, check_feeds, view_shapes
from cadnode.runtime.manifest import INPUT_NAMES, ModelManifest, read_manifest
from cadnode.runtime.types import ViewOutputs

log = logging.getLogger(__name__)

NO_TENSORRT = ("no TensorRT Python module: pip install tensorrt-cu12 (or tensorrt-cu13, to "
               "match the NVIDIA driver's CUDA), TensorRT 10 or later, on a machine with an "
               "NVIDIA GPU")


def import_tensorrt() -> Any:
    """The ``tensorrt`` module, TensorRT 10 or later; BackendUnavailable saying what to
    install otherwise."""
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailable(NO_TENSORRT) from None
    version = str(getattr(tensorrt, "__version__", "0"))
    if not version.split(".")[0].isdigit() or int(version.split(".")[0]) < 10:
        raise BackendUnavailable(f"TensorRT {version} is installed; this backend uses the "
                                 f"TensorRT 10 API ({NO_TENSORRT.split(': ', 1)[1]})")
    return tensorrt


@functools.cache
def trt_logger(trt: Any) -> Any:
    """One logger per process (TensorRT keeps the first one it is given)."""
    return trt.Logger(trt.Logger.WARNING)


def build_command(package: Path, precision: str, max_views: int) -> str:
    """The command that builds the missing engine."""
    command = (f"cadnode engine build --package {package} --precision {precision} "
               f"--max-views {max_views}")
    return command + (" --calibration DICOM_DIR" if precision == "int8" else "")


def expected_io(manifest: ModelManifest) -> dict[str, tuple[np.dtype[Any], tuple[int, ...]]]:
    """Per-view (dtype, shape) of every tensor the package defines (batch dimension left out)."""
    return {name: (TENSOR_DTYPES[name], shape)
            for name, shape in view_shapes(manifest).items() if shape is not None}


class TensorRTEngine:
    """Runs a TensorRT plan of a model package's model.onnx on one NVIDIA GPU."""

    backend = Backend.TENSORRT.value

    def __init__(self, package: str | Path | ModelManifest, *, home: Path,
                 precision: str = TRT_PRECISIONS[0], max_views: int = 8,
                 build_if_missing: bool = False, verify_checksums: bool = True) -> None:
        """``home``: the node's home (plans under ``home/engines``); ``build_if_missing``
        builds the plan with ``trt_engines.build`` instead of refusing (minutes)."""
        self.manifest = (package if isinstance(package, ModelManifest)
                         else read_manifest(package, verify_checksums=verify_checksums))
        self.precision = check_precision(precision)
        self.max_views = int(max_views)
        trt = import_tensorrt()
        self._cuda = cuda_layer.open_cuda()
        device = self._cuda.device_info()
        key = EngineKey.for_package(self.manifest, trt.__version__, device, precision,
                                    self.max_views)
        problem = sidecar_problem(key, home)
        if problem is not None and build_if_missing:
            from trt_engines.build import build_engine  # the builder, only when asked for

            build_engine(self.manifest, home=home, precision=precision, max_views=max_views)
            problem = sidecar_problem(key, home)
        if problem is not None:
            raise BackendUnavailable(self._refusal(key, home, problem))
        self.plan = key.plan_path(home)
        engine = trt.Runtime(trt_logger(trt)).deserialize_cuda_engine(self.plan.read_bytes())
        if engine is None:
            raise BackendUnavailable(
                f"TensorRT {trt.__version__} could not deserialise {self.plan} (a plan runs "
                "only with the TensorRT version and GPU that built it; see the TensorRT log); "
                f"rebuild it: {build_command(self.manifest.package, precision, max_views)}")
        self._engine = engine
        self._inputs, self._outputs = self._check_io(trt, engine)
        context = engine.create_execution_context()
        if context is None:
            raise BackendUnavailable(f"TensorRT could not create an execution context for "
                                     f"{self.plan} (out of GPU memory?)")
        self._context = context
        self._lock = threading.Lock()
        self._buffers: dict[str, cuda_layer.DeviceBuffer] = {}
        self._host: dict[str, np.ndarray] = {}
        self._allocate()
        #: what it runs on
        self.providers: list[str] = [f"TensorRT {trt.__version__} on {device.name} "
                                     f"(sm_{device.sm}), {precision}"]
        log.info("model %s %s on %s (%s, %s)", self.manifest.name, self.manifest.version,
                 self.providers[0], self.plan.name, self._cuda.library)

    def _refusal(self, key: EngineKey, home: Path, problem: str) -> str:
        command = build_command(self.manifest.package, key.precision, key.max_views)
        others = other_plans(key, home)
        if not key.plan_path(home).is_file() and others:
            found = "; ".join(k.describe() for k in others)
            return (f"no TensorRT engine of {self.manifest.name} for {key.describe()}: the "
                    f"engine cache {key.plan_path(home).parent} holds it only for {found}; "
                    f"build one here: {command}")
        if not key.plan_path(home).is_file():
            return (f"no TensorRT engine of {self.manifest.name} for {key.describe()} "
                    f"({problem}); build it: {command}")
        return f"{problem}; rebuild it: {command}"

    def _check_io(self, trt: Any, engine: Any) -> tuple[list[str], list[str]]:
        """The engine's input and output names, after checking them against the manifest."""
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        where = f"TensorRT engine {self.plan.name}"
        unknown = sorted(set(inputs) - set(INPUT_NAMES))
        missing = sorted(set(self.manifest.outputs) - set(outputs))
        if unknown or missing or "image" not in inputs:
            raise ValueError(f"{where}: inputs {inputs} / outputs {outputs} are not the "
                             f"package's (unknown inputs {unknown}, missing outputs {missing})")
        expected = expected_io(self.manifest)
        for name in [*inputs, *self.manifest.outputs]:
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            shape = tuple(engine.get_tensor_shape(name))
            want_dtype, want_shape = expected.get(name, (dtype, shape[1:]))
            if dtype != want_dtype or shape[1:] != want_shape:
                raise ValueError(f"{where}: tensor {name} is {dtype} {shape}, the package says "
                                 f"{want_dtype} (B, {', '.join(map(str, want_shape))})")
        for name in inputs:
            low, _, high = (tuple(s) for s in engine.get_tensor_profile_shape(name, 0))
            if low[0] > 1 or high[0] < self.max_views:
                raise ValueError(f"{where}: input {name} takes {low[0]} to {high[0]} views, "
                                 f"not 1 to {self.max_views}")
        return inputs, list(self.manifest.outputs)

    def _allocate(self) -> None:
        """Device buffers (and host outputs) for ``max_views``, bound once to the context."""
        expected = expected_io(self.manifest)
        shapes: dict[str, tuple[int, ...]] = {}
        for name in self._inputs:
            shapes[name] = (self.max_views, *expected[name][1])
            self._set_shape(name, shapes[name])
        for name in self._outputs:
            shapes[name] = tuple(self._context.get_tensor_shape(name))
            if any(d < 0 for d in shapes[name]):
                raise ValueError(f"TensorRT engine {self.plan.name}: output {name} has no "
                                 f"static shape for {self.max_views} views ({shapes[name]})")
            self._host[name] = np.empty(shapes[name], dtype=np.float32)
        for name, shape in shapes.items():
            itemsize = expected[name][0].itemsize if name in self._inputs else 4
            self._buffers[name] = self._cuda.allocate(int(np.prod(shape)) * itemsize)
            if not self._context.set_tensor_address(name, self._buffers[name].ptr):
                raise RuntimeError(f"TensorRT refused the device address of {name}")

    def _set_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if not self._context.set_input_shape(name, shape):
            raise ValueError(f"TensorRT engine {self.plan.name} does not take {name} of shape "
                             f"{shape}")

    def predict(self, images: np.ndarray, input_ids: np.ndarray,
                attention_mask: np.ndarray) -> ViewOutputs:
        """images float32 (B,1,H,W) in [0,1]; tokens int64 (B,L) -> probabilities per view."""
        feeds = check_feeds(self.manifest, images, input_ids, attention_mask)
        total = feeds["image"].shape[0]
        with self._lock:
            parts = [self._run(feeds, start, min(self.max_views, total - start))
                     for start in range(0, total, self.max_views)]
        if not parts:
            heat = self._host["heatmap"].shape[1:]
            empty = np.zeros((0,), dtype=np.float32)
            return ViewOutputs(empty, empty.copy(), np.zeros((0, *heat), dtype=np.float32))
        out = {name: np.concatenate([p[name] for p in parts]) for name in self._outputs}
        return ViewOutputs(cancer=out["cancer"].reshape(-1),
                           calcification=out["calcification"].reshape(-1),
                           heatmap=out["heatmap"])

    def _run(self, feeds: dict[str, np.ndarray], start: int, n: int) -> dict[str, np.ndarray]:
        """Views ``start`` to ``start + n`` (n <= max_views) through the engine."""
        for name in self._inputs:
            part = feeds[name][start:start + n]
            self._set_shape(name, part.shape)
            self._cuda.to_device(self._buffers[name], part)
        hosts = {}
        for name in self._outputs:
            shape = tuple(self._context.get_tensor_shape(name))
            if shape != self._host[name][:n].shape:
                raise RuntimeError(f"TensorRT output {name} has shape {shape} for {n} views")
            hosts[name] = self._host[name][:n]
        if not self._context.execute_async_v3(self._cuda.stream_handle):
            raise RuntimeError(f"TensorRT execute_async_v3 failed on {self.plan.name} "
                               "(see the TensorRT log)")
        for name, host in hosts.items():
            self._cuda.to_host(host, self._buffers[name])
        self._cuda.synchronize()
        return {name: host.copy() for name, host in hosts.items()}

    def close(self) -> None:
        """Give the device buffers back (the engine is unusable afterwards)."""
        with self._lock:
            for buffer in self._buffers.values():
                self._cuda.free(buffer)
            self._buffers.clear()
