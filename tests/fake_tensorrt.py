"""A strict test double of the TensorRT 10 Python API, and a fake CUDA layer over host memory.

TensorRT cannot be installed on the machines these tests run on. The double has only the names
the TensorRT 10 API has (no binding indices, no ``execute_v2``, no ``max_workspace_size``:
touching one raises AttributeError), refuses to run with an input shape or address unset, and
executes a "plan" (a small header plus the ONNX bytes) with ONNX Runtime on the CPU, reading
and writing the fake device memory at the addresses given to ``set_tensor_address``. Copies and
executions are queued on their stream and happen at ``synchronize``, as on a GPU, so a missing
synchronisation shows up as wrong numbers. The builder records what it was asked for in
``module.builds``. Install with :func:`install` (``monkeypatch.setitem(sys.modules, ...)``).
"""

from __future__ import annotations

import enum
import hashlib
import json
import struct
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

import cadnode.runtime.cuda
from cadnode.runtime.cuda import DeviceInfo

VERSION = "10.9.0.34"
PLAN_MAGIC = b"FAKETRT\0"
TIMING_MAGIC = b"FAKETIMING\n"
CALIB_MAGIC = b"FAKECALIB\n"


class FakeDevice:
    """Device memory (host numpy arrays at made-up addresses) and streams of queued work."""

    def __init__(self, name: str, capability: tuple[int, int]) -> None:
        self.info = DeviceInfo(name, capability)
        self.memory: dict[int, np.ndarray] = {}
        self.allocations = 0
        self.streams: dict[int, list[Callable[[], None]]] = {}
        self._next = 0x7F00_0000_0000

    def alloc(self, nbytes: int) -> int:
        ptr = self._next
        self._next += (nbytes // 256 + 2) * 256
        self.memory[ptr] = np.zeros(nbytes, dtype=np.uint8)
        self.allocations += 1
        return ptr

    def free(self, ptr: int) -> None:
        if ptr not in self.memory:
            raise RuntimeError(f"cudaFree of an address never allocated: {ptr:#x}")
        del self.memory[ptr]

    def view(self, ptr: int, nbytes: int) -> np.ndarray:
        """The ``nbytes`` of device memory at ``ptr`` (one allocation must hold them all)."""
        for base, block in self.memory.items():
            if base <= ptr and ptr + nbytes <= base + block.nbytes:
                return block[ptr - base:ptr - base + nbytes]
        raise RuntimeError(f"illegal memory access: {nbytes} bytes at {ptr:#x}")

    def new_stream(self) -> int:
        handle = 0x5000 + len(self.streams) + 1
        self.streams[handle] = []
        return handle

    def enqueue(self, handle: int, work: Callable[[], None]) -> None:
        if handle not in self.streams:
            raise RuntimeError(f"invalid stream handle {handle!r}")
        self.streams[handle].append(work)

    def synchronize(self, handle: int) -> None:
        queue = self.streams[handle]
        while queue:
            queue.pop(0)()


@dataclass
class FakeBuffer:
    ptr: int
    nbytes: int


class FakeCuda:
    """cadnode.runtime.cuda.CudaLayer over a FakeDevice."""

    library = "fake-cuda"

    def __init__(self, device: FakeDevice) -> None:
        self.device = device
        self.stream_handle = device.new_stream()

    def device_info(self) -> DeviceInfo:
        return self.device.info

    def allocate(self, nbytes: int) -> FakeBuffer:
        return FakeBuffer(self.device.alloc(int(nbytes)), int(nbytes))

    def _check(self, host: np.ndarray, buffer: Any) -> int:
        if not host.flags.c_contiguous or host.nbytes > buffer.nbytes:
            raise ValueError("host array not contiguous or larger than the device buffer")
        return int(host.nbytes)

    def to_device(self, buffer: Any, host: np.ndarray) -> None:
        n = self._check(host, buffer)
        source = host  # read at synchronize, as an asynchronous copy does

        def copy() -> None:
            self.device.view(buffer.ptr, n)[:] = source.reshape(-1).view(np.uint8)

        self.device.enqueue(self.stream_handle, copy)

    def to_host(self, host: np.ndarray, buffer: Any) -> None:
        n = self._check(host, buffer)

        def copy() -> None:
            host.reshape(-1).view(np.uint8)[:] = self.device.view(buffer.ptr, n)

        self.device.enqueue(self.stream_handle, copy)

    def synchronize(self) -> None:
        self.device.synchronize(self.stream_handle)

    def free(self, buffer: Any) -> None:
        self.device.free(buffer.ptr)


def _onnx_io(session: ort.InferenceSession) -> tuple[dict[str, Any], dict[str, Any]]:
    """name -> (shape with -1 for symbolic dimensions, dtype name) of inputs and outputs."""
    types_ = {"tensor(float)": "FLOAT", "tensor(int64)": "INT64", "tensor(int32)": "INT32"}

    def one(arg: Any) -> tuple[tuple[int, ...], str]:
        shape = tuple(d if isinstance(d, int) else -1 for d in arg.shape)
        return shape, types_[arg.type]

    return ({a.name: one(a) for a in session.get_inputs()},
            {a.name: one(a) for a in session.get_outputs()})


def make_tensorrt(device: FakeDevice, version: str = VERSION) -> types.ModuleType:
    """A fresh fake ``tensorrt`` module whose engines run on ``device``."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version  # type: ignore[attr-defined]
    builds: list[dict[str, Any]] = []
    trt.builds = builds  # type: ignore[attr-defined]

    class DataType(enum.Enum):
        FLOAT = 0
        HALF = 1
        INT8 = 2
        INT32 = 3
        BOOL = 4
        BF16 = 7
        INT64 = 8

    numpy_types = {DataType.FLOAT: np.float32, DataType.HALF: np.float16,
                   DataType.INT8: np.int8, DataType.INT32: np.int32, DataType.BOOL: np.bool_,
                   DataType.INT64: np.int64}

    def nptype(trt_type: DataType) -> type:
        return numpy_types[trt_type]

    class TensorIOMode(enum.Enum):
        NONE = 0
        INPUT = 1
        OUTPUT = 2

    class MemoryPoolType(enum.Enum):
        WORKSPACE = 0
        DLA_MANAGED_SRAM = 1
        DLA_LOCAL_DRAM = 2
        DLA_GLOBAL_DRAM = 3
        TACTIC_DRAM = 4

    class BuilderFlag(enum.Enum):
        FP16 = 0
        INT8 = 1
        DEBUG = 2
        GPU_FALLBACK = 3
        REFIT = 4
        OBEY_PRECISION_CONSTRAINTS = 9
        BF16 = 17
        FP8 = 12

    class NetworkDefinitionCreationFlag(enum.Enum):
        EXPLICIT_BATCH = 0  # deprecated and ignored in TensorRT 10
        STRONGLY_TYPED = 1

    class Logger:
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

        def __init__(self, min_severity: int = 2) -> None:
            self.min_severity = min_severity

    def _logger(logger: Any) -> None:
        if not isinstance(logger, Logger):
            raise TypeError("a tensorrt.ILogger is required")

    class IInt8Calibrator:
        def __init__(self) -> None:
            self._base_initialised = True

    class IInt8EntropyCalibrator2(IInt8Calibrator):
        pass

    @dataclass
    class ITensor:
        name: str
        shape: tuple[int, ...]
        dtype: DataType

    class INetworkDefinition:
        def __init__(self, flags: int) -> None:
            self.flags = flags
            self._inputs: list[ITensor] = []
            self._outputs: list[ITensor] = []
            self.onnx: bytes = b""

        @property
        def num_inputs(self) -> int:
            return len(self._inputs)

        @property
        def num_outputs(self) -> int:
            return len(self._outputs)

        def get_input(self, index: int) -> ITensor:
            return self._inputs[index]

        def get_output(self, index: int) -> ITensor:
            return self._outputs[index]

    class ParserError:
        def __init__(self, text: str) -> None:
            self.text = text

        def desc(self) -> str:
            return self.text

        def __str__(self) -> str:
            return self.text

    class OnnxParser:
        def __init__(self, network: INetworkDefinition, logger: Logger) -> None:
            _logger(logger)
            self.network = network
            self._errors: list[ParserError] = []

        @property
        def num_errors(self) -> int:
            return len(self._errors)

        def get_error(self, index: int) -> ParserError:
            return self._errors[index]

        def parse(self, model: bytes, path: str | None = None) -> bool:
            if not isinstance(model, bytes | bytearray | memoryview):
                raise TypeError("OnnxParser.parse takes the model's bytes")
            if path is not None:  # as the real parser: external weights are read beside path
                import onnx

                proto = onnx.load_from_string(bytes(model))
                onnx.load_external_data_for_model(proto, str(Path(path).parent))
                model = proto.SerializeToString()
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            try:
                session = ort.InferenceSession(bytes(model), sess_options=opts,
                                               providers=["CPUExecutionProvider"])
            except Exception as exc:  # the real parser reports, it does not raise
                self._errors.append(ParserError(f"ModelImporter: {exc}"))
                return False
            ins, outs = _onnx_io(session)
            self.network._inputs = [ITensor(n, s, DataType[t]) for n, (s, t) in ins.items()]
            self.network._outputs = [ITensor(n, s, DataType[t]) for n, (s, t) in outs.items()]
            self.network.onnx = bytes(model)
            return True

    class IOptimizationProfile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

        def set_shape(self, input: str, min: Any, opt: Any, max: Any) -> None:  # noqa: A002
            shapes = tuple(tuple(int(d) for d in s) for s in (min, opt, max))
            if len({len(s) for s in shapes}) != 1 or not all(
                    a <= b <= c for a, b, c in zip(*shapes, strict=True)):
                raise ValueError(f"profile for {input}: need min <= opt <= max, got {shapes}")
            self.shapes[input] = shapes

        def get_shape(self, input: str) -> list[tuple[int, ...]]:  # noqa: A002
            return list(self.shapes[input])

    class ITimingCache:
        def __init__(self, version: str, entries: list[str]) -> None:
            self.version = version
            self.entries = entries

        def serialize(self) -> memoryview:
            body = json.dumps({"version": self.version, "entries": self.entries})
            return memoryview(TIMING_MAGIC + body.encode())

    class IBuilderConfig:
        __slots__ = ("pools", "flags_set", "profiles", "calibration_profile", "_calibrator",
                     "timing_cache")

        def __init__(self) -> None:
            self.pools: dict[Any, int] = {}
            self.flags_set: set[Any] = set()
            self.profiles: list[IOptimizationProfile] = []
            self.calibration_profile: IOptimizationProfile | None = None
            self._calibrator: Any = None
            self.timing_cache: ITimingCache | None = None

        def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None:
            if not isinstance(pool, MemoryPoolType) or int(pool_size) < 0:
                raise TypeError("set_memory_pool_limit(MemoryPoolType, int)")
            self.pools[pool] = int(pool_size)

        def get_memory_pool_limit(self, pool: MemoryPoolType) -> int:
            return self.pools[pool]

        def set_flag(self, flag: BuilderFlag) -> None:
            if not isinstance(flag, BuilderFlag):
                raise TypeError("set_flag takes a tensorrt.BuilderFlag")
            self.flags_set.add(flag)

        def get_flag(self, flag: BuilderFlag) -> bool:
            return flag in self.flags_set

        def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def set_calibration_profile(self, profile: IOptimizationProfile) -> bool:
            self.calibration_profile = profile
            return True

        @property
        def int8_calibrator(self) -> Any:
            return self._calibrator

        @int8_calibrator.setter
        def int8_calibrator(self, calibrator: Any) -> None:
            if not isinstance(calibrator, IInt8Calibrator):
                raise TypeError("int8_calibrator must be a tensorrt.IInt8Calibrator")
            self._calibrator = calibrator

        def create_timing_cache(self, serialized_timing_cache: bytes) -> ITimingCache:
            blob = bytes(serialized_timing_cache)
            if not blob:
                return ITimingCache(version, [])
            if not blob.startswith(TIMING_MAGIC):
                raise ValueError("not a timing cache")
            data = json.loads(blob[len(TIMING_MAGIC):])
            return ITimingCache(data["version"], list(data["entries"]))

        def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
            if cache.version != version and not ignore_mismatch:
                return False
            self.timing_cache = cache
            return True

        def get_timing_cache(self) -> ITimingCache | None:
            return self.timing_cache

    def _calibrate(config: IBuilderConfig, network: INetworkDefinition) -> dict[str, Any]:
        calibrator = config.int8_calibrator
        if calibrator is None or not getattr(calibrator, "_base_initialised", False):
            raise RuntimeError("INT8 without calibration needs a calibrator (whose __init__ "
                               "calls the base class __init__)")
        record: dict[str, Any] = {"cache_read": False, "batches": []}
        cache = calibrator.read_calibration_cache()
        if cache:
            if not bytes(cache).startswith(CALIB_MAGIC):
                raise RuntimeError("calibration cache is not one this TensorRT wrote")
            record["cache_read"] = True
            return record
        profile = config.calibration_profile or config.profiles[0]
        batch = int(calibrator.get_batch_size())
        names = [t.name for t in network._inputs]
        while True:
            pointers = calibrator.get_batch(names)
            if pointers is None:
                break
            arrays = {}
            for tensor, ptr in zip(network._inputs, pointers, strict=True):
                shape = profile.shapes[tensor.name][1]
                if shape[0] != batch:
                    raise RuntimeError(f"calibration profile has {shape[0]} views, the "
                                       f"calibrator's batch size is {batch}")
                dtype = np.dtype(nptype(tensor.dtype))
                nbytes = int(np.prod(shape)) * dtype.itemsize
                arrays[tensor.name] = device.view(int(ptr), nbytes).view(dtype).reshape(
                    shape).copy()
            record["batches"].append(arrays)
        if not record["batches"]:
            raise RuntimeError("calibrator gave no batch")
        calibrator.write_calibration_cache(memoryview(CALIB_MAGIC + b"ranges"))
        return record

    class Builder:
        def __init__(self, logger: Logger) -> None:
            _logger(logger)

        def create_network(self, flags: int = 0) -> INetworkDefinition:
            if not isinstance(flags, int) or flags & ~0b11:
                raise TypeError("create_network takes NetworkDefinitionCreationFlag bits")
            return INetworkDefinition(flags)

        def create_builder_config(self) -> IBuilderConfig:
            return IBuilderConfig()

        def create_optimization_profile(self) -> IOptimizationProfile:
            return IOptimizationProfile()

        def build_serialized_network(self, network: INetworkDefinition,
                                     config: IBuilderConfig) -> memoryview | None:
            if not network.onnx or not config.profiles:
                return None
            for tensor in network._inputs:
                for profile in config.profiles:
                    if tensor.name not in profile.shapes:
                        raise RuntimeError(f"profile lacks dynamic input {tensor.name}")
                    for shape in profile.shapes[tensor.name]:
                        if len(shape) != len(tensor.shape) or any(
                                d not in (-1, s) for d, s in zip(tensor.shape, shape,
                                                                 strict=True)):
                            raise RuntimeError(f"profile shape {shape} does not fit "
                                               f"{tensor.name} {tensor.shape}")
            flags = sorted(f.name for f in config.flags_set)
            record: dict[str, Any] = {
                "network_flags": network.flags, "flags": flags,
                "workspace": config.pools.get(MemoryPoolType.WORKSPACE),
                "profiles": [dict(p.shapes) for p in config.profiles],
                "calibration_profile": (dict(config.calibration_profile.shapes)
                                        if config.calibration_profile else None),
                "calibration": None, "timing_cache_hit": None}
            if BuilderFlag.INT8 in config.flags_set:
                record["calibration"] = _calibrate(config, network)
            if config.timing_cache is not None:
                entry = hashlib.sha256(network.onnx + ",".join(flags).encode()).hexdigest()
                record["timing_cache_hit"] = entry in config.timing_cache.entries
                if not record["timing_cache_hit"]:
                    config.timing_cache.entries.append(entry)
            builds.append(record)
            header = json.dumps({
                "version": version, "flags": flags,
                "profile": {n: [list(s) for s in shapes]
                            for n, shapes in config.profiles[0].shapes.items()}}).encode()
            return memoryview(PLAN_MAGIC + struct.pack("<I", len(header)) + header
                              + network.onnx)

    class IExecutionContext:
        def __init__(self, engine: ICudaEngine) -> None:
            self.engine = engine
            self._shapes: dict[str, tuple[int, ...]] = {}
            self._addresses: dict[str, int] = {}

        def set_input_shape(self, name: str, shape: Any) -> bool:
            if self.engine.get_tensor_mode(name) != TensorIOMode.INPUT:
                raise RuntimeError(f"{name} is not an input tensor")
            shape = tuple(int(d) for d in shape)
            low, _, high = self.engine.get_tensor_profile_shape(name, 0)
            if len(shape) != len(low) or not all(
                    a <= s <= b for a, s, b in zip(low, shape, high, strict=True)):
                return False  # the real API logs an error and returns False
            self._shapes[name] = shape
            return True

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            if name in self.engine._inputs:
                return self._shapes.get(name, self.engine.get_tensor_shape(name))
            if set(self._shapes) != set(self.engine._inputs):
                return self.engine.get_tensor_shape(name)
            batch = self._shapes["image"][0]
            return tuple(batch if d == -1 else d for d in self.engine.get_tensor_shape(name))

        def set_tensor_address(self, name: str, memory: int) -> bool:
            if name not in self.engine._io or not isinstance(memory, int):
                raise TypeError(f"set_tensor_address({name!r}, int)")
            self._addresses[name] = memory
            return True

        def get_tensor_address(self, name: str) -> int:
            return self._addresses[name]

        def execute_async_v3(self, stream_handle: int) -> bool:
            if not isinstance(stream_handle, int):
                raise TypeError("execute_async_v3 takes the stream handle as an int")
            unset = [n for n in self.engine._inputs if n not in self._shapes]
            if unset:
                raise RuntimeError(f"input shape(s) not set: {unset}")
            no_address = [n for n in self.engine._io if n not in self._addresses]
            if no_address:
                raise RuntimeError(f"tensor address(es) not set: {no_address}")
            shapes = {n: self.get_tensor_shape(n) for n in self.engine._io}
            addresses = dict(self._addresses)

            def run() -> None:
                feeds = {}
                for name in self.engine._inputs:
                    dtype = np.dtype(nptype(self.engine.get_tensor_dtype(name)))
                    nbytes = int(np.prod(shapes[name])) * dtype.itemsize
                    feeds[name] = device.view(addresses[name], nbytes).view(dtype).reshape(
                        shapes[name]).copy()
                names = list(self.engine._outputs)
                for name, value in zip(names, self.engine.session.run(names, feeds),
                                       strict=True):
                    value = np.ascontiguousarray(value, dtype=np.float32)
                    if value.shape != shapes[name]:
                        raise RuntimeError(f"output {name}: {value.shape} != {shapes[name]}")
                    device.view(addresses[name], value.nbytes)[:] = value.reshape(-1).view(
                        np.uint8)
                self.engine.executions += 1

            device.enqueue(stream_handle, run)
            return True

    class ICudaEngine:
        def __init__(self, header: dict[str, Any], onnx: bytes) -> None:
            from cadnode.runtime.onnx import session_options

            self.session = ort.InferenceSession(onnx, sess_options=session_options(1),
                                                providers=["CPUExecutionProvider"])
            ins, outs = _onnx_io(self.session)
            self._inputs, self._outputs = ins, outs
            self._io = {**ins, **outs}
            self._profile = {n: [tuple(s) for s in v] for n, v in header["profile"].items()}
            self.executions = 0

        @property
        def num_io_tensors(self) -> int:
            return len(self._io)

        @property
        def num_optimization_profiles(self) -> int:
            return 1

        def get_tensor_name(self, index: int) -> str:
            return list(self._io)[index]

        def get_tensor_mode(self, name: str) -> TensorIOMode:
            if name not in self._io:
                return TensorIOMode.NONE
            return TensorIOMode.INPUT if name in self._inputs else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name: str) -> DataType:
            return DataType[self._io[name][1]]

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return self._io[name][0]

        def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[Any]:
            if profile_index != 0 or name not in self._inputs:
                raise RuntimeError(f"no profile shape for {name!r} in profile {profile_index}")
            return list(self._profile[name])

        def create_execution_context(self) -> IExecutionContext:
            return IExecutionContext(self)

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            _logger(logger)

        def deserialize_cuda_engine(self, serialized_engine: bytes) -> ICudaEngine | None:
            blob = bytes(serialized_engine)
            if not blob.startswith(PLAN_MAGIC):
                return None
            (size,) = struct.unpack_from("<I", blob, len(PLAN_MAGIC))
            start = len(PLAN_MAGIC) + 4
            header = json.loads(blob[start:start + size])
            if header["version"] != version:  # the real runtime logs and returns None
                return None
            return ICudaEngine(header, blob[start + size:])

    for name, value in list(locals().items()):
        if name[0].isupper() or name == "nptype":
            setattr(trt, name, value)
    for alias, member in (("float32", DataType.FLOAT), ("float16", DataType.HALF),
                          ("int8", DataType.INT8), ("int32", DataType.INT32),
                          ("int64", DataType.INT64), ("bool", DataType.BOOL),
                          ("bfloat16", DataType.BF16)):
        setattr(trt, alias, member)
    return trt


@dataclass
class Double:
    """One installed double: the fake module, its device, and every CUDA layer opened on it."""

    trt: Any
    device: FakeDevice
    layers: list[FakeCuda] = field(default_factory=list)


def install(monkeypatch: pytest.MonkeyPatch, *, gpu: str = "NVIDIA H200",
            capability: tuple[int, int] = (9, 0), version: str = VERSION) -> Double:
    """Make ``import tensorrt`` and ``cadnode.runtime.cuda.open_cuda`` give the double."""
    device = FakeDevice(gpu, capability)
    double = Double(make_tensorrt(device, version), device)

    def open_cuda() -> FakeCuda:
        layer = FakeCuda(device)
        double.layers.append(layer)
        return layer

    monkeypatch.setitem(sys.modules, "tensorrt", double.trt)
    monkeypatch.setattr(cadnode.runtime.cuda, "open_cuda", open_cuda)
    return double
