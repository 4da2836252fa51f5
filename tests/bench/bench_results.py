"""Milliseconds per result object kind (CAD SR, TID 1500, SC, GSPS), with a profile.

    python -m tests.bench.bench_results [--runs 5] [--profile 25]

A real Worker processes the 4-view demo exam (received by the real listener) once, keeping the
findings and source headers the worker hands to the builders; each builder then runs ``--runs``
times, timed apart from its encoding (``save_as`` into memory, as the worker writes it). The
reference is the model call for the same study (ONNX Runtime, the default package), timed in
the same run: the ratio says how the results stage compares with inference.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from cadnode.config import Settings
from cadnode.demo import write_demo_study
from cadnode.dicom.listener import Listener
from cadnode.dicom.sender import configure_pynetdicom, send_files
from cadnode.jobs import queue
from cadnode.jobs.db import Database
from cadnode.jobs.worker import Worker, _encode
from cadnode.results import BUILDERS
from cadnode.results.uids import DEFAULT_UID_ROOT
from tests.bench import report
from tests.bench.report import Table


def _findings(root: Path) -> tuple[Any, list[Any], Worker]:
    """The findings and sources of the demo exam, as the worker builds its objects from."""
    settings = Settings(home=root / "home")
    settings.home.mkdir()
    db = Database(settings.database_url)
    db.create_schema()
    listener = Listener(settings.spool_dir, lambda s: queue.record_instance(db, s))
    port = listener.start("127.0.0.1", 0)
    send_files(write_demo_study(root / "exam"), "127.0.0.1", port, "CADNODE")
    listener.stop()
    worker = Worker(settings, db)
    captured: dict[str, Any] = {}
    write = worker._write_results

    def keep(findings: Any, sources: list[Any]) -> Any:
        captured["args"] = (findings, sources)
        return write(findings, sources)

    worker._write_results = keep  # type: ignore[method-assign]
    assert queue.assemble_studies(db, 0, 0, now=time.time() + 1)
    assert worker.run_once()
    findings, sources = captured["args"]
    return findings, sources, worker


def _model_ms(worker: Worker, runs: int) -> float:
    engine = worker.engine
    h, w = engine.manifest.input_size
    n = engine.manifest.max_text_len
    images = np.random.default_rng(0).random((4, 1, h, w), dtype=np.float32)
    ids, mask = np.zeros((4, n), np.int64), np.ones((4, n), np.int64)
    engine.predict(images, ids, mask)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        engine.predict(images, ids, mask)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", type=int, default=5, help="timed builds per object kind")
    p.add_argument("--profile", type=int, default=25,
                   help="functions shown in the profile printed after the table (0: none)")


def run(args: argparse.Namespace) -> Table:
    configure_pynetdicom()
    table = Table("results", "Results: ms per result object kind",
                  "python -m tests.bench.bench_results",
                  ["object", "build ms", "encode ms", "total ms", "x model call", "bytes"])
    with tempfile.TemporaryDirectory() as tmp:
        findings, sources, worker = _findings(Path(tmp))
        try:
            model = _model_ms(worker, args.runs)
            total = 0.0
            for kind, build in BUILDERS.items():
                built, encoded, size = [], [], 0
                for _ in range(args.runs):
                    start = time.perf_counter()
                    ds = build(findings, sources, DEFAULT_UID_ROOT)
                    mid = time.perf_counter()
                    size = len(_encode(ds))
                    built.append(1000 * (mid - start))
                    encoded.append(1000 * (time.perf_counter() - mid))
                b, e = statistics.median(built), statistics.median(encoded)
                total += b + e
                table.add(kind.value, b, e, b + e, f"{(b + e) / model:.2f}", size)
            table.add("all four", "", "", total, f"{total / model:.2f}", "")
            table.add("reference: model call, 4 views", "", "", model, "1.00", "")
            if args.profile:
                prof = cProfile.Profile()
                prof.enable()
                for build in BUILDERS.values():
                    _encode(build(findings, sources, DEFAULT_UID_ROOT))
                prof.disable()
                out = io.StringIO()
                pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(args.profile)
                table.appendix = out.getvalue()
        finally:
            worker.close()
    table.notes.append(f"The 4-view demo exam's findings, median of {args.runs} builds per "
                       "kind; encode is save_as into memory, as the worker writes it; the model "
                       "call is ONNX Runtime, the packaged model, in the same run.")
    return table


if __name__ == "__main__":
    report.main(__doc__, add_arguments, run)
