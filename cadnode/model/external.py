"""Store a frozen pretrained tower's weights outside ``model.onnx``, in float16, once.

Why: a frozen text tower (MiniLM: 22.7 M parameters, 91 MB in float32) is the same in every
package trained from it. Kept inside ``model.onnx`` it would be copied into every package and
every retrain. Here it goes to ``text_tower.bin`` as ONNX external data: float16 (the tower
was rounded to float16 values at load, so nothing changes numerically; a ``Cast`` to float32
feeds the graph), tensors in the order of their names in the tower's own checkpoint, each at a
4096-byte offset. The file therefore depends only on the tower and the architecture, not on
the trained weights: two packages trained from the same tower carry byte-identical copies
(same sha256), and a repository or artefact store keeps one.

ONNX Runtime, TensorRT's ONNX parser and onnx itself read external data relative to the model
file, so the package folder works as it is; tools that copy ``model.onnx`` elsewhere copy the
file too (``cadnode.runtime.manifest.ModelManifest.weight_files``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor

#: Initializers smaller than this stay inside model.onnx (a match by value is then ambiguous).
MIN_ELEMENTS = 64
ALIGN = 4096


def _digest(array: np.ndarray) -> bytes:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).digest()


def externalise(model_path: Path, frozen: dict[str, Tensor], file_name: str) -> dict[str, Any]:
    """Move the initializers of ``model_path`` whose values are a frozen tensor (or its
    transpose, as the exporter folds ``Linear`` weights) into ``file_name`` beside it, in
    float16. Returns what the manifest records: file, tensor count, bytes."""
    wanted: dict[bytes, tuple[str, bool]] = {}
    for name, tensor in sorted(frozen.items()):
        array = tensor.detach().cpu().float().numpy()
        if array.size < MIN_ELEMENTS:
            continue
        wanted.setdefault(_digest(array), (name, False))
        if array.ndim == 2:
            wanted.setdefault(_digest(array.T), (name, True))
    model = onnx.load(str(model_path))
    graph = model.graph
    matched: list[tuple[str, bool, TensorProto]] = []
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            continue
        key = _digest(numpy_helper.to_array(init))
        if key in wanted:
            matched.append((*wanted[key], init))
    if not matched:
        raise ValueError(f"{model_path}: no initializer holds the frozen tower's weights")
    matched.sort(key=lambda m: (m[0], m[1]))
    casts = []
    offset = 0
    with (model_path.parent / file_name).open("wb") as fh:
        for _, _, init in matched:
            original = init.name
            half = numpy_helper.to_array(init).astype(np.float16)
            data = half.tobytes()
            fh.write(b"\0" * (-offset % ALIGN))
            offset += -offset % ALIGN
            fh.write(data)
            stored = f"{original}::float16"
            init.CopyFrom(numpy_helper.from_array(half, stored))
            init.ClearField("raw_data")
            init.data_location = TensorProto.EXTERNAL
            for field, value in (("location", file_name), ("offset", str(offset)),
                                 ("length", str(len(data)))):
                init.external_data.append(onnx.StringStringEntryProto(key=field, value=value))
            offset += len(data)
            # consumers keep reading the original name, now the Cast's float32 output
            casts.append(helper.make_node("Cast", [stored], [original], to=TensorProto.FLOAT,
                                          name=f"{original}::cast"))
    for node in reversed(casts):
        graph.node.insert(0, node)
    onnx.save(model, str(model_path))
    return {"file": file_name, "dtype": "float16", "tensors": len(matched), "bytes": offset}
