"""Training throughput (views/s) and peak memory of the default recipe at each input size.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 .venv/bin/python -m \
        tests.bench.bench_training [--model cadnode-lite0-minilm-1024] \
        [--sizes 512x256,1024x512,2048x1024] [--steps 6] [--batch 4]

For each size the model (ImageNet EfficientNet-Lite0, frozen all-MiniLM-L6-v2, multi-stage
co-attention) takes ``--steps`` optimiser steps on random images at that size with real clinical
text, in the training loop's own configuration (AdamW, the loop's losses, gradient clipping),
after one warm-up step; activation checkpointing is on at 2048 x 1024, as the 2048 config has
it. The reference is the same model at 512 x 256 measured in the same run: the table gives each
size's time per view relative to it (4x the pixels should cost about 4x). Peak memory is the
process's peak RSS after each size (it only grows, so each row is an upper bound for that size).
Prints a Markdown table with date, machine and commit.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from cadnode.model.factory import create_model, tokenizer_for
from tests.bench.backend_timing import machine, parse_sizes
from train.loop import heatmap_mil_loss, masked_bce

TEXT = ("exam: age sixties implant no manufacturer hologic model selenia dimensions. breast: "
        "side left. view: projection cc modifiers none. acquisition: thickness medium force "
        "medium kvp medium exposure medium anode tungsten filter rhodium detector direct "
        "spacing standard intent presentation.")


def measure(name: str, size: tuple[int, int], steps: int, batch: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = create_model(name, input_size=size, checkpointing=size[0] >= 2048).train()
    tok = tokenizer_for(model.cfg)
    ids, mask = (torch.from_numpy(a) for a in tok.encode_batch([TEXT] * batch))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    targets = torch.ones(batch, 2)
    known = torch.ones(batch, 2)

    def step() -> float:
        image = torch.rand(batch, 1, *size)
        out = model(image, ids, mask)
        logits = torch.stack([out["cancer_logit"], out["calcification_logit"]], 1)
        loss = masked_bce(logits, targets, known, None) + 0.5 * heatmap_mil_loss(
            out["heatmap_logit"], targets, known, None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 2.0)
        opt.step()
        return float(loss.detach())

    step()  # warm-up: allocator, kernels
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - t0
    return {"views_per_s": steps * batch / seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cadnode-lite0-minilm-1024")
    parser.add_argument("--sizes", default="512x256,1024x512,2048x1024")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args(argv)
    torch.set_flush_denormal(True)
    sizes = parse_sizes(args.sizes)
    rows = {size: measure(args.model, size, args.steps, args.batch) for size in sizes}
    reference = rows[sizes[0]]["views_per_s"]
    print(f"Training throughput, {args.model}, batch {args.batch}, {args.steps} steps after a "
          f"warm-up; {machine()}\n")
    print("| input | views/s | s per view | relative to the first size | peak RSS MB |")
    print("|---|---|---|---|---|")
    for (h, w), r in rows.items():
        print(f"| {h} x {w} | {r['views_per_s']:.2f} | {1 / r['views_per_s']:.2f} | "
              f"{reference / r['views_per_s']:.2f}x | {r['peak_rss_mb']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
