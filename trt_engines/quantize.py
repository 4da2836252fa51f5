"""int8 variant of a model package for CPUs, kept only when it scores the benchmark like fp32.

Why a benchmark gate: int8 changes every score a little, and a node must not silently serve a
model that ranks views worse than the one the package was validated as. So the quantised graph
is scored next to fp32 on labelled DICOM views (made into inputs by the node's own pixel
pipeline and text builder, :func:`cadnode.jobs.inputs.file_inputs`), and it is written to
:func:`cadnode.runtime.onnx.int8_model_path` only if neither task's per-view AUROC drops by more
than ``max_auroc_drop``; otherwise nothing is left there.

Methods (ONNX Runtime's ``onnxruntime.quantization``, after its shape-inference preprocess):

* ``static``: QDQ on Conv, MatMul and Gemm, int8 per-channel weights and uint8 activations
  whose ranges are calibrated on DICOM views; the only one that makes the convolutions int8
  (the model file shrinks ~3x);
* ``dynamic``: int8 weights of the MatMul and Gemm nodes (text transformer, fusion, heads),
  activations quantised at run time. Convolutions are left in fp32 on purpose: ONNX Runtime's
  CPU ``ConvInteger`` measured ~15x slower than fp32 on the demo model;
* ``auto``: static first, dynamic when static does not pass.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_dynamic,
    quantize_static,
)

from cadnode.jobs.inputs import ModelInputs, file_inputs
from cadnode.runtime.engine_cache import write_atomically
from cadnode.runtime.manifest import ModelManifest, read_manifest
from cadnode.runtime.onnx import CPU, int8_model_path, session_options
from cadnode.text.tokenizer import ClinicalTokenizer
from train.evaluate import TASKS, auroc
from trt_engines.calibration import calibration_files

METHODS: tuple[str, ...] = ("auto", "dynamic", "static")
#: Default held-out benchmark: 100 synthetic exams (400 views), seed 1 (training used seed 0).
BENCHMARK_EXAMS = 100
BENCHMARK_SEED = 1
#: Default calibration set: 8 synthetic exams (32 views), seed 2 (apart from both of the above).
CALIBRATION_EXAMS = 8
CALIBRATION_SEED = 2
#: Most calibration views used (spread evenly over the folder): the calibrator holds every
#: intermediate tensor of every batch until it has seen them all.
MAX_CALIBRATION_VIEWS = 32
#: Ops static QDQ quantises: the weighted ones. Quantising every op (Sigmoid, Mul, Softmax,
#: LayerNormalization too) cost the demo model 0.25 cancer AUROC on the default benchmark.
STATIC_OPS: tuple[str, ...] = ("Conv", "MatMul", "Gemm")
#: Views per run: one 4-view screening study, as the node batches them.
STUDY_VIEWS = 4
#: Timed runs of one study per model (after one warm-up); the median is reported.
TIMED_RUNS = 5


@dataclass(frozen=True)
class Benchmark:
    """Labelled views: DICOM files with per-view ``cancer`` and ``calcification`` labels."""

    files: tuple[Path, ...]
    labels: dict[str, np.ndarray]
    description: str


@dataclass(frozen=True)
class QuantizeReport:
    """What was measured and decided; ``kept`` says whether ``path`` now holds the int8 model."""

    kept: bool
    path: Path
    method: str  # the method of the figures below: the one kept, or the last one refused
    tried: tuple[str, ...]
    max_auroc_drop: float
    auroc_fp32: dict[str, float]
    auroc_int8: dict[str, float]
    max_abs_diff: dict[str, float]  # largest per-view |int8 - fp32| probability, per task
    ms_per_study_fp32: float
    ms_per_study_int8: float
    bytes_fp32: int
    bytes_int8: int
    benchmark: str
    n_views: int
    seconds: float
    date: str
    refused: dict[str, dict[str, float]] = field(default_factory=dict)  # method -> AUROC drops

    @property
    def drops(self) -> dict[str, float]:
        """fp32 AUROC minus int8 AUROC per task (positive: int8 is worse)."""
        return {t: self.auroc_fp32[t] - self.auroc_int8[t] for t in self.auroc_fp32}

    def summary(self) -> str:
        """One paragraph for the command line and the log."""
        verdict = (f"kept {self.path}" if self.kept else
                   f"refused: an AUROC drop exceeds {self.max_auroc_drop:g}, no int8 model left")
        tasks = "; ".join(f"{t} AUROC fp32 {self.auroc_fp32[t]:.4f} int8 {self.auroc_int8[t]:.4f} "
                          f"(drop {d:+.4f})" for t, d in self.drops.items())
        others = "".join(f" ({m} was refused first)" for m in self.refused if m != self.method)
        return (f"int8 {self.method}{others}: {verdict}. {tasks} on {self.benchmark}. "
                f"{self.ms_per_study_fp32:.0f} ms per 4-view study fp32, "
                f"{self.ms_per_study_int8:.0f} ms int8 (CPU, median of {TIMED_RUNS}); "
                f"{self.bytes_fp32 / 1e6:.1f} MB fp32, {self.bytes_int8 / 1e6:.1f} MB int8; "
                f"{self.seconds:.0f} s in all.")

    def to_json(self) -> dict[str, Any]:
        """The sidecar's content (paths as strings)."""
        data = asdict(self)
        data["path"] = str(self.path)
        data["drops"] = self.drops
        return data


