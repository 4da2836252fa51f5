"""The GPU check on a machine without a GPU: it still runs, writes the documented report, says
"no CUDA device" for every CUDA row and measures the CPU ONNX Runtime reference; run.sh exits 0
within its time limit. A tiny model at 128 x 64 keeps it under a minute."""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

pytestmark = pytest.mark.torch

REPO = Path(__file__).resolve().parents[2]
QUICK = ["--quick", "--sizes", "128x64", "--model", "cadnode-tiny-256", "--deadline", "120"]
TOP_KEYS = {"schema", "date", "commit", "host", "cpu", "cores", "python", "versions", "gpu",
            "cuda_reason", "model", "views_per_study", "sizes", "quick", "deadline_s",
            "reference", "ratio_reference", "tf32", "tolerances", "inputs", "packages",
            "peak_gflops", "not_reached", "seconds", "passed", "results"}
ROW_KEYS = {"backend", "precision", "device", "size", "variant", "status", "reason", "providers",
            "runs", "median_ms", "p90_ms", "studies_per_s", "speed_ratio", "gflop_per_study",
            "achieved_gflops", "fraction_of_peak", "parity", "tolerance", "passed"}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    from tests.gpu.check import main

    if torch.cuda.is_available():
        pytest.skip("this test is about a machine without a CUDA device")
    out = tmp_path_factory.mktemp("gpu-check")
    assert main(["--out", str(out), *QUICK]) == 0
    return (json.loads((out / "gpu-check.json").read_text()),
            (out / "gpu-check.md").read_text())


def test_the_json_has_the_documented_keys(report: tuple[dict, str]) -> None:
    doc, _ = report
    assert set(doc) == TOP_KEYS
    assert doc["schema"] == "cadnode-gpu-check/1" and doc["gpu"] is None
    assert doc["results"] and all(set(row) == ROW_KEYS for row in doc["results"])
    assert doc["passed"] is True and doc["not_reached"] == []


def test_every_cuda_row_is_skipped_for_want_of_a_device(report: tuple[dict, str]) -> None:
    doc, _ = report
    cuda = [row for row in doc["results"] if row["device"] == "cuda"]
    assert {(r["backend"], r["precision"], r["variant"]) for r in cuda} >= {
        ("torch", "fp32", ""), ("torch", "fp16", ""), ("torch", "bf16", ""),
        ("onnxruntime", "fp32", ""), ("tensorrt", "fp16", ""),
        ("torch", "fp16", "reduce-overhead")}
    for row in cuda:
        assert row["status"] == "skipped" and row["reason"].startswith("no CUDA device"), row


def test_the_cpu_reference_is_measured(report: tuple[dict, str]) -> None:
    doc, _ = report
    (ref,) = [r for r in doc["results"] if (r["backend"], r["device"]) == ("onnxruntime", "cpu")]
    assert ref["status"] == "measured" and ref["runs"] >= 1
    for key in ("median_ms", "p90_ms", "studies_per_s", "gflop_per_study", "achieved_gflops"):
        assert math.isfinite(ref[key]) and ref[key] > 0, key
    assert ref["passed"] is True and max(ref["parity"].values()) == 0


def test_the_markdown_table_has_one_row_per_result(report: tuple[dict, str]) -> None:
    doc, md = report
    rows = [line for line in md.splitlines() if line.startswith("|")]
    assert rows[0].startswith("| size | backend | status |") and set(rows[1]) <= set("|-")
    assert len(rows) - 2 == len(doc["results"])
    for line, row in zip(rows[2:], doc["results"], strict=True):
        assert line.startswith(f"| {row['size']} | ")


def test_run_sh_exits_0_on_the_cpu_within_its_limit(tmp_path: Path) -> None:
    env = {**os.environ, "GPU_CHECK_ARGS": " ".join(QUICK), "GPU_CHECK_TIMEOUT": "150",
           "PYTHON": str(REPO / ".venv" / "bin" / "python")}
    env.pop("OUT", None)
    start = time.monotonic()
    done = subprocess.run(["bash", str(REPO / "tests" / "gpu" / "run.sh"), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert time.monotonic() - start < 170
    assert (tmp_path / "gpu-check.json").is_file() and "| size |" in done.stdout
