"""``cadnode engine triton-repo``: the generated repository, read back the way Triton reads it
(the text format parsed into Triton's own ``ModelConfig`` protobuf from ``tritonclient``).

No Triton server can run here (it is not installable from PyPI); what is checked is the
layout and a configuration that parses, and whose tensors are the ONNX graph's own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from cadnode.runtime import DEFAULT_MODEL_PACKAGE, read_manifest
from trt_engines.triton_repo import RepositoryOptions, write_repository

TYPES = {"tensor(float)": mc.TYPE_FP32, "tensor(int64)": mc.TYPE_INT64}


def _read(folder: Path) -> mc.ModelConfig:
    return text_format.Parse((folder / "config.pbtxt").read_text(), mc.ModelConfig())


def test_onnx_repository_matches_the_graph(tmp_path: Path) -> None:
    folder = write_repository(DEFAULT_MODEL_PACKAGE, tmp_path / "repo")
    manifest = read_manifest(DEFAULT_MODEL_PACKAGE)
    config = _read(folder)
    assert folder.name == config.name and folder.parent == tmp_path / "repo"
    assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 8
    model = folder / "1" / "model.onnx"
    assert model.read_bytes() == manifest.model_path.read_bytes()
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    graph_in = {i.name: i for i in session.get_inputs()}
    assert {t.name for t in config.input} == set(graph_in)
    for t in config.input:  # Triton's dims leave out the batch (the views)
        assert list(t.dims) == list(graph_in[t.name].shape[1:])
        assert t.data_type == TYPES[graph_in[t.name].type]
    graph_out = {o.name: o for o in session.get_outputs()}
    outputs = {t.name: t for t in config.output}
    assert set(outputs) == set(manifest.outputs)
    assert list(outputs["heatmap"].dims) == list(graph_out["heatmap"].shape[1:])
    for name in ("cancer", "calcification"):  # one probability per view: [1] reshaped to []
        assert list(outputs[name].dims) == [1] and outputs[name].HasField("reshape")
        assert list(outputs[name].reshape.shape) == []
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    (group,) = config.instance_group
    assert group.kind == mc.ModelInstanceGroup.KIND_GPU and group.count == 1


def test_tensorrt_plan_repository_and_its_refusals(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs the engine"):
        write_repository(DEFAULT_MODEL_PACKAGE, tmp_path / "r", RepositoryOptions("tensorrt_plan"))
    plan = tmp_path / "engine.plan"
    plan.write_bytes(b"a serialized engine")  # content is Triton's business, not ours
    folder = write_repository(DEFAULT_MODEL_PACKAGE, tmp_path / "r",
                              RepositoryOptions("tensorrt_plan", max_views=4, kind="cpu"),
                              plan=plan)
    config = _read(folder)
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 4
    assert (folder / "1" / "model.plan").read_bytes() == b"a serialized engine"
    assert list(config.dynamic_batching.preferred_batch_size) == [4]  # 8 > max views
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU


def test_cli(tmp_path: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "cadnode", "engine", "triton-repo", "--out",
                         str(tmp_path / "repo"), "--max-views", "4"], capture_output=True,
                        text=True, cwd=tmp_path, timeout=120,
                        env={"CADNODE_HOME": str(tmp_path / "h"), "PATH": "/usr/bin:/bin"})
    assert ok.returncode == 0, ok.stderr
    (folder,) = (tmp_path / "repo").iterdir()
    assert _read(folder).max_batch_size == 4
    bad = subprocess.run([sys.executable, "-m", "cadnode", "engine", "triton-repo", "--out",
                          str(tmp_path / "r2"), "--platform", "tensorrt_plan"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env={"CADNODE_HOME": str(tmp_path / "h"), "PATH": "/usr/bin:/bin"})
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "cadnode engine triton-repo: platform tensorrt_plan needs the engine (--plan FILE)"]