def read_benchmark(folder: Path) -> Benchmark:
    """A folder as ``train.synthetic.write_dataset`` writes it: ``labels.csv`` (columns ``file``
    relative to the folder, ``cancer``, ``calcification``) next to the DICOM files."""
    label_path = Path(folder) / "labels.csv"
    if not label_path.is_file():
        raise ValueError(f"benchmark {folder} has no labels.csv")
    with label_path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    missing = [c for c in ("file", *TASKS) if rows and c not in rows[0]]
    if not rows or missing:
        raise ValueError(f"benchmark {label_path}: no rows or missing column(s) {missing}")
    labels = {t: np.array([int(r[t]) for r in rows], dtype=np.int64) for t in TASKS}
    for task, y in labels.items():
        if y.min() == y.max():
            raise ValueError(f"benchmark {label_path}: every view has {task}={y[0]}; an AUROC "
                             "needs both classes")
    files = tuple(Path(folder) / r["file"] for r in rows)
    return Benchmark(files, labels, f"{folder} ({len(files)} views)")


def _synthetic(out: Path, n_exams: int, seed: int, manifest: ModelManifest) -> Path:
    from train.synthetic import SyntheticConfig, write_dataset

    write_dataset(SyntheticConfig(n_exams=n_exams, seed=seed, shape=manifest.input_size), out)
    return out


def _batches(inputs: ModelInputs, size: int = STUDY_VIEWS) -> Iterator[dict[str, np.ndarray]]:
    for i in range(0, len(inputs), size):
        yield {"image": inputs.images[i:i + size], "input_ids": inputs.input_ids[i:i + size],
               "attention_mask": inputs.attention_mask[i:i + size]}


