"""The training loop: seeded, resumable, early-stopped on validation AUROC, DDP-aware.

Resuming gives the same weights as an uninterrupted run because nothing random depends on how
far the process got: the order of epoch ``e`` comes from a generator seeded with ``(seed, e)``,
text augmentation from ``(seed, e, index)``, and the checkpoint (written at the end of each
epoch, and every ``checkpoint_every`` steps inside one) holds model, optimiser, scheduler, scaler,
torch RNG state (dropout), early-stopping state, history and how many batches of the current
epoch are done (a resumed epoch skips them). Checkpoints are written to a temporary name and
renamed, so a kill while saving leaves the previous one whole.

Besides the two classification losses, image models learn their heatmap: a multiple-instance
loss on every view (the smooth maximum of the heatmap is a cancer logit) and, on positive views
whose dataset marks the lesion (synthetic, VinDr boxes, CBIS-DDSM masks), a per-cell loss.

Under ``torchrun`` (``WORLD_SIZE`` > 1) each rank takes a strided shard of the same epoch order
(padded so that all ranks step equally often), the model is wrapped in DistributedDataParallel
(gloo on CPU, NCCL on GPU); rank 0 validates, writes checkpoints and broadcasts its
early-stopping decision.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, cast

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from cadnode.model.factory import create_model
from cadnode.model.fused import FusedVLM
from cadnode.model.text_tower import PretrainedTextEncoder
from train.data import SampleDataset, pos_weights, sample_weights
from train.evaluate import TASKS, auroc

LAST, BEST = "last.pt", "best.pt"


@dataclass
class TrainConfig:
    """Optimisation settings (the model is a named factory config plus overrides)."""

    model: str = "cadnode-tiny-256"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_frac: float = 0.05
    grad_clip: float = 2.0
    seed: int = 0
    patience: int = 3  # epochs without a better validation AUROC before stopping
    imbalance: str = "pos_weight"  # pos_weight | sampler | none
    amp: str = "auto"  # auto (CUDA only) | off | bf16 | fp16
    field_dropout: float = 0.05
    report_sentence: float = 0.1
    text_reorder: float = 0.0  # probability of shuffling the fields within each text level
    image_augment: dict[str, float] | None = None  # train.data.ImageAugment fields; None: off
    channels_last: bool = False  # NHWC activations (faster convolutions on recent GPUs)
    heatmap_weight: float = 0.5  # multiple-instance loss on the heatmap; 0 leaves it untrained
    lesion_weight: float = 1.0  # per-cell loss where a positive view has marked lesion boxes
    sync_batchnorm: bool = True  # multi-GPU: batch statistics over all ranks (CUDA only)
    checkpoint_every: int | None = None  # also save last.pt every N steps inside an epoch
    max_steps_per_epoch: int | None = None
    num_workers: int = 0
    progress: bool = True

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        bad = sorted(set(raw) - known)
        if bad:
            raise ValueError(f"unknown training option(s): {bad}")
        return cls(**raw)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocator peak on a GPU, the process's peak RSS on the CPU
    (which includes the image cache: read it as an upper bound)."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def dist_info() -> tuple[int, int]:
    """(rank, world size); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def device_for(rank: int) -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local % torch.cuda.device_count())
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")


def autocast_for(cfg: TrainConfig, device: torch.device) -> tuple[Any, bool]:
    """(autocast context factory, needs GradScaler)."""
    mode = cfg.amp
    if mode == "auto":
        mode = "off" if device.type != "cuda" else (
            "bf16" if torch.cuda.is_bf16_supported() else "fp16")
    if mode == "off":
        return contextlib.nullcontext, False
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    return (lambda: torch.autocast(device.type, dtype=dtype)), mode == "fp16"


