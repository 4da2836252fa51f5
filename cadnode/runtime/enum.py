"""The inference backends: the one list ``CADNODE_BACKEND`` takes (cheap to import: config and
the CLI read it without loading any engine)."""

from __future__ import annotations

from enum import StrEnum


class Backend(StrEnum):
    """An engine that runs a model package (docs/architecture.md, "cadnode.runtime")."""

    ONNXRUNTIME = "onnxruntime"  # CPU; CUDA / TensorRT execution providers with onnxruntime-gpu
    AUTO = "auto"  # the best of the above this machine can run, and why, in the log


#: ``CADNODE_DEVICE`` values: "auto" (a GPU when one can run, else the CPU), "cpu", "gpu"
#: (refuse to start without one).
DEVICES: tuple[str, ...] = ("auto", "cpu", "gpu")


class BackendUnavailable(RuntimeError):
    """The chosen backend cannot run here; the message says exactly what is missing."""
