"""Timing, FLOPs, peak and parity shared by the backend benchmarks, so that the CPU benchmark
(``tests/bench/bench_backends.py``) and the GPU check (``tests/gpu/check.py``) measure and report
the same things the same way.

A *study* is the 4-view exam run as one batch (B=4), the unit the worker runs. Its time is that
of one ``engine.predict`` on host arrays, so a GPU's copies in and out are in it, as in the node.
FLOPs are counted with ``torch.utils.flop_counter`` on the eager model (convolutions, matrix
products and attention; element-wise work is not counted), and the peak is a large matrix
product timed with torch on the same device, so "fraction of peak" says how far a backend is from
what that device's matrix units do at their best. torch, timm and ``cadnode.model`` are imported
only inside the functions that need them: the GPU check must start, and say what is missing,
without them.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from cadnode.runtime.types import ViewOutputs

REPO = Path(__file__).resolve().parents[2]
#: The input sizes benchmarked: the demo package's, the CPU default's and the GPU config's.
SIZES: tuple[tuple[int, int], ...] = ((512, 256), (1024, 512), (2048, 1024))
VIEWS = 4
OUTPUTS = ("cancer", "calcification", "heatmap")
#: Where a commit is recorded when the tree travels without .git (tests/gpu/prepare.sh).
COMMIT_FILE = REPO / ".gpu-vendor" / "commit.txt"

Size = tuple[int, int]


def parse_sizes(text: str) -> list[Size]:
    """"512x256,1024x512" -> [(512, 256), (1024, 512)] (height x width)."""
    sizes = []
    for item in text.split(","):
        h, _, w = item.strip().lower().partition("x")
        if not (h.isdigit() and w.isdigit()):
            raise ValueError(f"size {item!r} is not HEIGHTxWIDTH, e.g. 1024x512")
        sizes.append((int(h), int(w)))
    return sizes


def size_label(size: Size) -> str:
    return f"{size[0]}x{size[1]}"


@dataclass
class Result:
    """One backend x precision x size: measured, skipped (with the reason) or failed."""

    backend: str
    precision: str
    device: str
    size: str
    variant: str = ""  # e.g. "reduce-overhead" (torch.compile)
    status: str = "measured"  # measured | skipped | failed
    reason: str = ""
    providers: list[str] = field(default_factory=list)
    runs: int = 0
    median_ms: float | None = None
    p90_ms: float | None = None
    studies_per_s: float | None = None
    #: the reference's median ms / this one's (> 1: faster than the reference)
    speed_ratio: float | None = None
    gflop_per_study: float | None = None
    achieved_gflops: float | None = None
    #: achieved GFLOP/s over the measured matrix-product peak of this precision on this device
    fraction_of_peak: float | None = None
    parity: dict[str, float] = field(default_factory=dict)  # max |this - reference| per output
    tolerance: float | None = None
    passed: bool | None = None

    @property
    def label(self) -> str:
        return " ".join(p for p in (self.backend, self.precision, self.device, self.variant) if p)


def build_model(name: str, size: Size, seed: int = 0) -> Any:
    """The named architecture at ``size``, random weights with the heads drawn from N(0, 0.5)
    so that views score differently and parity compares something (as the parity tests do)."""
    import torch

    from cadnode.model.factory import create_model

    torch.manual_seed(seed)
    model = create_model(name, input_size=size).eval()
    with torch.no_grad():
        for head in (model.heads.cancer, model.heads.calcification):
            head.weight.normal_(0, 0.5)
    return model


def package_folder(cache: Path, name: str, size: Size, seed: int = 0) -> Path:
    return cache / f"{name}-{size_label(size)}-seed{seed}"


def package(cache: Path, name: str, size: Size, seed: int = 0) -> tuple[Path, Any]:
    """A package of ``name`` at ``size`` under ``cache`` (exported once, then reused: the
    weights are kept beside it) and the eager model with the same weights."""
    import torch

    from cadnode.model.export import export_package

    folder = package_folder(cache, name, size, seed)
    weights = folder / "weights.pt"
    model = build_model(name, size, seed)
    if weights.is_file() and (folder / "manifest.json").is_file():
        model.load_state_dict(torch.load(weights, weights_only=True))
        return folder, model
    export_package(model, folder, version=f"bench-{size_label(size)}", demo=True,
                   training="random initialisation (heads N(0, 0.5)), for backend benchmarks")
    torch.save(model.state_dict(), weights)  # last: its presence means the package is whole
    return folder, model


def eager_outputs(model: Any, images: np.ndarray, input_ids: np.ndarray,
                  attention_mask: np.ndarray) -> ViewOutputs:
    """torch fp32 eager on the CPU: the module itself, not any engine under test."""
    import torch

    from cadnode.model.fused import ProbabilityWrapper

    with torch.inference_mode():
        out = ProbabilityWrapper(model).eval()(torch.from_numpy(images),
                                               torch.from_numpy(input_ids),
                                               torch.from_numpy(attention_mask))
    cancer, calc, heat = (o.float().numpy() for o in out)
    return ViewOutputs(cancer.reshape(-1), calc.reshape(-1), heat)


def count_flops(model: Any, size: Size, text_len: int) -> float:
    """FLOPs of one study: one view counted on the eager model, times VIEWS (the work is per
    view; counting one keeps this quick at 2048 x 1024 on a small CPU)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cadnode.model.fused import ProbabilityWrapper

    image = torch.rand(1, 1, *size)
    ids = torch.randint(5, 64, (1, text_len), dtype=torch.int64)
    mask = torch.ones(1, text_len, dtype=torch.int64)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        ProbabilityWrapper(model).eval()(image, ids, mask)
    return float(counter.get_total_flops()) * VIEWS


