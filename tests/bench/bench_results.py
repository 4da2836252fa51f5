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
import os
import platform
import pstats
import statistics
import subprocess
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
from tests.conftest import REPO


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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--profile", type=int, default=25, help="functions shown (0: no profile)")
    args = p.parse_args()
    configure_pynetdicom()
    with tempfile.TemporaryDirectory() as tmp:
        findings, sources, worker = _findings(Path(tmp))
        try:
            model = _model_ms(worker, args.runs)
            rows = []
            for kind, build in BUILDERS.items():
                built, encoded, size = [], [], 0
                for _ in range(args.runs):
                    start = time.perf_counter()
                    ds = build(findings, sources, DEFAULT_UID_ROOT)
                    mid = time.perf_counter()
                    size = len(_encode(ds))
                    built.append(1000 * (mid - start))
                    encoded.append(1000 * (time.perf_counter() - mid))
                rows.append((kind.value, statistics.median(built), statistics.median(encoded),
                             size))
            profile = ""
            if args.profile:
                prof = cProfile.Profile()
                prof.enable()
                for build in BUILDERS.values():
                    _encode(build(findings, sources, DEFAULT_UID_ROOT))
                prof.disable()
                out = io.StringIO()
                pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(args.profile)
                profile = out.getvalue()
        finally:
            worker.close()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=REPO).stdout.strip()
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"median of {args.runs}\n")
    print("| object | build ms | encode ms | total ms | x model call | bytes |")
    print("|---|---|---|---|---|---|")
    total = 0.0
    for kind, b, e, size in rows:
        total += b + e
        print(f"| {kind} | {b:.0f} | {e:.0f} | {b + e:.0f} | {(b + e) / model:.2f} | {size} |")
    print(f"| all four | | | {total:.0f} | {total / model:.2f} | |")
    print(f"| reference: model call, 4 views | | | {model:.0f} | 1.00 | |")
    if profile:
        print("\n" + profile)


if __name__ == "__main__":
    main()
