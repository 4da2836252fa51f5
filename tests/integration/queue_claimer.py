"""One worker process of the exactly-once test (test_queue_scale.py): waits for the start
signal (a file), then claims and completes jobs through the node's own queue functions until
the queue is empty, writing each job id it completed to its output file."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from cadnode.jobs import queue
from cadnode.jobs.db import Database


def main(url: str, owner: str, folder: str) -> int:
    out = Path(folder)
    db = Database(url)
    (out / f"{owner}.ready").touch()
    while not (out / "go").exists():  # all processes start claiming at the same moment
        time.sleep(0.01)
    done: list[str] = []
    while (job := queue.claim_next_job(db, owner, lease_seconds=120)) is not None:
        queue.complete_job(db, job, {"exam": {}}, [], "v", [])
        done.append(str(job.id))
    (out / f"{owner}.done").write_text("\n".join(done))
    db.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