def epoch_order(n: int, seed: int, epoch: int, weights: np.ndarray | None = None,
                rank: int = 0, world: int = 1) -> list[int]:
    """This rank's sample order for one epoch (same on every rank and every resume)."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if weights is None:
        order = torch.randperm(n, generator=gen).tolist()
    else:
        w = torch.as_tensor(weights, dtype=torch.float64)
        order = torch.multinomial(w, n, replacement=True, generator=gen).tolist()
    per_rank = math.ceil(n / world)
    order += order[: per_rank * world - n]  # pad so that every rank steps equally often
    return order[rank::world]


def masked_bce(logits: torch.Tensor, targets: torch.Tensor, known: torch.Tensor,
               pos_weight: torch.Tensor | None) -> torch.Tensor:
    """Sum over tasks of the mean BCE over samples whose label is known."""
    total = logits.new_zeros(())
    for t in range(logits.shape[1]):
        pw = None if pos_weight is None else pos_weight[t]
        loss = F.binary_cross_entropy_with_logits(logits[:, t].float(), targets[:, t],
                                                  weight=known[:, t], pos_weight=pw,
                                                  reduction="sum")
        total = total + loss / known[:, t].sum().clamp(min=1.0)
    return total


#: Sharpness of the log-sum-exp pooling in :func:`heatmap_mil_loss` (large -> max, 0 -> mean).
MIL_SHARPNESS = 4.0


def lse_pool(logits: torch.Tensor, sharpness: float = MIL_SHARPNESS) -> torch.Tensor:
    """Smooth maximum of each map: (B, 1, h, w) -> (B,), equal to the value on a flat map."""
    flat = logits.flatten(1).float()
    return (torch.logsumexp(sharpness * flat, 1) - math.log(flat.shape[1])) / sharpness


def heatmap_mil_loss(heat_logit: torch.Tensor, targets: torch.Tensor, known: torch.Tensor,
                     pos_weight: torch.Tensor | None) -> torch.Tensor:
    """Multiple-instance loss that teaches the heatmap where the cancer is from view labels only.

    A view is a bag of heatmap cells: it is positive when some cell is, so the pooled (smooth
    maximum) cell logit is trained as a cancer logit. Gradient flows mostly into the cells that
    already stand out: positives raise them, negatives lower them (the highest most). No lesion
    outlines are needed, so every dataset adapter can train it.
    """
    pooled = lse_pool(heat_logit)
    return F.binary_cross_entropy_with_logits(pooled, targets[:, 0], weight=known[:, 0],
                                              pos_weight=pos_weight, reduction="sum"
                                              ) / known[:, 0].sum().clamp(min=1.0)


def lesion_targets(boxes: torch.Tensor, counts: torch.Tensor, grid: tuple[int, int]
                   ) -> torch.Tensor:
    """(B, h, w) 1/0: cells whose centre lies in a lesion box grown by half a cell (the same
    rule :func:`train.evaluate.heatmap_hit` scores); ``boxes`` (B, K, 4) are model fractions."""
    h, w = grid
    v = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    u = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    u0, v0, u1, v1 = (boxes[..., i, None, None] for i in range(4))  # (B, K, 1, 1)
    inside = ((u[None, None, None, :] >= u0 - 0.5 / w) & (u[None, None, None, :] <= u1 + 0.5 / w)
              & (v[None, None, :, None] >= v0 - 0.5 / h) & (v[None, None, :, None] <= v1 + 0.5 / h))
    real = torch.arange(boxes.shape[1])[None, :] < counts[:, None]  # (B, K)
    return (inside & real[:, :, None, None]).any(1).float()


def lesion_heatmap_loss(heat_logit: torch.Tensor, boxes: torch.Tensor,
                        counts: torch.Tensor) -> torch.Tensor:
    """Per-cell BCE on views whose cancer lesions are marked: cells on a lesion up, the rest of
    that view down, the two halves weighted equally (lesion cells are few)."""
    has = counts > 0
    if not bool(has.any()):
        return heat_logit.new_zeros(())
    logits = heat_logit[has, 0].float()
    target = lesion_targets(boxes[has].cpu(), counts[has].cpu(),
                            (logits.shape[1], logits.shape[2])).to(logits.device)
    per_cell = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    pos = (per_cell * target).sum() / target.sum().clamp(min=1.0)
    neg = (per_cell * (1 - target)).sum() / (1 - target).sum().clamp(min=1.0)
    return 0.5 * (pos + neg)


def _batches(loader: DataLoader, show: bool, desc: str, total: int) -> Iterator[Any]:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the train extra
        tqdm = None
    if tqdm is not None:
        yield from tqdm(loader, desc=desc, total=total, disable=not show, leave=False,
                        mininterval=5.0, file=sys.stderr)
        return
    start = time.time()
    for i, batch in enumerate(loader):
        if show and (i % 20 == 0 or i + 1 == total):
            print(f"{desc} {i + 1}/{total} {time.time() - start:.0f}s", file=sys.stderr)
        yield batch


@torch.no_grad()
def predict(model: nn.Module, dataset: SampleDataset, batch_size: int = 8,
            device: torch.device | None = None, show: bool = False,
            heatmaps: bool = False) -> dict[str, np.ndarray]:
    """Probabilities per view, in dataset order: {"cancer": (N,), "calcification": (N,)}, and
    with ``heatmaps`` also "heatmap": (N, h, w) probabilities on the model's grid. Small
    batches: at 2048 x 1024 a batch of 64 holds ~20 GB of activations on a CPU, for no gain."""
    device = device or torch.device("cpu")
    core = unwrap(model)
    was_training = core.training
    core.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    keys = (*TASKS, "heatmap") if heatmaps else TASKS
    out: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for batch in _batches(loader, show, "predict", len(loader)):
        res = core(batch["image"].to(device), batch["input_ids"].to(device),
                   batch["attention_mask"].to(device))
        for t in TASKS:
            out[t].append(torch.sigmoid(res[f"{t}_logit"].float()).cpu().numpy())
        if heatmaps:
            out["heatmap"].append(res["heatmap"][:, 0].float().cpu().numpy())
    core.train(was_training)
    return {t: np.concatenate(v) if v else np.zeros(0) for t, v in out.items()}


def validation_auroc(probs: dict[str, np.ndarray], dataset: SampleDataset) -> dict[str, float]:
    """View-level AUROC per task and their mean (the early-stopping criterion)."""
    result: dict[str, float] = {}
    for t in TASKS:
        labels = [getattr(s, t) for s in dataset.samples]
        keep = [i for i, v in enumerate(labels) if v is not None]
        result[t] = auroc(np.array([labels[i] for i in keep]), probs[t][keep])
    valid = [v for v in result.values() if not math.isnan(v)]
    result["mean"] = float(np.mean(valid)) if valid else float("nan")
    return result


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    inner = getattr(model, "module", model)
    return inner if isinstance(inner, nn.Module) else model


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    core = unwrap(model)
    return {k: v.detach().cpu().clone() for k, v in core.state_dict().items()}


def _save_atomic(blob: dict[str, Any], path: Path) -> None:
    """Write then rename, so a run killed while saving keeps its previous checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)


