"""One GPU check of every GPU backend: parity with CPU ONNX Runtime fp32 on the real exam, and
time per 4-view study at each size, in one short run on a borrowed machine.

    python -m tests.gpu.check --out DIR [--sizes 512x256,1024x512,2048x1024] [--quick]
                              [--model cadnode-effb0-cpu] [--deadline 300]

(``bash tests/gpu/run.sh`` runs it; tests/gpu/README.md says how to prepare and ship it.) Per
size it exports a package (torch + timm, on this machine: a ``model.pt2`` loads only with the
torch that wrote it), measures the reference (ONNX Runtime fp32 on the CPU) and then, as far as
this machine allows: the torch program on CUDA in fp32 (TF32 off), fp16 and bf16 (channels
last), ONNX Runtime's CUDA provider, TensorRT fp16, and the torch program under
``torch.compile(mode="reduce-overhead")`` (CUDA graphs). Whatever cannot run is a row "skipped"
with its reason; after ``--deadline`` seconds nothing new is started and the rest is "skipped:
not reached". ``DIR/gpu-check.json`` and ``DIR/gpu-check.md`` are rewritten after every row, so
a run cut short still leaves what it measured. Exit status 1 when a row failed or missed its
parity tolerance, else 0 (everything skipped is 0: a CPU machine passes).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
VENDOR = REPO / ".gpu-vendor"
# After site-packages, not before: the machine's own torch-matched packages win, the vendored
# wheels (tests/gpu/prepare.sh) only fill what is missing there.
if (VENDOR / "site").is_dir():
    sys.path.append(str(VENDOR / "site"))

from cadnode.runtime import BackendUnavailable, load_engine  # noqa: E402
from cadnode.runtime.types import ViewOutputs  # noqa: E402
from tests.bench.backend_timing import (  # noqa: E402
    SIZES,
    Result,
    Size,
    machine,
    markdown_table,
    max_abs_diff,
    parse_sizes,
    record,
    set_ratios,
    size_label,
    time_study,
    write_json,
)

SCHEMA = "cadnode-gpu-check/1"
DEMO_PACKAGE = REPO / "cadnode" / "models" / "demo"
#: Max |output - CPU ONNX Runtime fp32| allowed, by what the backend computes in. fp32 on CUDA
#: runs with TF32 off, but cuDNN's algorithms sum in other orders than the CPU: 1e-3 (the CPU
#: backends agree to 1e-4). ONNX Runtime's CUDA provider and TensorRT may use TF32 for fp32: 1e-2.
#: fp16 (10-bit mantissa) 2e-2; bf16 (7-bit) 5e-2, as the CPU benchmark's bf16.
TOLERANCES = {"fp32": 1e-3, "fp32-tf32": 1e-2, "fp16": 2e-2, "bf16": 5e-2}
NO_CUDA = "no CUDA device"


@dataclass
class Case:
    """One row to measure: what to open, and how to judge it."""

    backend: str
    precision: str
    device: str
    variant: str = ""
    tolerance_key: str = ""

    def result(self, size: Size) -> Result:
        return Result(backend=self.backend, precision=self.precision, device=self.device,
                      size=size_label(size), variant=self.variant)


REFERENCE = Case("onnxruntime", "fp32", "cpu")
#: In the order they are run at every size: the cheap rows across all sizes come before the
#: slow builds (TensorRT, torch.compile), so a deadline cuts the least informative ones.
PHASES: tuple[tuple[Case, ...], ...] = (
    (REFERENCE, Case("torch", "fp32", "cuda"), Case("torch", "fp16", "cuda"),
     Case("torch", "bf16", "cuda"), Case("onnxruntime", "fp32", "cuda", tolerance_key="fp32-tf32")),
    (Case("tensorrt", "fp16", "cuda"),),
    (Case("torch", "fp16", "cuda", "reduce-overhead"),
     Case("torch", "fp32", "cuda", "reduce-overhead")),
)


def _missing(module: str) -> str:
    return "" if importlib.util.find_spec(module) is not None else f"no {module} installed"


def cuda_state() -> tuple[dict[str, Any] | None, str]:
    """(GPU facts, "") when torch sees a CUDA device, else (None, why not)."""
    if _missing("torch"):
        return None, f"{NO_CUDA} (no torch installed to look for one)"
    import torch

    if not torch.cuda.is_available():
        return None, f"{NO_CUDA} (torch {torch.__version__}, CUDA build {torch.version.cuda})"
    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                 "--format=csv,noheader"], capture_output=True, text=True,
                                timeout=20, check=True).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        driver = "unknown (nvidia-smi did not answer)"
    return {"name": props.name, "capability": f"sm_{props.major}{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1), "driver": driver,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}, ""


def _stored_size(path: Path) -> int:
    h, _, w = path.stem.removeprefix("real_exam_").partition("x")
    return int(h) * int(w)


def exam_inputs(size: Size, model_name: str) -> tuple[tuple[np.ndarray, ...], str]:
    """The real exam's (images, input_ids, attention_mask) at ``size`` and where they came
    from: the file prepare.sh saved for this size, else the largest saved one resized, else
    synthetic images (said so)."""
    exact = VENDOR / f"real_exam_{size_label(size)}.npz"
    stored = sorted(VENDOR.glob("real_exam_*x*.npz"), key=_stored_size)
    if exact.is_file():
        with np.load(exact) as f:
            return ((f["images"].astype(np.float32), f["input_ids"], f["attention_mask"]),
                    f"real CBIS-DDSM exam ({exact.relative_to(REPO)})")
    if stored and not _missing("torch"):
        import torch

        with np.load(stored[-1]) as f:
            saved = torch.from_numpy(f["images"].astype(np.float32))
            images = torch.nn.functional.interpolate(saved, size=size, mode="bilinear",
                                                     align_corners=False).clamp(0, 1).numpy()
            return ((images, f["input_ids"], f["attention_mask"]),
                    f"real CBIS-DDSM exam, {stored[-1].relative_to(REPO)} resized bilinearly")
    rng = np.random.default_rng(0)
    length = 64
    ids = rng.integers(5, 60, (4, length), dtype=np.int64)
    return ((rng.random((4, 1, *size), dtype=np.float32), ids,
             np.ones((4, length), np.int64)),
            "synthetic random images and tokens (no .gpu-vendor/real_exam_*.npz: run "
            f"tests/gpu/prepare.sh); model {model_name}")


class Check:
    """The run: packages per size, the reference outputs, the rows, the reports."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.started = time.monotonic()
        self.deadline = self.started + args.deadline
        self.results: list[Result] = []
        self.gpu, self.cuda_reason = cuda_state()
        self.meta: dict[str, Any] = {"schema": SCHEMA, **machine(), "gpu": self.gpu,
                                     "cuda_reason": self.cuda_reason, "model": args.model,
                                     "views_per_study": 4,
                                     "sizes": [size_label(s) for s in args.sizes],
                                     "quick": args.quick, "deadline_s": args.deadline,
                                     "reference": "onnxruntime fp32 cpu",
                                     "ratio_reference": "torch fp32 cuda", "tf32": False,
                                     "tolerances": TOLERANCES, "inputs": {}, "packages": {},
                                     "peak_gflops": {}, "not_reached": []}
        self.packages: dict[Size, tuple[Path | None, Any, str]] = {}
        self.feeds: dict[Size, tuple[np.ndarray, ...]] = {}
        self.reference: dict[Size, ViewOutputs] = {}
        self.flops: dict[Size, float | None] = {}
        self.warmup, self.runs = (1, 3) if args.quick else (3, 20)

    # -- set-up --------------------------------------------------------------------------

    def peaks(self) -> None:
        """Matrix-product peaks per device and precision (fp32 with TF32 off)."""
        if _missing("torch"):
            return
        import torch

        from tests.bench.backend_timing import measure_peak

        seconds = 0.3 if self.args.quick else 1.0
        peaks = self.meta["peak_gflops"]
        peaks["cpu fp32"] = round(measure_peak("cpu", "fp32", seconds=seconds), 1)
        if self.gpu is not None:
            with warnings.catch_warnings():  # the flags' newer spelling warns on some versions
                warnings.simplefilter("ignore")
                torch.backends.cuda.matmul.allow_tf32 = False
                torch.backends.cudnn.allow_tf32 = False
            for precision in ("fp32", "fp16", "bf16"):
                peaks[f"cuda {precision}"] = round(measure_peak("cuda", precision,
                                                                seconds=seconds), 1)

    def package(self, size: Size) -> tuple[Path | None, Any, str]:
        """(package, eager model or None, why there is none) for ``size``, made once."""
        if size in self.packages:
            return self.packages[size]
        missing = _missing("torch") or _missing("timm")
        if not missing:
            from tests.bench.backend_timing import package

            try:
                path, model = package(self.work / "packages", self.args.model, size)
                self.packages[size] = (path, model, "")
                self.meta["packages"][size_label(size)] = f"exported here ({self.args.model})"
            except Exception as exc:  # the export is the first thing torch + timm do here
                missing = f"export failed: {type(exc).__name__}: {exc}"[:300]
        if missing and size not in self.packages:
            if _demo_size() == size:  # ONNX-only demo package: the ONNX rows still run
                self.packages[size] = (DEMO_PACKAGE, None, missing)
                self.meta["packages"][size_label(size)] = f"committed demo package ({missing})"
            else:
                self.packages[size] = (None, None, missing)
                self.meta["packages"][size_label(size)] = f"none ({missing})"
        return self.packages[size]

    # -- rows ----------------------------------------------------------------------------

    def skip_reason(self, case: Case, size: Size) -> str:
        path, model, why = self.package(size)
        if path is None:
            return why
        if case.device == "cuda" and self.gpu is None:
            return self.cuda_reason
        if case.backend == "torch" and model is None:
            return f"the package has no model.pt2 ({why})"
        if case.backend == "tensorrt" and _missing("tensorrt"):
            return "no tensorrt Python module on this machine"
        if case.backend == "onnxruntime" and case.device == "cuda":
            import onnxruntime as ort

            if "CUDAExecutionProvider" not in ort.get_available_providers():
                return (f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (a CPU "
                        "build; onnxruntime-gpu has it)")
        if size not in self.reference and case is not REFERENCE:
            return "no reference outputs at this size (the CPU reference did not run)"
        return ""

    def open(self, case: Case, path: Path) -> Any:
        device = "gpu" if case.device == "cuda" else "cpu"
        if case.backend == "tensorrt":
            from trt_engines.build import build_engine

            home = self.work / "trt-home"
            build_engine(path, home=home, precision=case.precision, max_views=8)
            return load_engine(path, "tensorrt", device=device, precision=case.precision,
                               home=home)
        options = {"compile_mode": case.variant} if case.variant else {}
        return load_engine(path, case.backend, device=device, precision=case.precision,
                           **options)

    def measure(self, case: Case, size: Size) -> Result:
        row = case.result(size)
        reason = self.skip_reason(case, size)
        if reason:
            row.status, row.reason = "skipped", reason
            return row
        path, model, _ = self.package(size)
        assert path is not None
        if size not in self.feeds:
            self.feeds[size], self.meta["inputs"][size_label(size)] = exam_inputs(
                size, self.args.model)
            self.flops[size] = _flops(model, size)
        feeds = self.feeds[size]
        try:
            engine = self.open(case, path)
        except BackendUnavailable as exc:
            row.status, row.reason = "skipped", str(exc).splitlines()[0][:300]
            return row
        try:
            row.providers = list(engine.providers)
            out = engine.predict(*feeds)
            if case is REFERENCE:
                self.reference[size] = out
            slow = case.device == "cpu"
            warmup = 1 if slow else self.warmup + (2 if case.variant else 0)
            runs = min(self.runs, 2 if self.args.quick else 3) if slow else self.runs
            samples = time_study(lambda: engine.predict(*feeds), warmup, runs,
                                 deadline=self.deadline + 30)
            tol = TOLERANCES[case.tolerance_key or case.precision]
            peak = self.meta["peak_gflops"].get(f"{case.device} {case.precision}")
            record(row, samples, self.flops[size], peak,
                   max_abs_diff(out, self.reference[size]), tol)
        finally:
            _release(engine)
        return row

    def run(self) -> int:
        self.peaks()
        for phase in PHASES:
            for size in self.args.sizes:
                for case in phase:
                    if time.monotonic() > self.deadline:
                        row = case.result(size)
                        row.status = "skipped"
                        row.reason = f"not reached before the {self.args.deadline:.0f} s deadline"
                        self.meta["not_reached"].append(f"{row.size} {row.label}")
                    else:
                        try:
                            row = self.measure(case, size)
                        except Exception as exc:  # one broken row must not lose the others
                            row = case.result(size)
                            row.status = "failed"
                            row.reason = f"{type(exc).__name__}: {exc}"[:300]
                    self.results.append(row)
                    print(f"{row.size} {row.label}: {row.status} {row.reason or ''}"
                          f"{'' if row.median_ms is None else f'{row.median_ms} ms'}",
                          flush=True)
                    self.write()
        return 1 if any(r.status == "failed" or r.passed is False for r in self.results) else 0

    # -- reports -------------------------------------------------------------------------

    def write(self) -> None:
        set_ratios(self.results, lambda r: (r.backend, r.precision, r.device, r.variant)
                   == ("torch", "fp32", "cuda", ""))
        self.meta["seconds"] = round(time.monotonic() - self.started, 1)
        measured = [r for r in self.results if r.passed is not None]
        self.meta["passed"] = all(r.status != "failed" for r in self.results) and all(
            r.passed for r in measured)
        out: Path = self.args.out
        write_json(out / "gpu-check.json", self.meta, self.results)
        (out / "gpu-check.md").write_text(render_markdown(self.meta, self.results),
                                          encoding="utf-8")


def render_markdown(meta: dict[str, Any], results: Sequence[Result]) -> str:
    """Header lines (machine, versions, date, commit), then one table row per result."""
    gpu = meta["gpu"]
    v = meta["versions"]
    where = (f"{gpu['name']} ({gpu['capability']}, {gpu['memory_gib']} GiB), driver "
             f"{gpu['driver']}, CUDA {gpu['cuda']}, cuDNN {gpu['cudnn']}" if gpu
             else meta["cuda_reason"])
    peaks = ", ".join(f"{k} {p:.0f}" for k, p in meta["peak_gflops"].items()) or "not measured"
    lines = [
        "# GPU check", "",
        f"- date {meta['date']}, commit {meta['commit']}, host {meta['host']}",
        f"- GPU: {where}",
        f"- CPU: {meta['cpu']} ({meta['cores']} cores); Python {meta['python']}, torch "
        f"{v['torch']}, ONNX Runtime {v['onnxruntime']}, TensorRT {v['tensorrt']}, "
        f"timm {v['timm']}",
        f"- model {meta['model']}, 4 views per study; parity reference {meta['reference']} on "
        f"the same inputs; speed ratio against {meta['ratio_reference']}; TF32 off for torch "
        "fp32",
        f"- matrix-product peaks (GFLOP/s): {peaks}",
        "- inputs: " + ("; ".join(f"{k}: {s}" for k, s in meta["inputs"].items()) or "none"),
        f"- {meta['seconds']:.0f} s in all (deadline {meta['deadline_s']:.0f} s)"
        + (f"; not reached: {', '.join(meta['not_reached'])}" if meta["not_reached"] else ""),
        f"- overall: {'pass' if meta['passed'] else 'FAIL'}", "",
        markdown_table(results, "torch fp32 cuda"), ""]
    return "\n".join(lines)


def _demo_size() -> Size | None:
    import json

    manifest = DEMO_PACKAGE / "manifest.json"
    if not manifest.is_file():
        return None
    h, w = json.loads(manifest.read_text(encoding="utf-8"))["input_size"]
    return int(h), int(w)


def _flops(model: Any, size: Size) -> float | None:
    if model is None:
        return None
    from tests.bench.backend_timing import count_flops

    return count_flops(model, size, model.cfg.max_text_len)


def _release(engine: Any) -> None:
    """Give an engine's device memory back before the next one loads."""
    close: Callable[[], None] | None = getattr(engine, "close", None)
    if close is not None:
        close()
    if importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.gpu.check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for gpu-check.json/.md")
    p.add_argument("--sizes", type=parse_sizes, default=list(SIZES))
    p.add_argument("--quick", action="store_true", help="1 warm-up and 3 timed runs per row")
    p.add_argument("--model", default="cadnode-effb0-cpu",
                   help="named architecture (cadnode-tiny-256 for a fast smoke run)")
    p.add_argument("--deadline", type=float, default=300.0,
                   help="seconds after which no new measurement starts")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        return Check(args, Path(tmp)).run()


if __name__ == "__main__":
    sys.exit(main())
