"""Run a model package; one small interface, several engines. Never imports torch or cadnode.model.

A package is one folder holding ``model.onnx``, ``tokenizer.json`` and ``manifest.json``.
``load_engine(package, backend)`` opens it with one of :class:`Backend`; a backend that cannot
run here raises :class:`BackendUnavailable` saying what is missing, so that ``cadnode serve``
refuses to start instead of failing every study later.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cadnode.runtime.enum import DEVICES, Backend, BackendUnavailable
from cadnode.runtime.manifest import ModelManifest, read_manifest
from cadnode.runtime.types import Engine, ViewOutputs

log = logging.getLogger(__name__)

#: The demonstration package shipped with the node (untrained unless a release says otherwise).
DEFAULT_MODEL_PACKAGE: Path = Path(__file__).resolve().parent.parent / "models" / "demo"


def load_engine(package: str | Path = DEFAULT_MODEL_PACKAGE, backend: str = "onnxruntime",
                *, device: str = "auto", **options: Any) -> Engine:
    """Open a package with a backend on ``device`` (one of DEVICES); ``options`` go to the
    engine (e.g. intra_op_threads)."""
    try:
        chosen = Backend(backend)
    except ValueError:
        raise ValueError(f"unknown runtime backend {backend!r}; available: "
                         f"{', '.join(b.value for b in Backend)}") from None
    from cadnode.runtime.onnx import OnnxEngine, gpu_providers

    if chosen is Backend.AUTO:
        log.info("backend auto: %s", _auto_reason(device, gpu_providers()))
    return OnnxEngine(package, device=device, **options)


def _auto_reason(device: str, gpu: list[str]) -> str:
    """What ``auto`` takes on this machine, and why (one log line)."""
    if device == "cpu":
        return "ONNX Runtime on the CPU (CADNODE_DEVICE=cpu)"
    if gpu:
        return f"ONNX Runtime with {', '.join(gpu)}"
    return ("ONNX Runtime on the CPU (no GPU execution provider: onnxruntime-gpu and an "
            "NVIDIA GPU are needed for CUDA)")


__all__ = ["DEFAULT_MODEL_PACKAGE", "DEVICES", "Backend", "BackendUnavailable", "Engine",
           "ModelManifest", "ViewOutputs", "load_engine", "read_manifest"]
