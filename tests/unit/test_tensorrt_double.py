"""The TensorRT backend and engine builder, against the strict TensorRT 10 double
(tests/fake_tensorrt.py): TensorRT and CUDA themselves never run here."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cadnode.jobs.inputs import ModelInputs, file_inputs
from cadnode.runtime import DEFAULT_MODEL_PACKAGE, BackendUnavailable, read_manifest
from cadnode.runtime.engine_cache import EngineKey
from cadnode.runtime.manifest import sha256
from cadnode.runtime.onnx import OnnxEngine
from cadnode.runtime.tensorrt import TensorRTEngine
from cadnode.text.tokenizer import ClinicalTokenizer
from tests import fake_tensorrt
from tests.fake_tensorrt import Double, install
from trt_engines.build import build_engine
from trt_engines.calibration import calibration_files

PACKAGE = DEFAULT_MODEL_PACKAGE
MANIFEST = read_manifest(PACKAGE, verify_checksums=False)
H, W = MANIFEST.input_size
L = MANIFEST.max_text_len
VIEW_SHAPES = {"image": (1, H, W), "input_ids": (L,), "attention_mask": (L,)}


@pytest.fixture
def double(monkeypatch: pytest.MonkeyPatch) -> Double:
    return install(monkeypatch)


@pytest.fixture(scope="module")
def onnx_engine() -> OnnxEngine:
    return OnnxEngine(PACKAGE, intra_op_threads=1)


@pytest.fixture(scope="module")
def study_inputs(demo_study: list[Path]) -> ModelInputs:
    manifest = read_manifest(PACKAGE)
    return file_inputs(demo_study, manifest, ClinicalTokenizer.from_file(manifest.tokenizer_path))


def _sidecar(plan: Path) -> dict:
    return json.loads(plan.with_suffix(".json").read_text())


def test_build_with_tensorrt_double_sets_fp16_workspace_and_profile(double: Double,
                                                                     tmp_path: Path) -> None:
    plan = build_engine(PACKAGE, home=tmp_path, precision="fp16", max_views=8, opt_views=4,
                        workspace_mb=1024)
    (build,) = double.trt.builds
    assert build["flags"] == ["FP16"] and build["network_flags"] == 0
    assert build["workspace"] == 1024 << 20
    assert build["profiles"] == [{name: ((1, *s), (4, *s), (8, *s))
                                  for name, s in VIEW_SHAPES.items()}]
    assert build["calibration"] is None and build["calibration_profile"] is None
    assert plan.is_file() and _sidecar(plan)["plan_sha256"] == sha256(plan)
    assert _sidecar(plan)["settings"]["opt_views"] == 4


def test_engine_cache_name_with_double_has_every_key_field(double: Double,
                                                           tmp_path: Path) -> None:
    plan = build_engine(PACKAGE, home=tmp_path, precision="bf16", max_views=6)
    sha = sha256(read_manifest(PACKAGE).model_path)
    assert plan.parent == tmp_path / "engines"
    assert plan.name == (f"{MANIFEST.name}-{sha[:12]}-trt{fake_tensorrt.VERSION}-nvidia-h200"
                         "-sm90-bf16-v6.plan")
    assert double.trt.builds[-1]["flags"] == ["BF16"]
    key = EngineKey.from_json(_sidecar(plan)["key"])
    assert key == EngineKey(MANIFEST.name, sha, fake_tensorrt.VERSION, "NVIDIA H200",
                            (9, 0), "bf16", 6)


def test_timing_cache_with_double_written_then_reused(double: Double, tmp_path: Path) -> None:
    plan = build_engine(PACKAGE, home=tmp_path)
    cache = tmp_path / "engines" / "timing.cache"
    assert cache.is_file() and double.trt.builds[-1]["timing_cache_hit"] is False
    assert build_engine(PACKAGE, home=tmp_path) == plan and len(double.trt.builds) == 1
    plan.unlink()  # forces a rebuild, which finds its tactics in the cache
    build_engine(PACKAGE, home=tmp_path)
    assert double.trt.builds[-1]["timing_cache_hit"] is True
    elsewhere = tmp_path / "my.cache"
    build_engine(PACKAGE, home=tmp_path, precision="fp32", timing_cache=elsewhere)
    assert elsewhere.is_file() and double.trt.builds[-1]["flags"] == []


def test_mismatched_sidecar_with_double_is_refused_then_rebuilt(double: Double,
                                                               tmp_path: Path) -> None:
    plan = build_engine(PACKAGE, home=tmp_path)
    sidecar = _sidecar(plan)
    sidecar["key"].update(gpu_name="NVIDIA A100-SXM4-80GB", tensorrt_version="10.3.0.26")
    plan.with_suffix(".json").write_text(json.dumps(sidecar))
    with pytest.raises(BackendUnavailable) as refused:
        TensorRTEngine(PACKAGE, home=tmp_path)
    message = str(refused.value)
    for text in ("NVIDIA A100-SXM4-80GB", "NVIDIA H200", "10.3.0.26", fake_tensorrt.VERSION,
                 "cadnode engine build"):
        assert text in message
    assert build_engine(PACKAGE, home=tmp_path) == plan and len(double.trt.builds) == 2
    assert TensorRTEngine(PACKAGE, home=tmp_path).plan == plan


def test_replaced_plan_with_double_is_refused(double: Double, tmp_path: Path) -> None:
    plan = build_engine(PACKAGE, home=tmp_path)
    plan.write_bytes(plan.read_bytes() + b"x")
    with pytest.raises(BackendUnavailable, match="not the file its sidecar records"):
        TensorRTEngine(PACKAGE, home=tmp_path)


def test_engine_for_another_gpu_with_double_is_refused(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    install(monkeypatch, gpu="NVIDIA A100-SXM4-80GB", capability=(8, 0))
    build_engine(PACKAGE, home=tmp_path)
    install(monkeypatch)  # the same home on an H200
    with pytest.raises(BackendUnavailable) as refused:
        TensorRTEngine(PACKAGE, home=tmp_path)
    message = str(refused.value)
    assert "NVIDIA A100-SXM4-80GB (sm_80)" in message and "NVIDIA H200 (sm_90)" in message
    assert f"cadnode engine build --package {PACKAGE} --precision fp16" in message


def test_missing_engine_with_double_names_the_build_command(double: Double,
                                                            tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable) as refused:
        TensorRTEngine(PACKAGE, home=tmp_path, precision="int8", max_views=4)
    message = str(refused.value)
    assert "no TensorRT engine" in message
    assert (f"cadnode engine build --package {PACKAGE} --precision int8 --max-views 4 "
            "--calibration DICOM_DIR") in message


def test_plan_of_another_tensorrt_with_double_deserialises_to_none(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A plan filed under this TensorRT's key but built by another: the runtime says None."""
    install(monkeypatch, version="10.3.0.26")
    old = build_engine(PACKAGE, home=tmp_path)
    install(monkeypatch)
    key_here = EngineKey.from_json({**_sidecar(old)["key"],
                                    "tensorrt_version": fake_tensorrt.VERSION})
    shutil.copyfile(old, key_here.plan_path(tmp_path))
    sidecar = {**_sidecar(old), "key": key_here.to_json()}
    key_here.sidecar_path(tmp_path).write_text(json.dumps(sidecar))
    with pytest.raises(BackendUnavailable, match="could not deserialise"):
        TensorRTEngine(PACKAGE, home=tmp_path)


