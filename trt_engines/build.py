"""ONNX -> TensorRT plan for this GPU, cached under the node's home (``cadnode engine build``).

The network is parsed from the package's model.onnx with TensorRT's ONNX parser and built with
one optimisation profile: 1 to ``max_views`` views, tuned for ``opt_views`` (one screening exam
is four). The plan is written as :class:`cadnode.runtime.engine_cache.EngineKey` names it, with
a JSON sidecar recording the key, the build settings and the plan's sha256; a plan whose
sidecar disagrees with the key (another GPU, TensorRT version, ONNX file...) is rebuilt, never
used. The timing cache (``<home>/engines/timing.cache``) is read before and written after each
build, so later builds on the same GPU skip most kernel timing. Written against the documented
TensorRT 10 Python API; see trt_engines/README.md for what has been executed.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from cadnode.runtime import cuda as cuda_layer
from cadnode.runtime.engine_cache import (
    SIDECAR_FORMAT,
    TIMING_CACHE_NAME,
    EngineKey,
    check_precision,
    engines_dir,
    sidecar_problem,
    write_atomically,
)
from cadnode.runtime.manifest import ModelManifest, read_manifest, sha256
from cadnode.runtime.tensorrt import expected_io, import_tensorrt, trt_logger
from trt_engines.calibration import calibration_cache_path, calibration_files, entropy_calibrator

log = logging.getLogger(__name__)

#: Builder flags each precision sets (int8 keeps fp16 for the layers it does not quantise).
PRECISION_FLAGS: dict[str, tuple[str, ...]] = {
    "fp32": (), "fp16": ("FP16",), "bf16": ("BF16",), "int8": ("INT8", "FP16")}


def _parse(trt: Any, builder: Any, manifest: ModelManifest) -> tuple[Any, Any]:
    """The package's ONNX graph as a TensorRT network (ValueError with the parser's errors)."""
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, trt_logger(trt))
    # the path lets the parser find external weights (a frozen text tower) beside the graph
    if not parser.parse(manifest.model_path.read_bytes(), str(manifest.model_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(f"TensorRT cannot parse {manifest.model_path}: {errors}")
    return network, parser


def _profile(builder: Any, network: Any, manifest: ModelManifest,
             sizes: tuple[int, int, int]) -> Any:
    """An optimisation profile giving every network input ``sizes`` (min, opt, max) views."""
    expected = expected_io(manifest)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.name not in expected:
            raise ValueError(f"{manifest.model_path}: unknown graph input {tensor.name}")
        per_view = expected[tensor.name][1]
        dims = tuple(tensor.shape)[1:]
        if len(dims) != len(per_view) or any(d not in (-1, e) for d, e in zip(dims, per_view,
                                                                             strict=True)):
            raise ValueError(f"{manifest.model_path}: input {tensor.name} has dims {dims}, the "
                             f"manifest says {per_view}")
        low, opt, high = ((n, *per_view) for n in sizes)
        profile.set_shape(tensor.name, low, opt, high)
    return profile


def build_engine(package: str | Path | ModelManifest, *, home: Path, precision: str = "fp16",
                 max_views: int = 8, opt_views: int = 4, workspace_mb: int = 4096,
                 calibration: Path | None = None, timing_cache: Path | None = None) -> Path:
    """Build (or find, when its sidecar matches) the plan of ``package`` for this GPU and
    TensorRT; returns its path. ``calibration``: a folder of DICOM images, needed for int8."""
    manifest = package if isinstance(package, ModelManifest) else read_manifest(package)
    check_precision(precision)
    if precision == "int8" and calibration is None:
        raise ValueError("int8 needs calibration images: --calibration DIR (a folder of the "
                         "site's own DICOM mammograms)")
    if not 1 <= opt_views <= max_views:
        raise ValueError(f"opt views {opt_views} must be between 1 and max views {max_views}")
    if workspace_mb < 1:
        raise ValueError("workspace must be at least 1 MB")
    trt = import_tensorrt()
    cuda = cuda_layer.open_cuda()
    key = EngineKey.for_package(manifest, trt.__version__, cuda.device_info(), precision,
                                max_views)
    plan = key.plan_path(home)
    problem = sidecar_problem(key, home)
    if problem is None:
        log.info("engine %s is up to date", plan)
        return plan
    if plan.is_file():
        log.warning("rebuilding: %s", problem)

    builder = trt.Builder(trt_logger(trt))
    network, _parser = _parse(trt, builder, manifest)  # the parser must outlive the build
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    for flag in PRECISION_FLAGS[precision]:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    config.add_optimization_profile(_profile(builder, network, manifest,
                                             (1, opt_views, max_views)))
    cache_file = Path(timing_cache) if timing_cache else engines_dir(home) / TIMING_CACHE_NAME
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise RuntimeError(f"TensorRT refused the timing cache {cache_file} (delete it)")

    calibrator = None
    settings: dict[str, Any] = {"opt_views": opt_views, "workspace_mb": workspace_mb,
                                "flags": list(PRECISION_FLAGS[precision]),
                                "timing_cache": str(cache_file)}
    if precision == "int8":
        assert calibration is not None
        files = calibration_files(calibration)
        batch = min(opt_views, len(files))
        calib_cache = calibration_cache_path(key, home, files, batch)
        calibrator = entropy_calibrator(trt, cuda, manifest, files, calib_cache, batch)
        config.int8_calibrator = calibrator
        config.set_calibration_profile(_profile(builder, network, manifest, (batch,) * 3))
        settings.update(calibration=str(calibration), calibration_files=len(files),
                        calibration_cache=str(calib_cache))

    started = time.monotonic()
    try:
        serialized = builder.build_serialized_network(network, config)
    finally:
        if calibrator is not None:
            calibrator.close()
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build {manifest.model_path} for "
                           f"{key.describe()} (see the TensorRT log above)")
    write_atomically(plan, memoryview(serialized))
    write_atomically(cache_file, memoryview(config.get_timing_cache().serialize()))
    settings["build_seconds"] = round(time.monotonic() - started, 1)
    sidecar = {"format": SIDECAR_FORMAT, "key": key.to_json(), "plan_sha256": sha256(plan),
               "package": str(manifest.package), "model_version": manifest.version,
               "settings": settings}
    write_atomically(key.sidecar_path(home), json.dumps(sidecar, indent=2).encode())
    log.info("built %s in %.1f s", plan, settings["build_seconds"])
    return plan