class DicomReader(CalibrationDataReader):
    """Calibration batches of one study's size, read from DICOM files when asked (the
    calibrator holds only what it needs)."""

    def __init__(self, files: Sequence[Path], manifest: ModelManifest,
                 tokenizer: ClinicalTokenizer) -> None:
        step = max(1, -(-len(files) // MAX_CALIBRATION_VIEWS))
        self._files = list(files)[::step]
        self._manifest, self._tokenizer = manifest, tokenizer
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self._files):
            return None
        paths = self._files[self._next:self._next + STUDY_VIEWS]
        self._next += STUDY_VIEWS
        return next(_batches(file_inputs(paths, self._manifest, self._tokenizer)))

    def rewind(self) -> None:
        self._next = 0


def _session(model: Path, intra_op_threads: int) -> ort.InferenceSession:
    return ort.InferenceSession(str(model), sess_options=session_options(intra_op_threads),
                                providers=[CPU])


def _score(model: Path, inputs: ModelInputs, intra_op_threads: int
           ) -> tuple[dict[str, np.ndarray], float]:
    """Per-view probabilities of both tasks, and the median ms of one 4-view study."""
    session = _session(model, intra_op_threads)
    out: dict[str, list[np.ndarray]] = {t: [] for t in TASKS}
    for feeds in _batches(inputs):
        for task, value in zip(TASKS, session.run(list(TASKS), feeds), strict=True):
            out[task].append(np.asarray(value, dtype=np.float64).reshape(-1))
    study = next(_batches(inputs))
    session.run(list(TASKS), study)
    times = []
    for _ in range(TIMED_RUNS):
        start = time.perf_counter()
        session.run(list(TASKS), study)
        times.append(1000 * (time.perf_counter() - start))
    return {t: np.concatenate(v) for t, v in out.items()}, statistics.median(times)


def _quantize(method: str, prepared: Path, out: Path, calibration: Sequence[Path],
              manifest: ModelManifest, tokenizer: ClinicalTokenizer) -> None:
    if method == "dynamic":
        quantize_dynamic(prepared, out, op_types_to_quantize=["MatMul", "Gemm"],
                         per_channel=True, weight_type=QuantType.QInt8)
        return
    quantize_static(prepared, out, DicomReader(calibration, manifest, tokenizer),
                    quant_format=QuantFormat.QDQ, per_channel=True,
                    op_types_to_quantize=list(STATIC_OPS),
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def _remove(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def quantize_package(package: str | Path | ModelManifest, *, home: str | Path,
                     benchmark: Path | None = None, calibration: Path | None = None,
                     max_auroc_drop: float = 0.005, method: str = "auto",
                     intra_op_threads: int = 0) -> QuantizeReport:
    """Quantise ``package``'s model.onnx to int8 and keep it under ``home`` only if, on the
    benchmark, neither task's AUROC falls more than ``max_auroc_drop`` below fp32.

    ``benchmark``: a labelled DICOM folder (see :func:`read_benchmark`); None generates the
    held-out synthetic set (BENCHMARK_EXAMS exams, seed BENCHMARK_SEED, the package's input
    size). ``calibration``: DICOM files for static ranges; None generates a small synthetic set
    (CALIBRATION_EXAMS exams, seed CALIBRATION_SEED). A refusal also removes an earlier int8
    model of the same ONNX, so the node never serves one that fails the rule.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    started = time.perf_counter()
    manifest = (package if isinstance(package, ModelManifest) else read_manifest(package))
    tokenizer = ClinicalTokenizer.from_file(manifest.tokenizer_path)
    target = int8_model_path(manifest, Path(home))
    sidecar = target.with_suffix(".json")
    target.parent.mkdir(parents=True, exist_ok=True)
    order = {"auto": ("static", "dynamic"), "static": ("static",), "dynamic": ("dynamic",)}
    with tempfile.TemporaryDirectory(prefix="cadnode-quantize-") as tmp:
        work = Path(tmp)
        bench = read_benchmark(benchmark if benchmark is not None else _synthetic(
            work / "benchmark", BENCHMARK_EXAMS, BENCHMARK_SEED, manifest))
        if benchmark is None:
            bench = Benchmark(bench.files, bench.labels,
                              f"synthetic benchmark (train/synthetic.py, seed {BENCHMARK_SEED}, "
                              f"{len(bench.files)} views at {manifest.input_size[0]}x"
                              f"{manifest.input_size[1]})")
        inputs = file_inputs(bench.files, manifest, tokenizer)
        fp32, ms_fp32 = _score(manifest.model_path, inputs, intra_op_threads)
        auroc_fp32 = {t: auroc(bench.labels[t], fp32[t]) for t in TASKS}
        prepared = work / "prepared.onnx"
        quant_pre_process(manifest.model_path, prepared)
        calib: list[Path] = []
        if "static" in order[method]:
            calib = calibration_files(calibration if calibration is not None else _synthetic(
                work / "calibration", CALIBRATION_EXAMS, CALIBRATION_SEED, manifest))
        candidate = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        refused: dict[str, dict[str, float]] = {}
        try:
            for tried, name in enumerate(order[method], start=1):
                _quantize(name, prepared, candidate, calib, manifest, tokenizer)
                int8, ms_int8 = _score(candidate, inputs, intra_op_threads)
                auroc_int8 = {t: auroc(bench.labels[t], int8[t]) for t in TASKS}
                drops = {t: auroc_fp32[t] - auroc_int8[t] for t in TASKS}
                kept = all(d <= max_auroc_drop for d in drops.values())
                if not kept:
                    refused[name] = drops
                report = QuantizeReport(
                    kept=kept, path=target, method=name, tried=order[method][:tried],
                    max_auroc_drop=max_auroc_drop, auroc_fp32=auroc_fp32,
                    auroc_int8=auroc_int8,
                    max_abs_diff={t: float(np.abs(int8[t] - fp32[t]).max()) for t in TASKS},
                    ms_per_study_fp32=ms_fp32, ms_per_study_int8=ms_int8,
                    bytes_fp32=sum(p.stat().st_size for p in manifest.weight_files),
                    bytes_int8=candidate.stat().st_size, benchmark=bench.description,
                    n_views=len(bench.files), seconds=time.perf_counter() - started,
                    date=datetime.now(UTC).isoformat(timespec="seconds"), refused=dict(refused))
                if kept:
                    os.replace(candidate, target)
                    write_atomically(sidecar, json.dumps(report.to_json(), indent=2).encode())
                    return report
            _remove(target, sidecar)
            return report
        finally:
            _remove(candidate)
