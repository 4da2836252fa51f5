"""A Triton Inference Server model repository for a cadnode model package.

Triton (and any KServe-v2 server that reads Triton repositories) expects::

    <repository>/<model name>/config.pbtxt
    <repository>/<model name>/<version>/model.onnx     (platform onnxruntime_onnx)
    <repository>/<model name>/<version>/model.plan     (platform tensorrt_plan)

``config.pbtxt`` is Triton's ``ModelConfig`` protobuf in text format. It is built here as that
protobuf (from ``tritonclient``) and printed with ``google.protobuf.text_format``, so that a
field Triton does not know can never be written. Shapes come from the package's manifest and
are checked against the ONNX graph itself; the batch dimension is the number of views, so
``max_batch_size`` bounds the views of one request and dynamic batching groups the views of
concurrent studies.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cadnode.runtime.manifest import ModelManifest, read_manifest
from cadnode.runtime.triton import model_name

PLATFORMS = {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan"}
KINDS = ("gpu", "cpu")
_ONNX_TYPES = {"tensor(float)": "TYPE_FP32", "tensor(int64)": "TYPE_INT64",
               "tensor(float16)": "TYPE_FP16", "tensor(int32)": "TYPE_INT32"}


@dataclass(frozen=True)
class RepositoryOptions:
    """What the generated configuration asks Triton for."""

    platform: str = "onnxruntime_onnx"
    max_views: int = 8  # max_batch_size: views in one request (4 per screening exam)
    preferred_views: tuple[int, ...] = (4, 8)  # dynamic batching: one or two whole exams
    queue_delay_us: int = 2000  # how long a request may wait for others to batch with
    kind: str = "gpu"  # instance_group kind
    instances: int = 1  # model instances per device
    version: int = 1


def _graph_io(manifest: ModelManifest) -> tuple[dict[str, tuple[str, list[Any]]],
                                                 dict[str, tuple[str, list[Any]]]]:
    """ONNX input and output (type, shape) by name, read from the graph itself."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(manifest.model_path), providers=["CPUExecutionProvider"])
    return ({i.name: (i.type, list(i.shape)) for i in session.get_inputs()},
            {o.name: (o.type, list(o.shape)) for o in session.get_outputs()})


def _tensor(config_list: Any, name: str, onnx_type: str, dims: list[int]) -> Any:
    if onnx_type not in _ONNX_TYPES:
        raise ValueError(f"tensor {name}: ONNX type {onnx_type} has no Triton type here")
    from tritonclient.grpc import model_config_pb2 as mc

    t = config_list.add()
    t.name = name
    t.data_type = mc.DataType.Value(_ONNX_TYPES[onnx_type])
    if dims:
        t.dims.extend(dims)
    else:  # a scalar per view: Triton needs one dimension, the model gives none
        t.dims.append(1)
        t.reshape.SetInParent()  # reshape { shape: [] }
    return t


def build_config(manifest: ModelManifest, options: RepositoryOptions) -> Any:
    """The ``ModelConfig`` protobuf for ``manifest`` (batch dimension left out, as Triton
    wants with ``max_batch_size`` > 0)."""
    from tritonclient.grpc import model_config_pb2 as mc

    if options.platform not in PLATFORMS:
        raise ValueError(f"platform {options.platform!r} is not one of {', '.join(PLATFORMS)}")
    if options.kind not in KINDS:
        raise ValueError(f"kind {options.kind!r} is not one of {', '.join(KINDS)}")
    if not 1 <= options.max_views <= 64:
        raise ValueError("max views must be between 1 and 64")
    h, w = manifest.input_size
    length = manifest.max_text_len
    expected_inputs = {"image": [1, h, w], "input_ids": [length], "attention_mask": [length]}
    inputs, outputs = _graph_io(manifest)
    config = mc.ModelConfig()
    config.name = model_name(manifest)
    config.platform = options.platform
    config.max_batch_size = options.max_views
    for name, (onnx_type, shape) in inputs.items():
        dims = [int(d) for d in shape[1:]]
        if name in expected_inputs and dims != expected_inputs[name]:
            raise ValueError(f"package {manifest.package}: graph input {name} has dims {dims}, "
                             f"the manifest says {expected_inputs[name]}")
        _tensor(config.input, name, onnx_type, dims)
    for name in manifest.outputs:
        if name not in outputs:
            raise ValueError(f"package {manifest.package}: graph has no output {name}")
        onnx_type, shape = outputs[name]
        _tensor(config.output, name, onnx_type, [int(d) for d in shape[1:]])
    preferred = [v for v in options.preferred_views if v <= options.max_views]
    config.dynamic_batching.preferred_batch_size.extend(preferred)
    config.dynamic_batching.max_queue_delay_microseconds = options.queue_delay_us
    group = config.instance_group.add()
    group.count = options.instances
    group.kind = (mc.ModelInstanceGroup.Kind.KIND_GPU if options.kind == "gpu"
                  else mc.ModelInstanceGroup.Kind.KIND_CPU)
    config.version_policy.latest.num_versions = 1
    return config


def write_repository(package: str | Path, out: str | Path,
                     options: RepositoryOptions | None = None,
                     plan: str | Path | None = None) -> Path:
    """Lay out ``out/<model>/config.pbtxt`` and ``out/<model>/<version>/`` with the package's
    ONNX model (or, for tensorrt_plan, the given engine ``plan``); returns the model folder."""
    from google.protobuf import text_format

    options = options or RepositoryOptions()
    manifest = read_manifest(package)
    if options.platform == "tensorrt_plan" and plan is None:
        raise ValueError("platform tensorrt_plan needs the engine (--plan FILE)")
    config = build_config(manifest, options)
    folder = Path(out) / config.name
    version = folder / str(options.version)
    version.mkdir(parents=True, exist_ok=True)
    if plan is not None:
        shutil.copyfile(plan, version / PLATFORMS[options.platform])
    else:  # the graph and the external weights it reads beside it (a frozen text tower)
        shutil.copyfile(manifest.model_path, version / PLATFORMS[options.platform])
        for extra in manifest.weight_files[1:]:
            shutil.copyfile(extra, version / extra.name)
    (folder / "config.pbtxt").write_text(text_format.MessageToString(config), encoding="utf-8")
    return folder
