"""Device memory and one stream for the TensorRT engine and its int8 calibrator.

TensorRT takes raw device addresses and a stream handle; it allocates nothing for its inputs and
outputs. This module is the one place that talks to CUDA for them, through cuda-python
(``cuda.bindings.runtime``, the CUDA runtime API; older releases name it ``cuda.cudart``) or,
when only torch is installed, through ``torch.cuda``. No hand-written ctypes: both libraries
find and load the driver themselves. :func:`open_cuda` raises :class:`BackendUnavailable` with
one line saying what is missing (a library or a GPU), so the node refuses to start.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from cadnode.runtime.enum import BackendUnavailable

NO_LIBRARY = ("no CUDA library for the TensorRT backend: pip install cuda-python "
              "(or torch with CUDA)")


@dataclass(frozen=True)
class DeviceInfo:
    """The GPU an engine is built for and runs on (TensorRT plans are specific to both)."""

    name: str  # e.g. "NVIDIA H200"
    capability: tuple[int, int]  # compute capability (major, minor), e.g. (9, 0)

    @property
    def sm(self) -> str:
        """Compute capability as CUDA writes it in architecture names, e.g. "90"."""
        return f"{self.capability[0]}{self.capability[1]}"

    @property
    def slug(self) -> str:
        """The GPU name, safe in a file name ("NVIDIA H200" -> "nvidia-h200")."""
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-") or "gpu"


class DeviceBuffer(Protocol):
    """Device memory of ``nbytes`` bytes at address ``ptr``."""

    ptr: int
    nbytes: int


class CudaLayer(Protocol):
    """What the TensorRT engine and calibrator need from CUDA: buffers, copies, one stream."""

    library: str  # "cuda-python" or "torch"
    stream_handle: int  # the cudaStream_t, as TensorRT's execute_async_v3 takes it

    def device_info(self) -> DeviceInfo: ...

    def allocate(self, nbytes: int) -> DeviceBuffer: ...

    def to_device(self, buffer: DeviceBuffer, host: np.ndarray) -> None:
        """Queue a copy of contiguous ``host`` into ``buffer`` on the stream; ``host`` must
        stay alive and unchanged until :meth:`synchronize`."""

    def to_host(self, host: np.ndarray, buffer: DeviceBuffer) -> None:
        """Queue a copy of the first ``host.nbytes`` of ``buffer`` into contiguous ``host``;
        read ``host`` only after :meth:`synchronize`."""

    def synchronize(self) -> None: ...

    def free(self, buffer: DeviceBuffer) -> None: ...


def _host_bytes(host: np.ndarray, buffer: DeviceBuffer) -> int:
    if not host.flags.c_contiguous:
        raise ValueError("host arrays copied to or from the device must be C-contiguous")
    if host.nbytes > buffer.nbytes:
        raise ValueError(f"{host.nbytes} bytes do not fit a device buffer of {buffer.nbytes}")
    return int(host.nbytes)


@dataclass
class _Allocation:
    ptr: int
    nbytes: int


def _cudart() -> Any:
    """The CUDA runtime module of cuda-python: ``cuda.bindings.runtime`` (cuda-python 12.6 and
    later) or ``cuda.cudart`` (earlier releases); None when cuda-python is not installed."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # type: ignore[no-redef]
        except ImportError:
            return None
    return runtime


