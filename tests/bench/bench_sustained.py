"""Sustained load: studies pushed back to back, studies per hour end to end against the model
alone, and the node's peak memory.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 .venv/bin/python -m \
        tests.bench.bench_sustained [--studies 50] [--concurrency 1] [--quiet 1]

A real ``cadnode serve`` process (SQLite in a temporary home, the packaged model, ONNX Runtime)
sends its results to DCMTK ``storescp`` (TCP_NODELAY=1). ``--studies`` copies of the real 4-view
demo exam (46 MB of RLE lossless each), each re-identified as its own study (new Study, Series
and SOP Instance UIDs) and written before the clock starts, are pushed by DCMTK ``storescu``
one association per study, one after another with no pause, as a busy modality would. The
clock runs from the first association to the last result file at the destination (its
modification time; the benchmark waits until the node has recorded every delivery as
acknowledged, so every file is whole). The end-to-end rate is studies / that time; the
model-only rate is 3600 / (one ``engine.predict`` of a study's 4 prepared views, same package
and backend, timed in this process after the node has stopped); the ratio is the first over
the second (issue target >= 0.8).

Peak memory is the node's VmHWM (``/proc/<pid>/status``) read before it stops, and that of each
of its child processes (the forkserver and the decoding child of cadnode.jobs.decoding). The
stage rows are means over the jobs as the worker recorded them (``scores.seconds``), with the
time each study waited in the queue and its latency from its last instance received to its
last result at the destination: where the time goes.

With the defaults (50 studies) it takes about 4 minutes on the 2-core development VM.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from tests.bench import report
from tests.bench.bench_turnaround import (
    DEMO,
    STAGES,
    Exam,
    StoreSCP,
    StudyRecord,
    add_node_arguments,
    attach_arrivals,
    finished_studies,
    model_seconds,
    push,
    resolve_package,
    start_node,
)
from tests.bench.report import Table
from tests.helpers import wait_until


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--studies", type=int, default=50, help="studies pushed back to back")
    p.add_argument("--concurrency", type=int, default=1,
                   help="`cadnode serve --concurrency` (workers in the node; default 1)")
    p.add_argument("--package", default=DEMO,
                   help="demo (the packaged model), HxW (cadnode-effb0-cpu at that size, "
                   "needs torch) or a package folder")
    add_node_arguments(p)
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds for the last result at most")


def _hwm_kib(pid: int) -> tuple[int, int]:
    """(VmHWM, VmRSS) of a process, KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0])
    return fields["VmHWM"], fields["VmRSS"]


def _children(pid: int) -> list[tuple[int, str]]:
    """Every descendant of ``pid``: (pid, what it is). The forkserver and the resource tracker
    are the node's children; the decoding child is forked by the forkserver (so has its
    command line)."""
    try:
        import psutil
    except ImportError:
        psutil = None  # type: ignore[assignment]
    found: list[tuple[int, int, str]] = []
    if psutil is not None:
        found = [(c.pid, c.ppid(), " ".join(c.cmdline()))
                 for c in psutil.Process(pid).children(True)]
    else:
        todo = [pid]
        while todo:
            parent = todo.pop()
            for task in Path(f"/proc/{parent}/task").iterdir():
                for child in map(int, (task / "children").read_text().split()):
                    cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
                    found.append((child, parent, cmd.decode(errors="replace").strip()))
                    todo.append(child)
    return [(child, _role(cmd, parent == pid)) for child, parent, cmd in found]