def measure_peak(device: str = "cpu", precision: str = "fp32", n: int = 0,
                 seconds: float = 1.0) -> float:
    """GFLOP/s of an n x n x n matrix product in ``precision`` on ``device`` with torch (TF32
    off for fp32 on CUDA): the best of repeated timings over about ``seconds``."""
    import torch

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    cuda = device == "cuda"
    n = n or (8192 if cuda else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.matmul(a, b)
    sync()
    best = math.inf
    stop = time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        torch.matmul(a, b)
        sync()
        best = min(best, time.perf_counter() - start)
        if time.perf_counter() > stop:
            break
    return 2.0 * n**3 / best / 1e9


def time_study(predict: Callable[[], object], warmup: int, runs: int,
               deadline: float | None = None) -> list[float]:
    """Seconds of each of ``runs`` timed calls after ``warmup`` untimed ones; stops early (after
    at least one timed call) once ``time.monotonic()`` passes ``deadline``."""
    for _ in range(warmup):
        predict()
    samples: list[float] = []
    for _ in range(runs):
        start = time.perf_counter()
        predict()
        samples.append(time.perf_counter() - start)
        if deadline is not None and time.monotonic() > deadline:
            break
    return samples


def max_abs_diff(got: ViewOutputs, ref: ViewOutputs) -> dict[str, float]:
    return {name: float(np.max(np.abs(getattr(got, name).astype(np.float64)
                                      - getattr(ref, name).astype(np.float64))))
            for name in OUTPUTS}


def record(result: Result, samples: Sequence[float], flops: float | None,
           peak_gflops: float | None, parity: dict[str, float] | None = None,
           tolerance: float | None = None) -> Result:
    """Fill ``result`` with the statistics of ``samples`` (seconds per study) and its parity."""
    ms = sorted(s * 1e3 for s in samples)
    result.runs = len(ms)
    result.median_ms = round(statistics.median(ms), 2)
    result.p90_ms = round(float(np.percentile(ms, 90)), 2)
    result.studies_per_s = round(1e3 / result.median_ms, 3)
    if flops:
        result.gflop_per_study = round(flops / 1e9, 2)
        result.achieved_gflops = round(flops / 1e9 / (result.median_ms / 1e3), 1)
        if peak_gflops:
            result.fraction_of_peak = round(result.achieved_gflops / peak_gflops, 4)
    if parity is not None:
        result.parity = {k: float(f"{v:.3g}") for k, v in parity.items()}
        result.tolerance = tolerance
        if tolerance is not None:
            result.passed = max(parity.values()) <= tolerance
    return result


def set_ratios(results: Iterable[Result], is_reference: Callable[[Result], bool]) -> None:
    """Each measured result's speed against the reference measured at its size in this run."""
    results = list(results)
    refs = {r.size: r.median_ms for r in results
            if is_reference(r) and r.status == "measured" and r.median_ms}
    for r in results:
        if r.status == "measured" and r.median_ms and r.size in refs:
            r.speed_ratio = round(refs[r.size] / r.median_ms, 3)


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip()


def commit() -> str:
    """``git rev-parse --short HEAD`` ("+" when the tree has changes), else what
    tests/gpu/prepare.sh recorded, else "unknown"."""
    head = _git("rev-parse", "--short", "HEAD")
    if head:
        return head + ("+" if _git("status", "--porcelain", "--untracked-files=no") else "")
    if COMMIT_FILE.is_file():
        return COMMIT_FILE.read_text(encoding="utf-8").strip() + " (recorded by prepare.sh)"
    return "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """Date, host, CPU and versions: what a reader needs to place the numbers."""
    versions = {}
    for module in ("numpy", "torch", "onnxruntime", "timm", "tensorrt"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:  # absent, or broken: either way not this machine's to report
            versions[module] = None
    return {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit(),
            "host": platform.node(), "cpu": cpu_model(), "cores": os.cpu_count(),
            "python": platform.python_version(), "versions": versions}


def write_json(path: Path, meta: dict[str, Any], results: Sequence[Result]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {**meta, "results": [asdict(r) for r in results]}
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def _num(value: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def markdown_table(results: Sequence[Result], reference: str) -> str:
    """One row per result; ``reference`` names what speed ratios are against."""
    head = ("size", "backend", "status", "median ms / study", "p90 ms", "studies/s",
            f"x {reference}", "GFLOP / study", "GFLOP/s", "of peak", "parity max abs diff",
            "tolerance", "pass")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        status = r.status if not r.reason else f"{r.status}: {r.reason}"
        parity = max(r.parity.values()) if r.parity else None
        passed = "-" if r.passed is None else ("pass" if r.passed else "FAIL")
        cells = (r.size, r.label, status.replace("|", "/").replace("\n", " "),
                 _num(r.median_ms, "{:.1f}"), _num(r.p90_ms, "{:.1f}"),
                 _num(r.studies_per_s), _num(r.speed_ratio), _num(r.gflop_per_study, "{:.1f}"),
                 _num(r.achieved_gflops, "{:.0f}"), _num(r.fraction_of_peak, "{:.1%}"),
                 _num(parity, "{:.2g}"), _num(r.tolerance, "{:g}"), passed)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
