"""torch model -> model package (model.onnx + model.pt2 + tokenizer.json + manifest.json),
parity-checked.

``python -m cadnode.model.export --model cadnode-effb0-cpu --out DIR [--checkpoint CKPT]
[--version V] [--demo]``

The graph takes images in [0, 1] and applies the intensity normalisation itself (recorded in the
manifest), and outputs probabilities: ``cancer`` (B,), ``calcification`` (B,), ``heatmap`` (B,h,w).
Only the batch axis is dynamic. ``model.pt2`` is the same wrapper as a ``torch.export`` program
(the torch backend's reference, which serving loads without this module). After writing, the
package is opened with the node's own engines (ONNX Runtime and the torch program, CPU) and
compared with torch on random real-sized inputs; a difference above ``PARITY_TOLERANCE`` fails
the export.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cadnode.model.external import externalise
from cadnode.model.factory import create_model, get_config, tokenizer_for
from cadnode.model.fused import FusedVLM, ProbabilityWrapper
from cadnode.model.text_tower import SCRATCH, PretrainedTextEncoder, tower_source
from cadnode.runtime.manifest import (
    DEMO_NOTICE,
    FORMAT_VERSION,
    MANIFEST_NAME,
    MODEL_NAME,
    OUTPUT_NAMES,
    TEXT_TOWER_NAME,
    TOKENIZER_NAME,
    TORCH_PROGRAM_NAME,
    sha256,
)
from cadnode.runtime.types import Engine
from cadnode.text.clinical import TEXT_TEMPLATE_VERSION
from cadnode.text.tokenizer import ClinicalTokenizer

PARITY_TOLERANCE = 1e-4
DEFAULT_OPSET = 17
DEFAULT_THRESHOLDS = {"cancer": 0.5, "calcification": 0.5}
_PARITY_TEXTS = (
    "exam: age fifties implant no manufacturer hologic model selenia dimensions. breast: side "
    "left. view: projection cc modifiers none thickness medium force medium kvp medium exposure "
    "medium anode tungsten filter rhodium intent presentation.",
    "exam: age unknown implant unknown manufacturer unknown model unknown. breast: side right. "
    "view: projection mlo modifiers unknown thickness unknown force unknown kvp unknown exposure "
    "unknown anode unknown filter unknown intent unknown.",
)


def load_checkpoint(model: FusedVLM, path: str | Path) -> dict[str, Any]:
    """Load full-model weights (a state_dict, or a dict with 'model'/'state_dict'); strict."""
    blob = torch.load(str(path), map_location="cpu", weights_only=True)
    meta: dict[str, Any] = {}
    state = blob
    if isinstance(blob, dict):
        for key in ("model", "state_dict"):
            if isinstance(blob.get(key), dict):
                state = blob[key]
                meta = {k: v for k, v in blob.items() if k != key and isinstance(v, (str, int,
                                                                                      float))}
                break
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    return meta


def export_onnx(model: FusedVLM, path: Path, opset: int = DEFAULT_OPSET, batch: int = 2) -> None:
    """Legacy (TorchScript) exporter: the most robust path for timm ConvNets."""
    cfg = model.cfg
    h, w = cfg.input_size
    wrapper = ProbabilityWrapper(model).eval()
    image = torch.rand(batch, 1, h, w)
    ids = torch.randint(5, 64, (batch, cfg.max_text_len), dtype=torch.int64)
    mask = torch.ones(batch, cfg.max_text_len, dtype=torch.int64)
    axes = {name: {0: "batch"} for name in (*ProbabilityWrapper.input_names, *OUTPUT_NAMES)}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (image, ids, mask), str(path),
                          input_names=list(ProbabilityWrapper.input_names),
                          output_names=list(OUTPUT_NAMES), dynamic_axes=axes,
                          opset_version=opset, do_constant_folding=True, dynamo=False)


def export_torch_program(model: FusedVLM, path: Path, max_views: int = 64) -> None:
    """The probability wrapper as a ``torch.export`` program with a dynamic batch of 1 to
    ``max_views`` views, traced in eval mode on the CPU (serving moves it to a GPU)."""
    cfg = model.cfg
    h, w = cfg.input_size
    wrapper = ProbabilityWrapper(model).eval()
    image = torch.rand(2, 1, h, w)
    ids = torch.randint(5, 64, (2, cfg.max_text_len), dtype=torch.int64)
    mask = torch.ones(2, cfg.max_text_len, dtype=torch.int64)
    batch = torch.export.Dim("batch", min=1, max=max_views)
    with torch.no_grad():
        program = torch.export.export(wrapper, (image, ids, mask),
                                      dynamic_shapes=({0: batch}, {0: batch}, {0: batch}))
    torch.export.save(program, str(path))


def parity(model: FusedVLM, package: Path, tokenizer: ClinicalTokenizer, batch: int = 3,
           seed: int = 1) -> float:
    """Max |engine - torch| over all outputs on random real-sized inputs (batch != trace), for
    ONNX Runtime and, when the package has one, the torch program."""
    from cadnode.runtime.onnx import OnnxEngine

    gen = torch.Generator().manual_seed(seed)
    h, w = model.cfg.input_size
    image = torch.rand(batch, 1, h, w, generator=gen)
    texts = [_PARITY_TEXTS[i % len(_PARITY_TEXTS)] for i in range(batch)]
    ids_np, mask_np = tokenizer.encode_batch(texts)
    with torch.no_grad():
        ref = ProbabilityWrapper(model).eval()(image, torch.from_numpy(ids_np),
                                               torch.from_numpy(mask_np))
    worst = 0.0
    engines: list[Engine] = [OnnxEngine(package)]
    if (package / TORCH_PROGRAM_NAME).is_file():
        from cadnode.runtime.torch_program import TorchEngine

        engines.append(TorchEngine(package, device="cpu"))
    for engine in engines:
        out = engine.predict(image.numpy(), ids_np, mask_np)
        got = (out.cancer, out.calcification, out.heatmap)
        worst = max(worst, *(float(np.max(np.abs(g - r.numpy())))
                             for g, r in zip(got, ref, strict=True)))
    return worst


def export_package(model: FusedVLM, out: str | Path, *, version: str, demo: bool,
                   training: str, opset: int = DEFAULT_OPSET,
                   thresholds: dict[str, float] | None = None,
                   tolerance: float = PARITY_TOLERANCE,
                   torch_program: bool = True,
                   domain: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the package files into ``out`` (``model.pt2`` too unless ``torch_program`` is
    False) and check parity; returns the manifest. ``domain`` is the training domain, as
    ``cadnode.jobs.domain.domain_from_views(...).as_json()`` computes it from the training
    views; without it the node flags every view as outside an unknown domain."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    cfg = model.cfg
    tokenizer = tokenizer_for(cfg)
    if cfg.text_encoder == SCRATCH and tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model embeds "
                         f"only {cfg.vocab_size}")
    tokenizer.save(out / TOKENIZER_NAME)
    export_onnx(model, out / MODEL_NAME, opset=opset)
    files = [MODEL_NAME, TOKENIZER_NAME]
    tower: dict[str, Any] | None = None
    (out / TEXT_TOWER_NAME).unlink(missing_ok=True)
    if isinstance(model.text, PretrainedTextEncoder):
        tower = externalise(out / MODEL_NAME, model.text.frozen_parameters(), TEXT_TOWER_NAME)
        tower["source"] = tower_source(cfg.text_encoder, cfg.text_encoder_path)
        tower["tuning"] = cfg.text_tuning
        files.append(TEXT_TOWER_NAME)
    if torch_program:
        export_torch_program(model, out / TORCH_PROGRAM_NAME)
        files.append(TORCH_PROGRAM_NAME)
    else:
        (out / TORCH_PROGRAM_NAME).unlink(missing_ok=True)
    h, w = cfg.input_size
    stride = model.heatmap_stride
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "name": cfg.name,
        "version": version,
        "input_size": [h, w],
        "pixel_pipeline": str(cfg.pixel_pipeline),
        "normalisation": {"input_range": [0, 1], "mean": cfg.image_mean, "std": cfg.image_std,
                          "applied_in_graph": True,
                          "description": "feed float32 in [0, 1]; the graph computes "
                                         "(x - mean) / std"},
        "max_text_len": cfg.max_text_len,
        "text_template_version": TEXT_TEMPLATE_VERSION,
        "inputs": list(ProbabilityWrapper.input_names),
        "outputs": list(OUTPUT_NAMES),
        "heatmap_size": [-(-h // stride), -(-w // stride)],
        "thresholds": dict(thresholds or DEFAULT_THRESHOLDS),
        "demo": bool(demo),
        "training": training,
        "architecture": {k: v for k, v in cfg.to_dict().items()
                         if k not in ("backbone_checkpoint", "extra")},
        "opset": opset,
        "sha256": {name: sha256(out / name) for name in files},
    }
    if demo:
        manifest["notice"] = DEMO_NOTICE
    if domain is not None:
        manifest["domain"] = domain
    if tower is not None:
        manifest["text_tower"] = tower
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    diff = parity(model, out, tokenizer)
    if not diff <= tolerance:
        raise RuntimeError("parity failed (ONNX Runtime or the torch program vs torch): max abs "
                           f"diff {diff:.3g} > {tolerance:g}")
    manifest["parity_max_abs_diff"] = float(f"{diff:.3g}")
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cadnode.model.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="named config, e.g. cadnode-effb0-cpu")
    parser.add_argument("--out", required=True, type=Path, help="package folder to write")
    parser.add_argument("--checkpoint", type=Path, help="full-model weights (.pt); none = random")
    parser.add_argument("--version", default="0.0.0-dev")
    parser.add_argument("--demo", action="store_true", help="mark as not for clinical use")
    parser.add_argument("--seed", type=int, default=0, help="random init seed (no checkpoint)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument("--training", help="training summary for the manifest")
    parser.add_argument("--no-torch-program", action="store_true",
                        help=f"leave out {TORCH_PROGRAM_NAME} (the torch backend's program)")
    args = parser.parse_args(argv)
    if args.opset < 17:
        parser.error("opset must be >= 17")

    torch.manual_seed(args.seed)
    get_config(args.model)  # fail fast on unknown names
    model = create_model(args.model)
    if args.checkpoint:
        meta = load_checkpoint(model, args.checkpoint)
        training = args.training or str(meta.get("training_summary")
                                        or f"trained weights from {args.checkpoint.name}")
    else:
        training = args.training or f"untrained: random initialisation (seed {args.seed})"
    manifest = export_package(model, args.out, version=args.version, demo=args.demo,
                              training=training, opset=args.opset,
                              torch_program=not args.no_torch_program)
    sizes = {p.name: p.stat().st_size for p in sorted(args.out.iterdir()) if p.is_file()}
    print(json.dumps({"package": str(args.out), "files": sizes,
                      "parity_max_abs_diff": manifest["parity_max_abs_diff"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
