"""``quantize_package`` on the demo package: the int8 model is kept exactly when both per-view
AUROC drops are within the limit, the node then serves it with scores close to fp32, and a
refusal leaves nothing behind.

A small benchmark (25 synthetic exams, 100 views, seed 1) and calibration set (4 exams, seed 2)
keep the file under ~90 s on 2 cores; the full default benchmark is run by hand (README).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cadnode.jobs.inputs import file_inputs
from cadnode.runtime import DEFAULT_MODEL_PACKAGE, BackendUnavailable, load_engine, read_manifest
from cadnode.runtime.onnx import OnnxEngine, int8_model_path
from cadnode.text.tokenizer import ClinicalTokenizer
from train.synthetic import SyntheticConfig, write_dataset
from trt_engines.quantize import QuantizeReport, quantize_package, read_benchmark

#: Largest per-view |int8 - fp32| probability accepted: static QDQ moved single views by up to
#: 0.16 (cancer) and 0.34 (calcification) on the 400-view default benchmark, AUROC unchanged.
SCORE_TOLERANCE = 0.35


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("quantize-sets")
    shape = read_manifest(DEFAULT_MODEL_PACKAGE).input_size
    write_dataset(SyntheticConfig(n_exams=25, seed=1, shape=shape), root / "bench")
    write_dataset(SyntheticConfig(n_exams=4, seed=2, shape=shape), root / "calib")
    return root / "bench", root / "calib"


@pytest.fixture(scope="module")
def quantized(sets: tuple[Path, Path],
              tmp_path_factory: pytest.TempPathFactory) -> tuple[QuantizeReport, Path]:
    home = tmp_path_factory.mktemp("home")
    bench, calib = sets
    return quantize_package(DEFAULT_MODEL_PACKAGE, home=home, benchmark=bench,
                            calibration=calib), home


def test_decision_follows_the_figures(quantized: tuple[QuantizeReport, Path]) -> None:
    report, home = quantized
    drops = {t: report.auroc_fp32[t] - report.auroc_int8[t] for t in ("cancer", "calcification")}
    assert report.kept == all(d <= report.max_auroc_drop for d in drops.values())
    assert report.path == int8_model_path(read_manifest(DEFAULT_MODEL_PACKAGE), home)
    assert report.path.is_file() == report.kept
    assert report.path.with_suffix(".json").is_file() == report.kept
    # the package as served: the graph and its external weights (the fp16 text tower). The
    # int8 graph carries the tower inside it, quantized from fp32, and is not smaller than the
    # fp16 tower it replaces: 72.6 MB against 62.2 MB for the 0.4.0 package (the 0.3.0 package,
    # all fp32, went from 19.7 to 6.1 MB)
    manifest = read_manifest(DEFAULT_MODEL_PACKAGE)
    assert report.bytes_fp32 == sum(p.stat().st_size for p in manifest.weight_files)
    assert report.n_views == 100 and report.bytes_int8 > 0
    assert report.ms_per_study_fp32 > 0 and report.ms_per_study_int8 > 0
    assert report.method in report.tried and report.method in report.summary()
    assert not [p for p in report.path.parent.iterdir() if p.name.endswith(".tmp")]


def test_node_serves_the_kept_model(quantized: tuple[QuantizeReport, Path],
                                    sets: tuple[Path, Path]) -> None:
    report, home = quantized
    if not report.kept:
        pytest.skip(f"int8 was refused on the small benchmark: {report.summary()}")
    manifest = read_manifest(DEFAULT_MODEL_PACKAGE)
    bench = read_benchmark(sets[0])
    inputs = file_inputs(bench.files[:8], manifest, ClinicalTokenizer.from_file(
        manifest.tokenizer_path))
    args = (inputs.images, inputs.input_ids, inputs.attention_mask)
    fp32 = OnnxEngine(DEFAULT_MODEL_PACKAGE, device="cpu").predict(*args)
    int8 = OnnxEngine(DEFAULT_MODEL_PACKAGE, precision="int8", home=home, device="cpu")
    loaded = load_engine(DEFAULT_MODEL_PACKAGE, "onnxruntime", precision="int8", home=home,
                         device="cpu")
    for engine in (int8, loaded):
        out = engine.predict(*args)
        np.testing.assert_allclose(out.cancer, fp32.cancer, atol=SCORE_TOLERANCE)
        np.testing.assert_allclose(out.calcification, fp32.calcification, atol=SCORE_TOLERANCE)


def test_impossible_limit_is_refused_and_leaves_nothing(sets: tuple[Path, Path],
                                                         tmp_path: Path) -> None:
    """Through the command an admin runs: exit 1, the summary says refused, no file is left."""
    proc = subprocess.run(
        [sys.executable, "-m", "cadnode", "engine", "quantize", "--benchmark", str(sets[0]),
         "--max-auroc-drop", "-1", "--method", "dynamic"], cwd=tmp_path, capture_output=True,
        text=True, timeout=300, env={**os.environ, "CADNODE_HOME": str(tmp_path / "home")})
    assert proc.returncode == 1, proc.stderr
    assert "refused" in proc.stdout and "dynamic" in proc.stdout
    assert list((tmp_path / "home" / "engines").iterdir()) == []


def test_missing_int8_model_names_the_command(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable, match="cadnode engine quantize --package"):
        OnnxEngine(DEFAULT_MODEL_PACKAGE, precision="int8", home=tmp_path)
    with pytest.raises(BackendUnavailable, match="cadnode engine quantize"):
        load_engine(DEFAULT_MODEL_PACKAGE, "onnxruntime", precision="int8", home=tmp_path)
