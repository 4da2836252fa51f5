"""Preprocess: ms per view from decoded pixels to the model tensor, and where it goes.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 .venv/bin/python -m \
        tests.bench.bench_preprocess [--runs 3] [--sizes 512x256,1024x512,2048x1024]

The four real views of the demo exam (CBIS-DDSM, about 4500 x 2900, 16-bit) decoded once, then
:func:`cadnode.dicom.pixels.prepare_image` (the pipeline the packaged model was trained with)
from those pixels at each model input size: breast mask, crop, intensity window, resize, the
display image. The split comes from a profile of the same calls (cumulative time of the
pipeline's steps). The references, measured in the same run: decoding one view (RLE, as the
node reads it) and, at the packaged model's own size, the model call on the 4 views (issue 16's
target: decode + preprocess of a study no longer than the model call).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom

from cadnode.demo import write_demo_study
from cadnode.dicom.pixels import decode_pixels, prepare_image
from cadnode.dicom.views import detect_view
from cadnode.runtime import DEFAULT_MODEL_PACKAGE, read_manifest
from tests.bench import report
from tests.bench.backend_timing import parse_sizes
from tests.bench.bench_turnaround import model_seconds
from tests.bench.report import Table

#: pipeline steps (functions of cadnode.dicom.pixels) shown in the split
STEPS = {
    "_otsu": "threshold (Otsu)",
    "_erode": "mask erosion",
    "_largest_component": "largest component",
    "percentile": "intensity window (percentiles)",
    "_padded_crop": "crop",
    "_resize": "resize (model input and display)",
    "_soft_knee": "soft knee",
}


def split(calls: Sequence[tuple[pydicom.Dataset, str | None, np.ndarray]], size: tuple[int, int],
          pipeline: str) -> dict[str, float]:
    """Per-view ms of each pipeline step (cumulative, from a profile of one pass)."""
    prof = cProfile.Profile()
    prof.enable()
    for ds, laterality, pixels in calls:
        prepare_image(ds, size, laterality, pixels=pixels, pipeline=pipeline)
    prof.disable()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    out = dict.fromkeys(STEPS.values(), 0.0)
    for (filename, _line, func), (_cc, _nc, _tt, ct, _callers) in stats.items():
        if func in STEPS and ("pixels.py" in filename or func == "percentile"):
            out[STEPS[func]] += 1000 * ct / len(calls)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", type=int, default=3, help="timed passes over the 4 views")
    p.add_argument("--sizes", default="512x256,1024x512,2048x1024",
                   help="model input sizes HxW (default 512x256,1024x512,2048x1024)")
    p.add_argument("--model-runs", type=int, default=5, help="model-only calls timed")


def run(args: argparse.Namespace) -> Table:
    table = Table("preprocess", "Preprocess: ms per view, decoded pixels to model tensor",
                  "python -m tests.bench.bench_preprocess",
                  ["input HxW", "step", "ms per view", "share"])
    manifest = read_manifest(DEFAULT_MODEL_PACKAGE)
    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        files = write_demo_study(Path(tmp) / "demo")
        datasets = [pydicom.dcmread(f) for f in files]
        start = time.perf_counter()
        decoded = [decode_pixels(ds) for ds in datasets]
        decode_ms = 1000 * (time.perf_counter() - start) / len(files)
        calls = [(ds, detect_view(ds).laterality, px)
                 for ds, px in zip(datasets, decoded, strict=True)]
        model = model_seconds(None, "onnxruntime", files, args.model_runs)
    for size in parse_sizes(str(args.sizes)):
        laps = []
        for _ in range(args.runs + 1):  # the first pass warms up
            start = time.perf_counter()
            for ds, laterality, px in calls:
                prepare_image(ds, size, laterality, pixels=px, pipeline=manifest.pixel_pipeline)
            laps.append(1000 * (time.perf_counter() - start) / len(calls))
        total = statistics.median(laps[1:])
        label = f"{size[0]}x{size[1]}"
        table.add(label, "prepare_image, whole", total, "100 %")
        for step, ms in split(calls, size, manifest.pixel_pipeline).items():
            table.add(label, f"  {step}", ms, f"{100 * ms / total:.0f} %")
    h, w = manifest.input_size
    table.add("", "reference: decode one view (RLE, decode_pixels)", decode_ms, "")
    table.add(f"{h}x{w}", f"reference: model call, 4 views ({manifest.name}), per view",
              1000 * model / len(files), "")
    table.notes.append(
        f"The 4 demo views, median of {args.runs} passes after a warm-up; the split is the "
        "cumulative time of each step in a profile of one more pass (profiling slows every "
        "step alike, so read it as shares; steps may nest). The model reference is ONNX "
        "Runtime on this CPU, the packaged model at its own input size.")
    return table


if __name__ == "__main__":
    report.main(__doc__, add_arguments, run)
