"""``python -m train train|resume|evaluate|ablate|export|synth`` (see docs/training.md).

Multi-GPU (or multi-process CPU) data parallel: ``torchrun --nproc_per_node N -m train train ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

DEFAULT_ABLATION = Path(__file__).parent / "configs" / "ablation-synthetic.json"


def _threads() -> None:
    """Respect an explicit OMP_NUM_THREADS; torch otherwise takes every core."""
    import torch

    torch.set_flush_denormal(True)  # denormals slow CPU training and inference ~5x here
    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def _apply_sets(config: dict, sets: Sequence[str]) -> dict:
    """``--set train.epochs=3`` style overrides (values parsed as JSON when they parse)."""
    for item in sets:
        key, _, raw = item.partition("=")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = config
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return config


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train one model from a config")
    p_train.add_argument("--config", type=Path, required=True)
    p_train.add_argument("--out", type=Path, required=True, help="run folder")
    p_train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p_train.add_argument("--stop-after-epoch", type=int, help=argparse.SUPPRESS)
    p_resume = sub.add_parser("resume", help="continue a run from its last checkpoint")
    p_resume.add_argument("--run", type=Path, required=True)
    p_eval = sub.add_parser("evaluate", help="report of a run's best checkpoint")
    p_eval.add_argument("--run", type=Path, required=True)
    p_eval.add_argument("--split", default=None, help="train | val | test (default: config)")
    p_eval.add_argument("--checkpoint", default="best.pt")
    p_abl = sub.add_parser("ablate", help="image-only, text-only, late fusion and co-attention "
                                          "on one split, with text-shuffle and resolution "
                                          "controls")
    p_abl.add_argument("--config", type=Path, default=DEFAULT_ABLATION)
    p_abl.add_argument("--out", type=Path, required=True)
    p_abl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p_exp = sub.add_parser("export", help="model package (ONNX + tokenizer + manifest)")
    p_exp.add_argument("--run", type=Path, required=True)
    p_exp.add_argument("--out", type=Path, required=True)
    p_exp.add_argument("--version", default="0.1.0")
    p_exp.add_argument("--demo", action="store_true", help="mark as not for clinical use")
    p_exp.add_argument("--checkpoint", default="best.pt")
    p_syn = sub.add_parser("synth", help="write the synthetic benchmark as DICOM + labels.csv")
    p_syn.add_argument("--out", type=Path, required=True)
    p_syn.add_argument("--n", type=int, default=100, help="number of exams (4 views each)")
    p_syn.add_argument("--seed", type=int, default=0)
    p_syn.add_argument("--shape", type=int, nargs=2, default=(2048, 1024),
                       metavar=("ROWS", "COLUMNS"), help="image size (default 2048 1024)")
    args = parser.parse_args(argv)

    if args.command == "synth":
        from train.synthetic import SyntheticConfig, write_dataset

        labels = write_dataset(SyntheticConfig(n_exams=args.n, seed=args.seed,
                                               shape=tuple(args.shape)), args.out)
        print(json.dumps({"labels": str(labels), "views": 4 * args.n}))
        return 0

    _threads()
    from train import experiment as ex

    if args.command == "train":
        config = _apply_sets(ex.load_config(args.config), args.set)
        result = ex.run_train(config, args.out, stop_after_epoch=args.stop_after_epoch)
        _print_result(result)
    elif args.command == "resume":
        config = json.loads((args.run / ex.CONFIG_NAME).read_text(encoding="utf-8"))
        _print_result(ex.run_train(config, args.run, resume=True))
    elif args.command == "evaluate":
        report = ex.evaluate_run(args.run, split=args.split, checkpoint=args.checkpoint)
        print(json.dumps(report["levels"]["view"], indent=2))
    elif args.command == "ablate":
        config = _apply_sets(ex.load_config(args.config), args.set)
        table = ex.run_ablation(config, args.out)
        print(table["markdown"])
        return 0 if table["passed"] else 3
    elif args.command == "export":
        manifest = ex.export_run(args.run, args.out, version=args.version, demo=args.demo,
                                 checkpoint=args.checkpoint)
        print(json.dumps({"package": str(args.out), "training": manifest["training"],
                          "parity_max_abs_diff": manifest["parity_max_abs_diff"]}, indent=2))
    return 0


def _print_result(result: dict) -> None:
    state = result["state"]
    summary = {"epochs": state["epoch"], "best_val_auroc": state["best"],
               "best_epoch": state["best_epoch"], "stopped_early": state["stopped_early"]}
    if "report" in result:
        summary["test_view_auroc"] = {t: m["auroc"] for t, m in
                                      result["report"]["levels"]["view"].items()}
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    sys.exit(main())