class CudaPython:
    """The CUDA runtime API through cuda-python; every call's cudaError_t is checked."""

    library = "cuda-python"

    def __init__(self, runtime: Any) -> None:
        self._rt = runtime
        err, count = runtime.cudaGetDeviceCount()
        if err != runtime.cudaError_t.cudaSuccess or not count:
            reason = self._name(err) if err != runtime.cudaError_t.cudaSuccess else "0 devices"
            raise BackendUnavailable(f"no NVIDIA GPU usable by CUDA (cudaGetDeviceCount: "
                                     f"{reason}; is the NVIDIA driver installed and a GPU "
                                     "visible to this process?)")
        self._device = int(self._call("cudaGetDevice"))
        self._stream = self._call("cudaStreamCreate")
        self.stream_handle = int(self._stream)

    def _name(self, err: Any) -> str:
        _, name = self._rt.cudaGetErrorName(err)
        return name.decode() if isinstance(name, bytes) else str(name)

    def _call(self, function: str, *args: Any) -> Any:
        """``cudart.function(*args)``; RuntimeError naming the CUDA error unless cudaSuccess.
        cuda-python returns (error,) or (error, value)."""
        err, *values = getattr(self._rt, function)(*args)
        if err != self._rt.cudaError_t.cudaSuccess:
            raise RuntimeError(f"CUDA {function} failed: {self._name(err)}")
        return values[0] if values else None

    def device_info(self) -> DeviceInfo:
        prop = self._call("cudaGetDeviceProperties", self._device)
        name = prop.name.split(b"\0", 1)[0].decode() if isinstance(prop.name, bytes) \
            else str(prop.name)
        return DeviceInfo(name=name, capability=(int(prop.major), int(prop.minor)))

    def allocate(self, nbytes: int) -> DeviceBuffer:
        return _Allocation(ptr=int(self._call("cudaMalloc", int(nbytes))), nbytes=int(nbytes))

    def to_device(self, buffer: DeviceBuffer, host: np.ndarray) -> None:
        n = _host_bytes(host, buffer)
        self._call("cudaMemcpyAsync", buffer.ptr, host.ctypes.data, n,
                   self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream)

    def to_host(self, host: np.ndarray, buffer: DeviceBuffer) -> None:
        n = _host_bytes(host, buffer)
        self._call("cudaMemcpyAsync", host.ctypes.data, buffer.ptr, n,
                   self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream)

    def synchronize(self) -> None:
        self._call("cudaStreamSynchronize", self._stream)

    def free(self, buffer: DeviceBuffer) -> None:
        self._call("cudaFree", buffer.ptr)


@dataclass
class _TorchBuffer:
    tensor: Any  # torch.uint8 CUDA tensor owning the memory
    ptr: int
    nbytes: int


class TorchCuda:
    """``torch.cuda`` tensors as device buffers and one ``torch.cuda.Stream``."""

    library = "torch"

    def __init__(self, torch: Any) -> None:
        if not torch.cuda.is_available():
            raise BackendUnavailable("no NVIDIA GPU usable by CUDA (torch.cuda.is_available() "
                                     "is False; is the NVIDIA driver installed?)")
        self._torch = torch
        self._stream = torch.cuda.Stream()
        self.stream_handle = int(self._stream.cuda_stream)

    def device_info(self) -> DeviceInfo:
        cuda = self._torch.cuda
        major, minor = cuda.get_device_capability()
        return DeviceInfo(name=str(cuda.get_device_name()), capability=(int(major), int(minor)))

    def allocate(self, nbytes: int) -> DeviceBuffer:
        tensor = self._torch.empty(int(nbytes), dtype=self._torch.uint8, device="cuda")
        return _TorchBuffer(tensor=tensor, ptr=int(tensor.data_ptr()), nbytes=int(nbytes))

    def _bytes(self, host: np.ndarray) -> Any:
        return self._torch.from_numpy(host.reshape(-1).view(np.uint8))

    def to_device(self, buffer: DeviceBuffer, host: np.ndarray) -> None:
        n = _host_bytes(host, buffer)
        assert isinstance(buffer, _TorchBuffer)
        with self._torch.cuda.stream(self._stream):
            buffer.tensor[:n].copy_(self._bytes(host), non_blocking=True)

    def to_host(self, host: np.ndarray, buffer: DeviceBuffer) -> None:
        n = _host_bytes(host, buffer)
        assert isinstance(buffer, _TorchBuffer)
        with self._torch.cuda.stream(self._stream):
            self._bytes(host).copy_(buffer.tensor[:n], non_blocking=True)

    def synchronize(self) -> None:
        self._stream.synchronize()

    def free(self, buffer: DeviceBuffer) -> None:
        if isinstance(buffer, _TorchBuffer):
            buffer.tensor = None  # the caching allocator takes the memory back


def open_cuda() -> CudaLayer:
    """cuda-python when installed, else torch with CUDA; BackendUnavailable saying which is
    missing (a library, or a GPU and driver)."""
    runtime = _cudart()
    if runtime is not None:
        return CudaPython(runtime)
    try:
        import torch
    except ImportError:
        raise BackendUnavailable(NO_LIBRARY) from None
    return TorchCuda(torch)


def device_info() -> DeviceInfo:
    """Name and compute capability of the current GPU (BackendUnavailable when none)."""
    return open_cuda().device_info()
