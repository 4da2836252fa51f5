"""Fused model and export: tiny configs so it runs in seconds; ONNX parity <= 1e-4."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("onnxruntime")

from cadnode.model.export import export_package, main  # noqa: E402
from cadnode.model.factory import create_model, get_config, list_models  # noqa: E402
from cadnode.runtime import load_engine  # noqa: E402

pytestmark = pytest.mark.torch

TINY = dict(input_size=(128, 64), dim=32, heads=2, text_layers=1)


def _inputs(b: int = 2, length: int = 64):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(b, 1, 128, 64, generator=g)
    ids = torch.randint(5, 100, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.int64)
    mask[:, 20:] = 0
    ids[mask == 0] = 0
    return image, ids, mask


def test_named_configs() -> None:
    assert {"cadnode-effb0-cpu", "cadnode-effb0-2048"} <= set(list_models())
    assert get_config("cadnode-effb0-cpu").input_size == (1024, 512)
    assert get_config("cadnode-effb0-2048").input_size == (2048, 1024)
    assert get_config("cadnode-effb0-cpu").backbone == "efficientnet_b0"
    with pytest.raises(ValueError, match="unknown config field"):
        get_config("cadnode-effb0-cpu", dimm=3)
    with pytest.raises(ValueError, match="unknown model"):
        create_model("nope")


@pytest.mark.parametrize("flags", [{}, {"use_text": False}, {"use_image": False},
                                   {"backbone": "resnet18"}, {"backbone": "convnext_atto"}])
def test_forward_variants(flags) -> None:
    torch.manual_seed(0)
    model = create_model("cadnode-effb0-cpu", **TINY, **flags).eval()
    image, ids, mask = _inputs()
    with torch.no_grad():
        out = model(image, ids, mask)
    assert out["cancer_logit"].shape == (2,) and out["calcification_logit"].shape == (2,)
    heat = out["heatmap"]
    assert heat.shape == (2, 1, 4, 2) and (heat >= 0).all() and (heat <= 1).all()
    with torch.no_grad():
        other_text = model(image, torch.where(mask == 1, ids + 7, ids), mask)
        other_image = model(torch.rand_like(image), ids, mask)
    # exact comparison: at random init (eval-mode batch norm) an image moves the logit ~1e-4
    text_moved = not torch.equal(other_text["cancer_logit"], out["cancer_logit"])
    image_moved = not torch.equal(other_image["cancer_logit"], out["cancer_logit"])
    assert text_moved == flags.get("use_text", True)
    assert image_moved == flags.get("use_image", True)
    if flags.get("use_text", True) and flags.get("use_image", True):
        # padding is really masked: changing padded ids changes nothing
        with torch.no_grad():
            padded = model(image, torch.where(mask == 0, ids + 9, ids), mask)
        torch.testing.assert_close(padded["cancer_logit"], out["cancer_logit"])


def test_backward_reaches_both_encoders() -> None:
    model = create_model("cadnode-effb0-cpu", **TINY).train()
    image, ids, mask = _inputs()
    out = model(image, ids, mask)
    (out["cancer_logit"].sum() + out["heatmap_logit"].mean()).backward()
    assert model.text.tok.weight.grad is not None and model.text.tok.weight.grad.abs().sum() > 0
    stem = next(model.image.parameters())
    assert stem.grad is not None and stem.grad.abs().sum() > 0


def _wake_feedback(model) -> None:
    """Non-zero feedback convs, so the graph's text-to-backbone path is exercised (a fresh
    model starts them at zero)."""
    with torch.no_grad():
        for fusion in getattr(model, "fusions", []):
            if fusion.feedback is not None:
                fusion.feedback.weight.normal_(0, 0.05)


@pytest.mark.parametrize("fusion", ["coattention", "late"])
def test_export_parity(tmp_path, fusion) -> None:
    torch.manual_seed(0)
    model = create_model("cadnode-effb0-cpu", **TINY, fusion=fusion)
    _wake_feedback(model)
    manifest = export_package(model, tmp_path, version="t", demo=True, training="test")
    assert manifest["parity_max_abs_diff"] <= 1e-4
    assert {p.name for p in tmp_path.iterdir()} == {"model.onnx", "model.pt2", "tokenizer.json",
                                                    "manifest.json"}
    assert set(manifest["sha256"]) == {"model.onnx", "model.pt2", "tokenizer.json"}
    # independent parity check with a different batch size than the exporter used, for the
    # ONNX graph and the torch.export program
    image, ids, mask = _inputs(b=5)
    with torch.no_grad():
        ref = model.eval()(image, ids, mask)
    for backend in ("onnxruntime", "torch"):
        engine = load_engine(tmp_path, backend, device="cpu")
        assert engine.manifest.input_size == (128, 64) and engine.manifest.heatmap_size == (4, 2)
        out = engine.predict(image.numpy(), ids.numpy(), mask.numpy())
        assert np.abs(out.cancer - torch.sigmoid(ref["cancer_logit"]).numpy()).max() <= 1e-4
        assert np.abs(out.calcification
                      - torch.sigmoid(ref["calcification_logit"]).numpy()).max() <= 1e-4
        assert np.abs(out.heatmap - ref["heatmap"][:, 0].numpy()).max() <= 1e-4
    import onnx

    graph = onnx.load(str(tmp_path / "model.onnx"))
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17


def test_export_cli_with_checkpoint(tmp_path, monkeypatch) -> None:
    import cadnode.model.export as export_mod
    import cadnode.model.factory as factory

    real = factory.get_config

    def tiny_config(name, **overrides):
        return real(name, **{**TINY, **overrides})

    monkeypatch.setattr(factory, "get_config", tiny_config)
    monkeypatch.setattr(export_mod, "get_config", tiny_config)
    torch.manual_seed(3)
    trained = factory.create_model("cadnode-effb0-cpu")
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": trained.state_dict(), "training_summary": "3 epochs on toy data"}, ckpt)
    out = tmp_path / "pkg"
    assert main(["--model", "cadnode-effb0-cpu", "--out", str(out), "--checkpoint", str(ckpt),
                 "--version", "9.9"]) == 0
    data = json.loads((out / "manifest.json").read_text())
    assert data["training"] == "3 epochs on toy data" and data["demo"] is False
    assert "notice" not in data and data["version"] == "9.9"
    image, ids, mask = _inputs(b=1)
    with torch.no_grad():
        ref = torch.sigmoid(trained.eval()(image, ids, mask)["cancer_logit"]).numpy()
    got = load_engine(out).predict(image.numpy(), ids.numpy(), mask.numpy()).cancer
    assert np.abs(got - ref).max() <= 1e-4  # the checkpoint's weights, not a fresh init
