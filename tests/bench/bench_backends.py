"""What each backend present on this machine costs per 4-view study, against torch fp32 measured
in the same run, and how far each is from the CPU's own matrix-product peak.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 .venv/bin/python -m \
        tests.bench.bench_backends [--sizes 512x256,1024x512,2048x1024] [--runs N] [--out DIR]

The demo architecture (``cadnode-effb0-cpu``) is exported at each size (cached under ``--out``,
so a second run starts at once) and run on the real CBIS-DDSM 4-view exam prepared by the node's
pixel pipeline at that size. Rows: ONNX Runtime fp32, the torch program in fp32 (the reference)
and bf16; TensorRT and Triton are listed with the reason they cannot run. Parity is against the
eager torch module in fp32 on the same inputs. Prints a Markdown table (date, machine, commit)
and writes ``bench-backends.json`` and ``bench-backends.md`` under ``--out``. About 6-8 minutes
on the 2-core development VM with the defaults (exports included).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from cadnode.demo import write_demo_study
from cadnode.jobs.inputs import ModelInputs, file_inputs
from cadnode.runtime import BackendUnavailable, load_engine, read_manifest
from cadnode.text.tokenizer import ClinicalTokenizer
from tests.bench.backend_timing import (
    SIZES,
    Result,
    Size,
    count_flops,
    eager_outputs,
    machine,
    markdown_table,
    max_abs_diff,
    measure_peak,
    package,
    package_folder,
    parse_sizes,
    record,
    set_ratios,
    size_label,
    time_study,
    write_json,
)

MODEL = "cadnode-effb0-cpu"
#: (backend, precision) measured at each size; the first is the reference.
CASES = (("torch", "fp32"), ("onnxruntime", "fp32"), ("torch", "bf16"))
#: torch's intra-op threads for the torch rows. On the shared 2-vCPU VM torch's default (one per
#: core, OpenMP) made a study 35x slower than one thread at 256 x 128 (3.9 s vs 0.11 s) while
#: other work ran: its barriers spin against the other processes. ONNX Runtime keeps its default
#: (one per physical core, its own pool). The first size also gets a row at torch's default.
TORCH_THREADS = 1
#: Parity bounds against eager fp32: fp32 as tests/integration/test_backend_parity.py; bf16
#: keeps 8 bits of mantissa, so probabilities move by up to a few hundredths.
TOLERANCES = {"fp32": 1e-4, "bf16": 5e-2}
#: Timed runs per study at each size when --runs is not given (fewer where a study is slow).
DEFAULT_RUNS = {(512, 256): 10, (1024, 512): 5, (2048, 1024): 3}


def _unavailable(pkg: Path) -> list[Result]:
    """TensorRT and Triton rows with the reason each cannot run here, in the node's words."""
    rows = []
    for backend, options in (("tensorrt", {"home": Path(tempfile.gettempdir())}),
                             ("triton", {})):
        row = Result(backend=backend, precision="", device="", size="all", status="skipped")
        try:
            load_engine(pkg, backend, device="auto", **options)
        except BackendUnavailable as exc:
            row.reason = str(exc).splitlines()[0]
        else:
            row.status, row.reason = "failed", "opened on a machine with no GPU or server"
        rows.append(row)
    return rows


def bench_size(size: Size, cache: Path, exam: list[Path], runs: int | None,
               peaks: dict[str, float], torch_threads: int,
               default_threads_row: bool) -> list[Result]:
    """Every case at ``size`` on the real exam (the package exported on first use)."""
    import torch

    pkg, model = package(cache, MODEL, size)
    manifest = read_manifest(pkg)
    inputs: ModelInputs = file_inputs(exam, manifest,
                                      ClinicalTokenizer.from_file(manifest.tokenizer_path))
    feeds = (inputs.images, inputs.input_ids, inputs.attention_mask)
    reference = eager_outputs(model, *feeds)
    flops = count_flops(model, size, manifest.max_text_len)
    n = runs or DEFAULT_RUNS.get(size, 5)
    results = []
    cases = [(b, p, torch_threads) for b, p in CASES]
    if default_threads_row:
        cases.append(("torch", "fp32", os.cpu_count() or 1))
    for backend, precision, threads in cases:
        row = Result(backend=backend, precision=precision, device="cpu", size=size_label(size))
        if backend == "torch":
            torch.set_num_threads(threads)
            row.variant = f"{threads} thread" + ("s" if threads > 1 else "")
        try:
            engine = load_engine(pkg, backend, device="cpu", precision=precision)
        except BackendUnavailable as exc:
            row.status, row.reason = "skipped", str(exc).splitlines()[0]
            results.append(row)
            continue
        row.providers = list(engine.providers)
        out = engine.predict(*feeds)
        repeats = 2 if threads != torch_threads else n  # the default-threads row: slow here
        samples = time_study(lambda engine=engine: engine.predict(*feeds), warmup=1, runs=repeats)
        results.append(record(row, samples, flops, peaks[precision],
                              max_abs_diff(out, reference), TOLERANCES[precision]))
        print(f"  {row.size} {row.label}: {row.median_ms:.0f} ms", flush=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=parse_sizes, default=list(SIZES))
    p.add_argument("--runs", type=int, help="timed runs per study at every size")
    p.add_argument("--out", type=Path, default=Path("var/bench-backends"))
    p.add_argument("--torch-threads", type=int, default=TORCH_THREADS)
    args = p.parse_args()
    started = time.monotonic()
    meta = machine()
    # before the models take the memory and caches
    peaks = {precision: round(measure_peak("cpu", precision), 1) for precision in TOLERANCES}
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp:
        exam = write_demo_study(Path(tmp) / "exam")
        for n, size in enumerate(args.sizes):
            results += bench_size(size, args.out / "packages", exam, args.runs, peaks,
                                  args.torch_threads, n == 0)
    results += _unavailable(package_folder(args.out / "packages", MODEL, args.sizes[0]))
    reference = f"{args.torch_threads} thread" + ("s" if args.torch_threads > 1 else "")
    set_ratios(results, lambda r: (r.backend, r.precision, r.variant) == (*CASES[0], reference))
    meta.update(model=MODEL, views_per_study=4, inputs="real CBIS-DDSM 4-view exam (demo study)",
                reference=f"torch fp32 (model.pt2) on the CPU, {reference}",
                parity_reference="eager torch fp32",
                peak_gflops={f"cpu {k}": v for k, v in peaks.items()},
                seconds=round(time.monotonic() - started, 1))
    table = markdown_table(results, f"torch fp32 {reference}")
    header = (f"{meta['date']}, commit {meta['commit']}, {meta['cpu']} ({meta['cores']} cores), "
              f"torch {meta['versions']['torch']}, ONNX Runtime {meta['versions']['onnxruntime']}"
              f"; {MODEL}, 4-view real exam per study; matrix-product peak "
              + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items())
              + f"; {meta['seconds']:.0f} s in all")
    write_json(args.out / "bench-backends.json", meta, results)
    (args.out / "bench-backends.md").write_text(f"{header}\n\n{table}\n", encoding="utf-8")
    print(f"\n{header}\n\n{table}")


if __name__ == "__main__":
    main()
