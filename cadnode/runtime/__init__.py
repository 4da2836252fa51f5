"""Run a model package; one small interface, several engines. Never imports torch or cadnode.model.

A package is one folder holding ``model.onnx``, ``tokenizer.json`` and ``manifest.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cadnode.config import BACKENDS
from cadnode.runtime.manifest import ModelManifest, read_manifest
from cadnode.runtime.types import Engine, ViewOutputs

#: The demonstration package shipped with the node (untrained unless a release says otherwise).
DEFAULT_MODEL_PACKAGE: Path = Path(__file__).resolve().parent.parent / "models" / "demo"



def load_engine(package: str | Path = DEFAULT_MODEL_PACKAGE, backend: str = "onnxruntime",
                **options: Any) -> Engine:
    """Open a package with a backend; ``options`` go to the engine (e.g. intra_op_threads)."""
    if backend in ("onnxruntime", "onnx", "ort"):
        from cadnode.runtime.onnx import OnnxEngine

        return OnnxEngine(package, **options)
    raise ValueError(f"unknown runtime backend {backend!r}; available: {', '.join(BACKENDS)}")


__all__ = ["DEFAULT_MODEL_PACKAGE", "Engine", "ModelManifest", "ViewOutputs", "load_engine",
           "read_manifest"]
