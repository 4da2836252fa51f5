"""Run a model package; one small interface, several engines. Never imports cadnode.model.

A package is one folder holding ``model.onnx``, ``tokenizer.json`` and ``manifest.json`` (and
``model.pt2`` for the torch backend). ``load_engine(package, backend)`` opens it with one of
:class:`Backend`; a backend that cannot run here raises :class:`BackendUnavailable` saying what
is missing, so that ``cadnode serve`` refuses to start instead of failing every study later.
Each engine module is imported only when chosen: serving on ONNX Runtime needs no torch, no
TensorRT and no Triton client.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from cadnode.runtime.enum import (
    DEVICES,
    PRECISIONS,
    Backend,
    BackendUnavailable,
    Precision,
    precision_for,
)
from cadnode.runtime.manifest import ModelManifest, read_manifest
from cadnode.runtime.types import Engine, ViewOutputs

log = logging.getLogger(__name__)

#: The demonstration package shipped with the node (untrained unless a release says otherwise).
DEFAULT_MODEL_PACKAGE: Path = Path(__file__).resolve().parent.parent / "models" / "demo"

#: The options each backend takes; the others are ignored, so one set of options (from the
#: settings) can be given whatever the backend.
OPTIONS: dict[Backend, tuple[str, ...]] = {
    Backend.ONNXRUNTIME: ("intra_op_threads", "home", "verify_checksums"),
    Backend.TENSORRT: ("home", "max_views", "build_if_missing", "verify_checksums"),
    Backend.TORCH: ("compile_mode", "verify_checksums"),
    Backend.TRITON: ("url", "protocol", "model", "timeout_s", "verify_checksums"),
}


def load_engine(package: str | Path = DEFAULT_MODEL_PACKAGE, backend: str = "onnxruntime",
                *, device: str = "auto", precision: str = "", **options: Any) -> Engine:
    """Open a package with a backend on ``device`` (one of DEVICES) in ``precision`` ("" for
    the backend's default); ``options`` (see OPTIONS) go to the engine that takes them."""
    try:
        chosen = Backend(backend)
    except ValueError:
        raise ValueError(f"unknown runtime backend {backend!r}; available: "
                         f"{', '.join(b.value for b in Backend)}") from None
    known = {name for names in OPTIONS.values() for name in names}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown engine option(s): {', '.join(unknown)}")
    if device not in DEVICES:
        raise ValueError(f"device {device!r} is not one of {', '.join(DEVICES)}")
    if chosen is Backend.AUTO:
        return _auto(package, device, precision, options)
    return _open(chosen, package, device, precision, options)


def _open(backend: Backend, package: str | Path, device: str, precision: str,
          options: dict[str, Any]) -> Engine:
    mine = {k: v for k, v in options.items() if k in OPTIONS[backend]}
    wanted = precision_for(backend, precision).value
    if backend is Backend.ONNXRUNTIME:
        from cadnode.runtime.onnx import OnnxEngine

        return OnnxEngine(package, device=device, precision=wanted, **mine)
    if backend is Backend.TENSORRT:
        if device == "cpu":
            raise BackendUnavailable("TensorRT runs only on an NVIDIA GPU, and "
                                     "CADNODE_DEVICE=cpu")
        from cadnode.runtime.tensorrt import TensorRTEngine

        return TensorRTEngine(package, precision=wanted, **mine)
    if backend is Backend.TORCH:
        from cadnode.runtime.torch_program import TorchEngine

        return TorchEngine(package, device=device, precision=wanted, **mine)
    from cadnode.runtime.triton import TritonEngine

    if "url" not in mine or not mine["url"]:
        raise BackendUnavailable("the triton backend needs the server's address "
                                 "(CADNODE_TRITON_URL, e.g. grpc://gpu-server:8001)")
    return TritonEngine(package, **mine)


def _auto(package: str | Path, device: str, precision: str,
          options: dict[str, Any]) -> Engine:
    """TensorRT when a GPU and TensorRT are here (building the engine if there is none yet),
    else ONNX Runtime (with CUDA when it can): the choice and the reasons go in the log."""
    passed_over: list[str] = []
    if device == "cpu":
        passed_over.append("TensorRT: CADNODE_DEVICE=cpu")
    elif importlib.util.find_spec("tensorrt") is None:
        passed_over.append("TensorRT: the tensorrt module is not installed")
    elif precision and precision not in PRECISIONS[Backend.TENSORRT]:
        passed_over.append(f"TensorRT: does not compute in {precision}")
    else:
        try:
            engine = _open(Backend.TENSORRT, package, device, precision,
                           {"build_if_missing": True, **options})
        except BackendUnavailable as exc:
            passed_over.append(f"TensorRT: {exc}")
        else:
            log.info("backend auto: %s", engine.providers[0])
            return engine
    engine = _open(Backend.ONNXRUNTIME, package, device, precision, options)
    if device != "cpu" and engine.providers == ["CPUExecutionProvider"]:
        passed_over.append("ONNX Runtime CUDA: no GPU execution provider (onnxruntime-gpu "
                           "and an NVIDIA GPU are needed)")
    log.info("backend auto: ONNX Runtime with %s (passed over %s)", ", ".join(engine.providers),
             "; ".join(passed_over))
    return engine


__all__ = ["DEFAULT_MODEL_PACKAGE", "DEVICES", "OPTIONS", "Backend", "BackendUnavailable",
           "Engine", "ModelManifest", "Precision", "ViewOutputs", "load_engine", "read_manifest"]
