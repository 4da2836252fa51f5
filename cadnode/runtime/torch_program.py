"""The torch backend: the reference engine, running the package's ``torch.export`` program.

``model.pt2`` is written by :mod:`cadnode.model.export` from the same weights as ``model.onnx``;
loading it needs PyTorch but none of the node's model code, so serving still imports nothing
from ``cadnode.model``. On a GPU it runs with autocast in fp16 or bf16 when asked,
channels-last images, and optionally ``torch.compile`` (``mode="reduce-overhead"`` records CUDA
graphs); on the CPU in fp32 (or bf16 autocast).
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from cadnode.runtime.enum import DEVICES, Backend, BackendUnavailable, Precision, precision_for
from cadnode.runtime.feeds import check_feeds
from cadnode.runtime.manifest import TORCH_PROGRAM_NAME, ModelManifest, read_manifest
from cadnode.runtime.types import ViewOutputs

log = logging.getLogger(__name__)

_DTYPES = {Precision.FP16: "float16", Precision.BF16: "bfloat16"}


def _import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise BackendUnavailable("the torch backend needs PyTorch (pip install torch, or "
                                 "cadnode[train])") from None
    return torch


class TorchEngine:
    """Runs ``model.pt2`` with PyTorch on the CPU or a CUDA device."""

    backend = Backend.TORCH.value

    def __init__(self, package: str | Path | ModelManifest, *, device: str = "auto",
                 precision: str = "", compile_mode: str | None = None,
                 verify_checksums: bool = True) -> None:
        """``device`` as for every backend; ``precision`` fp32 (default), fp16 (GPU only) or
        bf16; ``compile_mode`` a ``torch.compile`` mode (e.g. "reduce-overhead") or None."""
        if device not in DEVICES:
            raise ValueError(f"device {device!r} is not one of {', '.join(DEVICES)}")
        self.manifest = (package if isinstance(package, ModelManifest)
                         else read_manifest(package, verify_checksums=verify_checksums))
        self.precision = precision_for(Backend.TORCH, precision)
        path = self.manifest.torch_program_path
        if not path.is_file():
            raise BackendUnavailable(
                f"model package {self.manifest.package} has no {TORCH_PROGRAM_NAME} (the torch "
                "backend's program); export the package with python -m cadnode.model.export, "
                "which writes it")
        torch = _import_torch()
        self._torch = torch
        cuda = bool(torch.cuda.is_available()) and device != "cpu"
        if device == "gpu" and not cuda:
            raise BackendUnavailable("CADNODE_DEVICE=gpu but torch sees no CUDA device "
                                     f"(torch {torch.__version__}, CUDA build "
                                     f"{torch.version.cuda or 'none'})")
        if self.precision is Precision.FP16 and not cuda:
            raise BackendUnavailable("fp16 with the torch backend needs a CUDA device; use "
                                     "fp32 or bf16 on the CPU")
        self.device = torch.device("cuda" if cuda else "cpu")
        program = torch.export.load(str(path))
        module = program.module().to(self.device)
        if cuda:
            module = module.to(memory_format=torch.channels_last)
        self._module = torch.compile(module, mode=compile_mode) if compile_mode else module
        where = torch.cuda.get_device_name(self.device) if cuda else "CPU"
        self.providers: list[str] = [
            f"torch {torch.__version__} on {where}, {self.precision.value}"
            + (f", torch.compile {compile_mode}" if compile_mode else "")]
        self._check_program()
        log.info("model %s %s on %s", self.manifest.name, self.manifest.version,
                 self.providers[0])

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.precision not in _DTYPES:
            return nullcontext()
        dtype = getattr(self._torch, _DTYPES[self.precision])
        return self._torch.autocast(self.device.type, dtype=dtype)

    def _check_program(self) -> None:
        """One view through the program now, so that a program that does not take this
        package's inputs stops start-up rather than every study."""
        h, w = self.manifest.input_size
        length = self.manifest.max_text_len
        try:
            out = self.predict(np.zeros((1, 1, h, w), np.float32), np.zeros((1, length), np.int64),
                               np.ones((1, length), np.int64))
        except Exception as exc:  # whatever the program raises, said in one line
            raise BackendUnavailable(f"model package {self.manifest.package}: "
                                     f"{TORCH_PROGRAM_NAME} does not run on this package's "
                                     f"inputs: {type(exc).__name__}: {exc}"[:500]) from exc
        expected = self.manifest.heatmap_size
        if expected is not None and out.heatmap.shape[1:] != tuple(expected):
            raise BackendUnavailable(f"model package {self.manifest.package}: "
                                     f"{TORCH_PROGRAM_NAME} gives heatmaps of "
                                     f"{out.heatmap.shape[1:]}, the manifest says {expected}")

    def predict(self, images: np.ndarray, input_ids: np.ndarray,
                attention_mask: np.ndarray) -> ViewOutputs:
        """images float32 (B,1,H,W) in [0,1]; tokens int64 (B,L) -> probabilities per view."""
        torch = self._torch
        feeds = check_feeds(self.manifest, images, input_ids, attention_mask)
        image = torch.from_numpy(feeds["image"]).to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            image = image.contiguous(memory_format=torch.channels_last)
        ids = torch.from_numpy(feeds["input_ids"]).to(self.device, non_blocking=True)
        mask = torch.from_numpy(feeds["attention_mask"]).to(self.device, non_blocking=True)
        with torch.inference_mode(), self._autocast():
            cancer, calc, heat = self._module(image, ids, mask)
        # .cpu() waits for the device; float32 whatever autocast computed in
        return ViewOutputs(
            cancer=cancer.float().cpu().numpy().reshape(-1),
            calcification=calc.float().cpu().numpy().reshape(-1),
            heatmap=heat.float().cpu().numpy())
