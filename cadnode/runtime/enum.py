"""The inference backends and numeric precisions: the one list of each that ``CADNODE_BACKEND``
and ``CADNODE_PRECISION`` take (cheap to import: config and the CLI read them without loading
any engine)."""

from __future__ import annotations

from enum import StrEnum


class Backend(StrEnum):
    """An engine that runs a model package (docs/architecture.md, "cadnode.runtime")."""

    ONNXRUNTIME = "onnxruntime"  # CPU; CUDA / TensorRT execution providers with onnxruntime-gpu
    TENSORRT = "tensorrt"  # a TensorRT engine built from the package's ONNX for this GPU
    TORCH = "torch"  # the reference: the package's torch.export program (model.pt2)
    TRITON = "triton"  # a Triton / KServe-v2 inference server holding the package's model
    AUTO = "auto"  # the best of the above this machine can run, and why, in the log


class Precision(StrEnum):
    """Arithmetic an engine computes in; not every backend offers every one."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"


#: What each backend can compute in, its default first (``CADNODE_PRECISION`` empty: default).
PRECISIONS: dict[Backend, tuple[Precision, ...]] = {
    Backend.ONNXRUNTIME: (Precision.FP32, Precision.INT8),
    Backend.TENSORRT: (Precision.FP16, Precision.FP32, Precision.BF16, Precision.INT8),
    Backend.TORCH: (Precision.FP32, Precision.FP16, Precision.BF16),
    Backend.TRITON: (Precision.FP32,),  # whatever the server's model computes in
    Backend.AUTO: (Precision.FP32,),
}

#: ``CADNODE_DEVICE`` values: "auto" (a GPU when one can run, else the CPU), "cpu", "gpu"
#: (refuse to start without one).
DEVICES: tuple[str, ...] = ("auto", "cpu", "gpu")


class BackendUnavailable(RuntimeError):
    """The chosen backend cannot run here; the message says exactly what is missing."""


def precision_for(backend: Backend, precision: str) -> Precision:
    """``precision`` ("" for the backend's default) checked against what ``backend`` offers."""
    offered = PRECISIONS[backend]
    if not precision:
        return offered[0]
    if precision not in [p.value for p in offered]:
        raise ValueError(f"backend {backend.value} computes in "
                         f"{', '.join(p.value for p in offered)}, not {precision!r}")
    return Precision(precision)
