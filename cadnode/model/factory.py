"""timm-style named model configs: ``create_model("cadnode-effb0-cpu", dim=64, ...)``."""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

from cadnode.model.fused import FusedConfig, FusedVLM

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


def create_model(name: str, **overrides: Any) -> FusedVLM:
    """Build a (randomly initialised, or backbone_checkpoint-initialised) model by name."""
    return FusedVLM(get_config(name, **overrides))
