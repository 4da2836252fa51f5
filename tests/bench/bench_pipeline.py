"""Where a study's processing time goes, stage by stage, against its receive time.

    python -m tests.bench.bench_pipeline [--runs 3]

A real Worker (ONNX Runtime, the packaged model) processes the 4-view demo exam from a spool
filled by the real listener; the reference is the time the same listener took to receive it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from sqlalchemy import update

from cadnode.config import Settings
from cadnode.demo import write_demo_study
from cadnode.dicom.listener import Listener
from cadnode.dicom.sender import send_files
from cadnode.jobs import admin, queue
from cadnode.jobs.db import Database, Study
from cadnode.jobs.worker import Worker


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings = Settings(home=root / "home")
        db = Database(settings.database_url)
        settings.home.mkdir()
        db.create_schema()
        listener = Listener(settings.spool_dir, lambda s: queue.record_instance(db, s))
        port = listener.start("127.0.0.1", 0)
        files = write_demo_study(root / "exam")
        start = time.perf_counter()
        send_files(files, "127.0.0.1", port, "CADNODE")
        receive = time.perf_counter() - start
        listener.stop()
        worker = Worker(settings, db)
        laps: list[dict[str, float]] = []
        for _ in range(args.runs):
            assert queue.assemble_studies(db, 0, 0, now=time.time() + 1)
            assert worker.run_once()
            (row,) = admin.list_studies(db)
            assert row["state"] == "done", row
            laps.append(row["job"]["scores"]["seconds"])
            with db.session() as s:  # reopen the study for the next run
                s.execute(update(Study).values(state="receiving"))
    stages = ("select", "pixels", "text", "model", "results", "total")
    median = {k: statistics.median(lap[k] for lap in laps) for k in stages}
    print(f"4-view demo exam, packaged model, median of {args.runs} runs (seconds)")
    print(f"  receive (reference): {receive:6.2f}")
    for k, v in median.items():
        print(f"  {k:<19}: {v:6.2f}  ({v / receive:5.1f}x receive)")


if __name__ == "__main__":
    main()
