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

from cadnode.runtime.enum import Backend, BackendUnavailable
from cadnode.runtime.manifest import ModelManifest, read_manifest
from cadnode.runtime.types import Engine, ViewOutputs

log = logging.getLogger(__name__)

#: The demonstration package shipped with the node (untrained unless a release says otherwise).
DEFAULT_MODEL_PACKAGE: Path = Path(__file__).resolve().parent.parent / "models" / "demo"


def load_engine(package: str | Path = DEFAULT_MODEL_PACKAGE, backend: str = "onnxruntime",
                **options: Any) -> Engine:
    """Open a package with a backend; ``options`` go to the engine (e.g. intra_op_threads)."""
    try:
        chosen = Backend(backend)
    except ValueError:
        raise ValueError(f"unknown runtime backend {backend!r}; available: "
                         f"{', '.join(b.value for b in Backend)}") from None
    from cadnode.runtime.onnx import OnnxEngine, gpu_providers

    if chosen is Backend.AUTO:
        gpu = gpu_providers()
        why = (f"ONNX Runtime with {', '.join(gpu)}" if gpu else
               "ONNX Runtime on the CPU (no GPU execution provider: onnxruntime-gpu and an "
               "NVIDIA GPU are needed for CUDA)")
        log.info("backend auto: %s", why)
        return OnnxEngine(package, device="gpu" if gpu else "cpu", **options)
    return OnnxEngine(package, **options)


__all__ = ["DEFAULT_MODEL_PACKAGE", "Backend", "BackendUnavailable", "Engine", "ModelManifest",
           "ViewOutputs", "load_engine", "read_manifest"]