def _role(cmdline: str, direct: bool) -> str:
    if "resource_tracker" in cmdline:
        return "resource tracker"
    if "forkserver" in cmdline:
        return "forkserver" if direct else "decoding child"
    return cmdline[:40]


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def run(args: argparse.Namespace) -> Table:
    table = Table("sustained", "Sustained load: studies pushed back to back",
                  "python -m tests.bench.bench_sustained", ["measure", "value", "note"])
    with tempfile.TemporaryDirectory(prefix="bench-sustained-") as tmp:
        root = Path(tmp)
        label, folder, _size = resolve_package(str(args.package), args.cache)
        exam = Exam(root / "exam")
        studies = [exam.write() for _ in range(args.studies)]  # before the clock
        pacs = StoreSCP(root / "pacs")
        try:
            node = start_node(root, pacs.destination, folder, args, args.concurrency)
            try:
                hwm_ready, _ = _hwm_kib(node.proc.pid)
                db = node.home / "cadnode.db"
                start = time.time()
                for _uid, files in studies:
                    push(node.port, files)
                pushed = time.time() - start
                found: dict[str, StudyRecord] = {}

                def finished() -> bool:
                    if node.proc.poll() is not None:
                        raise RuntimeError(f"the node exited: {node.log.read_text()[-3000:]}")
                    found.update(finished_studies(db))
                    return len(found) >= len(studies)

                if not wait_until(finished, args.timeout, interval=0.1):
                    raise TimeoutError(f"{len(found)} of {len(studies)} studies done within "
                                       f"{args.timeout:.0f} s; see {node.log}")
                hwm, rss = _hwm_kib(node.proc.pid)
                kids = [(role, *_hwm_kib(pid)) for pid, role in _children(node.proc.pid)]
            finally:
                node.stop()
            records = [found[uid] for uid, _files in studies]
            for rec in records:
                attach_arrivals(rec, pacs)
        finally:
            pacs.stop()
        model = model_seconds(folder, args.backend, exam.sources, args.model_runs)

    elapsed = max(r.arrived[-1] for r in records) - start
    rate = 3600 * len(records) / elapsed
    model_rate = 3600 / model
    busy = sum(r.seconds.get("total", 0.0) for r in records)
    table.add("studies", len(records), f"{label}, {exam.megabytes:.0f} MB each, "
              f"{args.concurrency} worker(s)")
    table.add("pushed (all instances acknowledged), s", pushed,
              f"{len(records) * exam.megabytes / pushed:.0f} MB/s received while processing")
    table.add("first association to last result, s", elapsed, "")
    table.add("end to end, studies/hour", rate, "")
    table.add("model call alone, s", model, "engine.predict, 4 prepared views, in-process")
    table.add("model only, studies/hour", model_rate, "3600 / model call")
    table.add("ratio end to end / model only", f"{rate / model_rate:.2f}", "target >= 0.8")
    for stage in (*STAGES, "total"):
        values = [r.seconds.get(stage, 0.0) for r in records]
        table.add(f"mean {stage} s (worker)", _mean(values),
                  f"{100 * sum(values) / busy:.0f} % of worker time" if stage != "total"
                  else f"worker busy {100 * busy / (elapsed * args.concurrency):.0f} % of "
                       "the run")
    waits = [r.started_at - r.created_at for r in records]
    table.add("queue wait (queued to claimed), mean s", _mean(waits), f"max {max(waits):.1f} s")
    sends = [r.arrived[-1] - r.finished_at for r in records]
    table.add("job done to last result at destination, mean s", _mean(sends),
              f"max {max(sends):.2f} s")
    latency = [r.arrived[-1] - r.last_received for r in records]
    table.add("study latency (last instance to last result), median s",
              statistics.median(latency), f"max {max(latency):.1f} s")
    table.add("node peak RSS (VmHWM), MiB", hwm / 1024,
              f"{hwm_ready / 1024:.0f} MiB once ready; {rss / 1024:.0f} MiB resident at the end")
    for role, child_hwm, child_rss in kids:
        table.add(f"{role} peak RSS, MiB", child_hwm / 1024,
                  f"{child_rss / 1024:.0f} MiB resident at the end")
    table.notes.append(
        f"storescu, one association per study, back to back; CADNODE_COMPLETE_SECONDS="
        f"{args.quiet:g}, CADNODE_POLL_SECONDS={args.poll:g}, backend {args.backend}; "
        "destination DCMTK storescp. Stage means are over all jobs, from the job records.")
    return table


if __name__ == "__main__":
    report.main(__doc__, add_arguments, run)