def _weights(model: FusedVLM, cfg: TrainConfig, summary: str) -> dict[str, Any]:
    """What every checkpoint holds: weights and what is needed to rebuild and describe them."""
    return {"model": _state(model), "config": asdict(cfg), "model_config": model.cfg.to_dict(),
            "training_summary": summary}


def save_last(out: Path, model: FusedVLM, opt: torch.optim.Optimizer, sched: Any, scaler: Any,
              state: dict[str, Any], cfg: TrainConfig, summary: str) -> None:
    """The resume point: weights, optimiser, schedule, scaler, dropout RNG and loop state."""
    _save_atomic({**_weights(model, cfg, summary), "optimizer": opt.state_dict(),
                  "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                  "torch_rng": torch.get_rng_state(), "state": state}, out / LAST)


def build_model(cfg: TrainConfig) -> FusedVLM:
    torch.manual_seed(cfg.seed)
    return create_model(cfg.model, **dict(cfg.model_overrides))


def train(cfg: TrainConfig, train_set: SampleDataset, val_set: SampleDataset | None,
          out_dir: str | Path, resume: bool = False, stop_after_epoch: int | None = None,
          summary: str = "", stop_after_step: int | None = None) -> dict[str, Any]:
    """Train (or resume) into ``out_dir``; returns the final state summary.

    ``stop_after_epoch`` ends the process-level run early after that epoch's checkpoint, as an
    interruption would (tests use it to prove that resume is exact); ``stop_after_step`` does the
    same at a mid-epoch checkpoint (``checkpoint_every``).
    """
    out = Path(out_dir)
    rank, world = dist_info()
    device = device_for(rank)
    if device.type == "cpu":  # denormals in activations/gradients slow CPU training ~5x here
        torch.set_flush_denormal(True)
    is_main = rank == 0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    model = build_model(cfg).to(device)
    if isinstance(model.text, PretrainedTextEncoder):
        model.text.enable_output_cache()  # a frozen tower: each distinct text runs once
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)  # type: ignore[call-overload]
    if world > 1 and device.type == "cuda" and cfg.sync_batchnorm:
        # SyncBatchNorm has no CPU kernel; under gloo each rank keeps its own batch statistics
        model = cast(FusedVLM, timm.layers.convert_sync_batchnorm(model))
    weights = sample_weights(train_set.samples) if cfg.imbalance == "sampler" else None
    pw = pos_weights(train_set.samples).to(device) if cfg.imbalance == "pos_weight" else None
    steps_per_epoch = math.ceil(math.ceil(len(train_set) / world) / cfg.batch_size)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    total_steps = max(1, steps_per_epoch * cfg.epochs)
    warmup = max(1, int(cfg.warmup_frac * total_steps))
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    autocast, use_scaler = autocast_for(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    state: dict[str, Any] = {"epoch": 0, "step": 0, "best": -math.inf, "best_epoch": -1,
                             "bad_epochs": 0, "history": [], "stopped_early": False}
    if resume:
        ckpt = torch.load(out / LAST, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["torch_rng"])
        state = ckpt["state"]
    else:
        torch.manual_seed(cfg.seed + 1)  # dropout stream, independent of init
    # text-only models derive their flat heatmap from the cancer logit: nothing to teach
    mil = cfg.heatmap_weight > 0 and model.image is not None
    dense = cfg.lesion_weight > 0 and model.image is not None
    ddp: nn.Module = model
    if world > 1:
        # without the MIL term, batches with no marked lesion leave the heatmap head unused
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=model.image is not None and not mil)

    show = cfg.progress and is_main
    start_epoch = int(state["epoch"])
    for epoch in range(start_epoch, cfg.epochs):
        if state["stopped_early"]:
            break
        t0 = time.time()
        train_set.set_epoch(epoch)
        done = int(state.get("epoch_step", 0))  # batches of this epoch before a mid-epoch stop
        order = epoch_order(len(train_set), cfg.seed, epoch, weights, rank, world)
        order = order[done * cfg.batch_size:]
        loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=order,
                            num_workers=cfg.num_workers,
                            generator=torch.Generator().manual_seed(cfg.seed + epoch))
        ddp.train()
        losses: list[float] = list(state.get("epoch_losses", []))
        views = 0  # seen by this process in this run of the epoch (throughput)
        for i, batch in enumerate(_batches(loader, show, f"epoch {epoch + 1}/{cfg.epochs}",
                                           steps_per_epoch - done), start=done):
            if i >= steps_per_epoch:
                break
            with autocast():
                res = ddp(batch["image"].to(device, memory_format=memory_format),
                          batch["input_ids"].to(device), batch["attention_mask"].to(device))
                logits = torch.stack([res["cancer_logit"], res["calcification_logit"]], 1)
            targets, known = batch["targets"].to(device), batch["known"].to(device)
            loss = masked_bce(logits, targets, known, pw)
            if mil:
                loss = loss + cfg.heatmap_weight * heatmap_mil_loss(
                    res["heatmap_logit"], targets, known, None if pw is None else pw[0])
            if dense:
                loss = loss + cfg.lesion_weight * lesion_heatmap_loss(
                    res["heatmap_logit"], batch["lesion_boxes"], batch["lesion_count"])
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            state["step"] += 1
            views += int(batch["index"].shape[0])
            losses.append(float(loss.detach()))
            if (cfg.checkpoint_every and (i + 1) % cfg.checkpoint_every == 0
                    and i + 1 < steps_per_epoch):
                state["epoch_step"], state["epoch_losses"] = i + 1, losses
                if is_main:
                    save_last(out, model, opt, sched, scaler, state, cfg, summary)
                if stop_after_step is not None and state["step"] >= stop_after_step:
                    return {"state": state, "model": model, "out": out}
        state["epoch_step"], state["epoch_losses"] = 0, []
        seconds = time.time() - t0
        entry: dict[str, Any] = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)),
                                 "seconds": round(seconds, 1),
                                 "views_per_s": round(views * world / max(seconds, 1e-9), 2),
                                 "peak_memory_mb": peak_memory_mb(device)}
        improved = True
        if val_set is not None and is_main:
            val = validation_auroc(predict(model, val_set, device=device), val_set)
            entry["val_auroc"] = val
            # a validation split that cannot rank (one class in every task) keeps the newest
            # weights, as training without a validation split does
            improved = val["mean"] > state["best"] or not math.isfinite(val["mean"])
        if world > 1:
            flag = torch.tensor([1.0 if improved else 0.0])
            dist.broadcast(flag, 0)
            improved = bool(flag.item())
        if improved:
            mean = entry.get("val_auroc", {}).get("mean", state["best"])
            state["best"] = mean if math.isfinite(mean) else state["best"]
            state["best_epoch"] = epoch + 1
            state["bad_epochs"] = 0
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        state["history"].append(entry)
        if state["bad_epochs"] >= cfg.patience:
            state["stopped_early"] = True
        if is_main:
            print(json.dumps(entry), file=sys.stderr, flush=True)
            if improved:
                _save_atomic({**_weights(model, cfg, summary), "epoch": epoch + 1}, out / BEST)
            save_last(out, model, opt, sched, scaler, state, cfg, summary)
            (out / "history.json").write_text(json.dumps(state, indent=2) + "\n",
                                              encoding="utf-8")
        if world > 1:
            dist.barrier()
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            break
    return {"state": state, "model": model, "out": out}