def test_no_tensorrt_module_with_double_cuda_is_unavailable(double: Double,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    for attempt in (lambda: TensorRTEngine(PACKAGE, home=tmp_path),
                    lambda: build_engine(PACKAGE, home=tmp_path)):
        with pytest.raises(BackendUnavailable, match="pip install tensorrt"):
            attempt()


def test_int8_without_calibration_with_double_is_refused(double: Double,
                                                        tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="int8 needs calibration images"):
        build_engine(PACKAGE, home=tmp_path, precision="int8")
    with pytest.raises(ValueError, match="precision must be one of"):
        build_engine(PACKAGE, home=tmp_path, precision="fp8")
    assert double.trt.builds == []


def test_int8_calibrator_with_double_reads_the_demo_study(double: Double, tmp_path: Path,
                                                          demo_study: list[Path]) -> None:
    folder = tmp_path / "calibration"
    folder.mkdir()
    for path in demo_study:
        shutil.copy(path, folder / path.name)
    (folder / "notes.txt").write_text("not DICOM")
    plan = build_engine(PACKAGE, home=tmp_path, precision="int8", calibration=folder)
    build = double.trt.builds[-1]
    assert build["flags"] == ["FP16", "INT8"]
    assert build["calibration_profile"] == {name: ((4, *s),) * 3
                                            for name, s in VIEW_SHAPES.items()}
    (batch,) = build["calibration"]["batches"]
    manifest = read_manifest(PACKAGE)
    expected = file_inputs(calibration_files(folder), manifest,
                           ClinicalTokenizer.from_file(manifest.tokenizer_path))
    np.testing.assert_array_equal(batch["image"], expected.images)
    np.testing.assert_array_equal(batch["input_ids"], expected.input_ids)
    np.testing.assert_array_equal(batch["attention_mask"], expected.attention_mask)
    calib_cache = Path(_sidecar(plan)["settings"]["calibration_cache"])
    assert calib_cache.parent == tmp_path / "engines" and calib_cache.is_file()
    assert build["calibration"]["cache_read"] is False
    plan.unlink()
    build_engine(PACKAGE, home=tmp_path, precision="int8", calibration=folder)
    assert double.trt.builds[-1]["calibration"] == {"cache_read": True, "batches": []}


def test_engine_with_tensorrt_double_matches_onnxruntime(double: Double, tmp_path: Path,
                                                         onnx_engine: OnnxEngine,
                                                         study_inputs: ModelInputs) -> None:
    build_engine(PACKAGE, home=tmp_path)
    engine = TensorRTEngine(PACKAGE, home=tmp_path)
    assert engine.backend == "tensorrt"
    assert engine.providers == [f"TensorRT {fake_tensorrt.VERSION} on NVIDIA H200 (sm_90), fp16"]
    got = engine.predict(study_inputs.images, study_inputs.input_ids, study_inputs.attention_mask)
    want = onnx_engine.predict(study_inputs.images, study_inputs.input_ids,
                               study_inputs.attention_mask)
    for name in ("cancer", "calcification", "heatmap"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == np.float32 and a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_double_splits_nine_views_over_max_views_and_allocates_once(
        double: Double, tmp_path: Path, onnx_engine: OnnxEngine) -> None:
    build_engine(PACKAGE, home=tmp_path, max_views=4)
    engine = TensorRTEngine(PACKAGE, home=tmp_path, max_views=4)
    allocated = double.device.allocations
    assert allocated == 6  # three inputs, three outputs
    rng = np.random.default_rng(7)
    images = rng.random((9, 1, H, W), dtype=np.float32)
    ids = rng.integers(0, 182, (9, L), dtype=np.int64)
    mask = (np.arange(L)[None, :] < rng.integers(3, L, (9, 1))).astype(np.int64)
    got = engine.predict(images, ids, mask)
    want = onnx_engine.predict(images, ids, mask)
    assert len(got) == 9
    for name in ("cancer", "calcification", "heatmap"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=0, atol=1e-6)
    again = engine.predict(images[:2], ids[:2], mask[:2])
    np.testing.assert_allclose(again.cancer, want.cancer[:2], rtol=0, atol=1e-6)
    assert double.device.allocations == allocated
    assert engine._engine.executions == 4  # 4 + 4 + 1 views, then 2
    assert len(engine.predict(images[:0], ids[:0], mask[:0])) == 0


def test_double_is_strict_about_the_tensorrt_10_api(double: Double, tmp_path: Path) -> None:
    trt = double.trt
    plan = build_engine(PACKAGE, home=tmp_path)
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(plan.read_bytes())
    context = engine.create_execution_context()
    for obj, name in ((context, "execute_v2"), (context, "execute_async_v2"),
                      (context, "set_binding_shape"), (engine, "get_binding_shape"),
                      (engine, "num_bindings"), (trt, "EXPLICIT_BATCH")):
        assert not hasattr(obj, name)
    with pytest.raises(AttributeError):
        trt.Builder(trt.Logger()).create_builder_config().max_workspace_size = 1
    for name in ("image", "input_ids", "attention_mask", "cancer", "calcification", "heatmap"):
        context.set_tensor_address(name, 0)
    with pytest.raises(RuntimeError, match="input shape"):
        context.execute_async_v3(double.layers[-1].stream_handle)
    assert context.set_input_shape("image", (9, 1, H, W)) is False  # outside the profile


def test_tensorrt_absent_without_double_names_what_to_install(tmp_path: Path) -> None:
    """No double: on this machine TensorRT is really missing."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TensorRT is installed here")
    with pytest.raises(BackendUnavailable, match="no TensorRT Python module: pip install"):
        TensorRTEngine(PACKAGE, home=tmp_path)
    probe = ("import sys, cadnode.runtime.tensorrt; "
             "assert 'tensorrt' not in sys.modules and 'trt_engines' not in sys.modules")
    subprocess.run([sys.executable, "-c", probe], check=True)


def test_cuda_python_layer_with_double_runtime_checks_every_error() -> None:
    """CudaPython over a double of ``cuda.bindings.runtime``: (error, value) tuples unpacked,
    errors named, host pointers and the stream passed through."""
    import enum
    from types import SimpleNamespace

    from cadnode.runtime.cuda import CudaPython

    class Err(enum.Enum):
        cudaSuccess = 0
        cudaErrorMemoryAllocation = 2
        cudaErrorNoDevice = 100

    calls: list[tuple] = []
    ok = Err.cudaSuccess

    def record(*args: object) -> tuple[Err]:
        calls.append(args)
        return (ok,)

    props = SimpleNamespace(name=b"NVIDIA H200\0\0\0", major=9, minor=0)
    rt = SimpleNamespace(
        cudaError_t=Err, cudaMemcpyKind=SimpleNamespace(cudaMemcpyHostToDevice=1,
                                                       cudaMemcpyDeviceToHost=2),
        cudaGetErrorName=lambda err: (ok, err.name.encode()),
        cudaGetDeviceCount=lambda: (ok, 1), cudaGetDevice=lambda: (ok, 0),
        cudaStreamCreate=lambda: (ok, 77), cudaGetDeviceProperties=lambda d: (ok, props),
        cudaMalloc=lambda n: (ok, 4096) if n < 1 << 20 else (Err.cudaErrorMemoryAllocation, 0),
        cudaMemcpyAsync=record, cudaStreamSynchronize=lambda s: record("sync", s),
        cudaFree=lambda p: (ok,))
    layer = CudaPython(rt)
    assert layer.stream_handle == 77 and layer.device_info().name == "NVIDIA H200"
    assert layer.device_info().capability == (9, 0) and layer.device_info().sm == "90"
    buffer = layer.allocate(64)
    host = np.arange(16, dtype=np.float32)
    layer.to_device(buffer, host)
    layer.to_host(host, buffer)
    layer.synchronize()
    assert calls == [(4096, host.ctypes.data, 64, 1, 77), (host.ctypes.data, 4096, 64, 2, 77),
                     ("sync", 77)]
    with pytest.raises(ValueError, match="do not fit"):
        layer.to_device(buffer, np.zeros(32, dtype=np.float32))
    with pytest.raises(RuntimeError, match="cudaMalloc failed: cudaErrorMemoryAllocation"):
        layer.allocate(1 << 30)
    rt.cudaGetDeviceCount = lambda: (Err.cudaErrorNoDevice, 0)
    with pytest.raises(BackendUnavailable, match="no NVIDIA GPU.*cudaErrorNoDevice"):
        CudaPython(rt)
