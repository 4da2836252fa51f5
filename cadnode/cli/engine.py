"""``cadnode engine``: model repositories and engines for GPU servers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cadnode.config import Settings
from cadnode.runtime.enum import PRECISIONS, Backend


def cmd_engine(settings: Settings, args: argparse.Namespace) -> int:
    """The ``engine`` subcommands; whatever stops one is one line on stderr, exit 2."""
    from cadnode.runtime import DEFAULT_MODEL_PACKAGE, BackendUnavailable

    package = args.package or settings.model or str(DEFAULT_MODEL_PACKAGE)
    actions = {"build": _engine_build, "quantize": _engine_quantize,
               "triton-repo": _engine_triton_repo}
    try:
        return actions[args.engine_command](settings, args, package)
    except ImportError as exc:
        extra = " (pip install 'cadnode[triton]')" if (exc.name or "").startswith("tritonclient") \
            else ""
        print(f"cadnode engine {args.engine_command}: needs the Python module {exc.name}{extra}",
              file=sys.stderr)
    except (BackendUnavailable, ValueError, OSError) as exc:
        print(f"cadnode engine {args.engine_command}: {exc}", file=sys.stderr)
    return 2


def _engine_triton_repo(settings: Settings, args: argparse.Namespace, package: str) -> int:
    from trt_engines.triton_repo import RepositoryOptions, write_repository

    options = RepositoryOptions(platform=args.platform, max_views=args.max_views, kind=args.kind)
    folder = write_repository(package, args.out, options, plan=args.plan)
    print(f"wrote {folder / 'config.pbtxt'} and {folder / str(options.version)}/")
    return 0


def _engine_build(settings: Settings, args: argparse.Namespace, package: str) -> int:
    from trt_engines.build import build_engine

    plan = build_engine(package, home=settings.home, precision=args.precision,
                        max_views=args.max_views or settings.max_views,
                        workspace_mb=args.workspace_mb,
                        calibration=Path(args.calibration) if args.calibration else None)
    print(f"engine {plan}")
    return 0


def _engine_quantize(settings: Settings, args: argparse.Namespace, package: str) -> int:
    """Exit 1 when the int8 model was refused (the summary says why)."""
    from trt_engines.quantize import quantize_package

    report = quantize_package(
        package, home=settings.home, max_auroc_drop=args.max_auroc_drop, method=args.method,
        benchmark=Path(args.benchmark) if args.benchmark else None,
        calibration=Path(args.calibration) if args.calibration else None)
    print(report.summary())
    return 0 if report.kept else 1



def register(sub: Any, common: argparse.ArgumentParser) -> None:
    e = sub.add_parser("engine", parents=[common],
                        help="model repositories and engines for GPU servers")
    esub = e.add_subparsers(dest="engine_command", required=True)
    t = esub.add_parser("triton-repo", parents=[common],
                        help="a Triton model repository for a model package",
                        description="Write OUT/<model>/config.pbtxt and OUT/<model>/1/ for a "
                        "Triton Inference Server (see trt_engines/README.md).")
    t.add_argument("--package", default=None, help="model package (default: CADNODE_MODEL, "
                   "else the packaged demonstration model)")
    t.add_argument("--out", required=True, help="the model repository folder")
    t.add_argument("--platform", default="onnxruntime_onnx",
                   choices=["onnxruntime_onnx", "tensorrt_plan"])
    t.add_argument("--plan", default=None, help="the TensorRT engine, for tensorrt_plan")
    t.add_argument("--max-views", type=int, default=8, help="max_batch_size (views)")
    t.add_argument("--kind", default="gpu", choices=["gpu", "cpu"], help="instance_group kind")
    b = esub.add_parser("build", parents=[common],
                        help="a TensorRT engine for this GPU from a package's ONNX",
                        description="Build (or find up to date) the TensorRT plan of a model "
                        "package for this GPU and TensorRT version, under CADNODE_HOME/engines "
                        "(see trt_engines/README.md). Needs an NVIDIA GPU, TensorRT and "
                        "cuda-python.")
    b.add_argument("--package", default=None, help="model package (default: CADNODE_MODEL, "
                   "else the packaged demonstration model)")
    b.add_argument("--precision", default="fp16", choices=[p.value for p in
                                                           PRECISIONS[Backend.TENSORRT]])
    b.add_argument("--fp16", dest="precision", action="store_const", const="fp16",
                   help="same as --precision fp16 (the default)")
    b.add_argument("--int8", dest="precision", action="store_const", const="int8",
                   help="same as --precision int8 (needs --calibration)")
    b.add_argument("--calibration", default=None,
                   help="int8: a folder of this site's own DICOM mammograms")
    b.add_argument("--max-views", type=int, default=None,
                   help="largest batch of the profile (default: CADNODE_MAX_VIEWS)")
    b.add_argument("--workspace-mb", type=int, default=4096, help="builder workspace limit")
    q = esub.add_parser("quantize", parents=[common],
                        help="an int8 ONNX model for CPUs, kept only if it scores "
                        "the benchmark as well as fp32",
                        description="Quantise a package's model.onnx to int8 with ONNX Runtime "
                        "and keep it under CADNODE_HOME/engines only if view AUROC (cancer and "
                        "calcification) stays within --max-auroc-drop of fp32 on the benchmark; "
                        "CADNODE_PRECISION=int8 then serves it (see trt_engines/README.md).")
    q.add_argument("--package", default=None, help="model package (default: CADNODE_MODEL, "
                   "else the packaged demonstration model)")
    q.add_argument("--benchmark", default=None, help="a labelled DICOM folder (labels.csv as "
                   "train/synthetic.py writes it); default: a held-out synthetic set")
    q.add_argument("--calibration", default=None, help="DICOM files for static int8 ranges "
                   "(default: a small synthetic set)")
    q.add_argument("--max-auroc-drop", type=float, default=0.005)
    q.add_argument("--method", default="auto", choices=["auto", "dynamic", "static"])
    e.set_defaults(func=cmd_engine)
