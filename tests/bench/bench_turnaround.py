"""Turnaround: last instance acknowledged -> last result acknowledged by the destination.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 .venv/bin/python -m \
        tests.bench.bench_turnaround [--rounds 5] [--packages demo,512x256] [--quiet 1]

A real ``cadnode serve`` process (SQLite in a temporary home, the quiet period ``--quiet`` and
the poll interval ``--poll``, by default the shortest the scheduler takes: 0.2 s) sends its
results to DCMTK ``storescp`` (TCP_NODELAY=1, writing to a folder); DCMTK ``storescu`` pushes
the real 4-view demo exam (CBIS-DDSM, 4 x ~11 MB RLE lossless), a new Study/Series/SOP Instance
UID each round. The clock starts when ``storescu`` returns (the last instance acknowledged) and
stops at the modification time of the last result file at the destination (``storescp`` writes
the file, then acknowledges; the node records each object as sent once acknowledged, which is
what the benchmark waits for before reading the files' times). Nothing waits on a fixed sleep:
the node's port, the job and delivery rows of its database and the destination's files are
polled.

The breakdown comes from the node's own records: the study's queueing (``jobs.created_at``, so
quiet period + assembler poll), the claim (``started_at``, the worker's poll), the stage seconds
the worker writes into the job (select, pixels, text, model, results), the recording of the job
(``finished_at``) and the outbox (first result file at the destination: its poll and the
association; last file: the objects' transfer). The reference is the model call alone
(``engine.predict`` on the same study's 4 views prepared by the node's pixel pipeline, same
package and backend, in this process after the node has stopped): the ratio shows the overhead.

``--packages`` (default ``demo,512x256``, the issue's two targets: <= 3 s and <= 1.5 s):
``demo`` (the packaged model, cadnode-lite0-minilm-1024 at 1024x512), ``HxW`` (the CPU
architecture ``cadnode-effb0-cpu`` exported at that size with random weights, as bench_backends
does, cached under ``--cache``; needs torch, about 30 s the first time, skipped with a note
without it) or a package folder. Each package gets its own node; its round 1 is a warm-up (the
first inference of a fresh session, the decoding child's first job) and is reported apart.
About 1.5 minutes with the defaults on the 2-core development VM (plus the export once).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from cadnode.demo import free_port, stop_process, write_demo_study
from tests.bench import report
from tests.bench.report import REPO, Table
from tests.helpers import NodeProcess, port_answers, wait_until

#: The scheduler's shortest interval (cadnode.jobs.scheduler: ``max(0.2, poll_seconds)``).
MIN_POLL = 0.2
DEMO = "demo"
#: The CPU architecture exported for ``HxW`` packages (as tests/bench/bench_backends.py).
SIZED_ARCH = "cadnode-effb0-cpu"
DONE_STATES = ("done", "done-partial")
TARGETS = {(512, 256): 1.5, (1024, 512): 3.0}  # seconds, the issue's
STAGES = ("select", "pixels", "text", "model", "results")


# --- the exam, re-identified each round -------------------------------------------------------

class Exam:
    """The demo exam read once; :meth:`write` saves it as a new study (new Study, Series and
    SOP Instance UIDs, the pixel data untouched) and returns the four paths."""

    def __init__(self, folder: Path) -> None:
        self.sources = write_demo_study(folder / "demo")
        self.datasets = [pydicom.dcmread(p) for p in self.sources]
        self.folder = folder
        self.count = 0
        self.megabytes = sum(p.stat().st_size for p in self.sources) / 1e6

    def write(self) -> tuple[str, list[Path]]:
        self.count += 1
        study = generate_uid()
        series: dict[str, str] = {}
        out = self.folder / f"study-{self.count:04d}"
        out.mkdir(parents=True)
        paths = []
        for src, ds in zip(self.sources, self.datasets, strict=True):
            ds.StudyInstanceUID = study
            ds.SeriesInstanceUID = series.setdefault(str(ds.SeriesInstanceUID), generate_uid())
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.AccessionNumber = f"B{self.count:06d}"
            path = out / src.name
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        return study, paths


# --- the processes ---------------------------------------------------------------------------

class StoreSCP:
    """DCMTK storescp writing every object it accepts into ``folder`` (file name: modality
    prefix + SOP Instance UID)."""

    def __init__(self, folder: Path, ae_title: str = "PACS") -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.ae_title, self.port = folder, ae_title, free_port()
        self.proc = subprocess.Popen(
            ["storescp", "+xa", "-aet", ae_title, "-od", str(folder), str(self.port)],
            env=dict(os.environ, TCP_NODELAY="1"),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_until(lambda: port_answers(self.port) or self.proc.poll() is not None, 30,
                          0.02):
            raise RuntimeError("storescp did not start listening")
        if self.proc.poll() is not None:
            raise RuntimeError(f"storescp exited with {self.proc.returncode}")

    @property
    def destination(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def files(self, sop_uids: Sequence[str]) -> list[Path]:
        """The received files of these objects (those there now)."""
        wanted = set(sop_uids)
        return [p for p in self.folder.iterdir() if p.name.split(".", 1)[-1] in wanted]

    def stop(self) -> None:
        stop_process(self.proc)


def start_node(root: Path, destination: str, package: Path | None, args: argparse.Namespace,
               concurrency: int = 1) -> NodeProcess:
    """A real ``cadnode serve`` with its home under ``root``, ready (it answers C-ECHO)."""
    env = {
        "CADNODE_DESTINATIONS": destination,
        "CADNODE_COMPLETE_SECONDS": str(args.quiet),
        "CADNODE_POLL_SECONDS": str(args.poll),
        "CADNODE_BACKEND": args.backend,
        "CADNODE_LOG_FILE": "",
        "CADNODE_MODEL": str(package) if package else "",
    }
    node = NodeProcess(root / "node", 0, env, cwd=REPO,
                       command=("serve", "--concurrency", str(concurrency)),
                       log=root / "node.log")
    try:
        node.wait_ready(180)
    except Exception:
        node.stop()
        raise
    return node


def push(port: int, files: Sequence[Path]) -> None:
    """One association, the files in order, as a modality sends them; returns once the last
    one is acknowledged (the RLE files proposed as they are, ``-xr``)."""
    r = subprocess.run(["storescu", "-xr", "-aet", "MODALITY", "-aec", "CADNODE", "127.0.0.1",
                        str(port), *map(str, files)], capture_output=True, text=True)
    if r.returncode != 0 or "E: " in r.stderr:
        raise RuntimeError(f"storescu failed: {r.stderr[-2000:]}")


# --- what the node recorded ------------------------------------------------------------------

@dataclass
class StudyRecord:
    """One study as the node's database and the destination tell it (wall-clock seconds)."""

    study_uid: str
    first_received: float
    last_received: float
    state: str
    created_at: float
    started_at: float
    finished_at: float
    seconds: dict[str, float]
    sop_uids: list[str] = field(default_factory=list)
    sent_at: list[float] = field(default_factory=list)
    arrived: list[float] = field(default_factory=list)  # destination files' mtimes


def finished_studies(db: Path) -> dict[str, StudyRecord]:
    """Every study whose latest job ended and whose deliveries were all acknowledged (read
    from the node's SQLite file, read-only: two queries, whatever the number of studies)."""
    if not db.exists():
        return {}
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as con:
        jobs = con.execute("""
            SELECT s.study_uid, s.first_received, s.last_received, j.id, j.state,
                   j.created_at, j.started_at, j.finished_at, j.scores_json
            FROM studies s JOIN jobs j ON j.study_id = s.id
            WHERE j.id = (SELECT max(id) FROM jobs WHERE study_id = s.id)
              AND j.finished_at IS NOT NULL""").fetchall()
        deliveries: dict[int, list[tuple[str, str, float | None]]] = {}
        for job_id, sop_uid, state, sent_at in con.execute(
                "SELECT job_id, sop_instance_uid, state, sent_at FROM deliveries"):
            deliveries.setdefault(job_id, []).append((sop_uid, state, sent_at))
    out: dict[str, StudyRecord] = {}
    for uid, first, last, job_id, state, created, started, finished, scores in jobs:
        if state not in DONE_STATES:
            raise RuntimeError(f"study {uid}: job {job_id} ended {state}")
        sent = deliveries.get(job_id, [])
        if not sent or any(d[1] != "sent" for d in sent):
            continue
        out[uid] = StudyRecord(uid, first, last, state, created, started, finished,
                               json.loads(scores)["seconds"], [d[0] for d in sent],
                               [d[2] or 0.0 for d in sent])
    return out


def attach_arrivals(record: StudyRecord, pacs: StoreSCP) -> None:
    files = pacs.files(record.sop_uids)
    if len(files) != len(record.sop_uids):
        raise RuntimeError(f"study {record.study_uid}: {len(files)} of "
                           f"{len(record.sop_uids)} results at the destination")
    record.arrived = sorted(p.stat().st_mtime for p in files)


def breakdown(rec: StudyRecord, acked: float, quiet: float) -> dict[str, float]:
    """Seconds of each step from ``acked`` (the last instance acknowledged) to the last result
    at the destination."""
    s = rec.seconds
    steps = {"queued (quiet period + assembler poll)": rec.created_at - acked,
             "claimed (worker poll)": rec.started_at - rec.created_at}
    steps |= {k: s.get(k, 0.0) for k in STAGES}
    steps["recorded (job committed)"] = rec.finished_at - rec.started_at - s.get("total", 0.0)
    steps["first result at destination (outbox poll, association)"] = (
        rec.arrived[0] - rec.finished_at)
    steps[f"last result ({len(rec.arrived)} objects sent)"] = rec.arrived[-1] - rec.arrived[0]
    steps["turnaround"] = rec.arrived[-1] - acked
    steps["turnaround beyond the quiet period"] = steps["turnaround"] - quiet
    return steps


# --- the model alone -------------------------------------------------------------------------

def model_seconds(package: Path | None, backend: str, files: Sequence[Path], runs: int) -> float:
    """Median seconds of one ``engine.predict`` on the study's views as the node prepares them
    (same package and backend as the node; one warm-up call first)."""
    from cadnode.config import Settings
    from cadnode.jobs.inputs import file_inputs
    from cadnode.jobs.worker import load_model

    engine, tokenizer = load_model(Settings(model=str(package) if package else "",
                                            backend=backend))
    try:
        x = file_inputs(files, engine.manifest, tokenizer)
        engine.predict(x.images, x.input_ids, x.attention_mask)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            engine.predict(x.images, x.input_ids, x.attention_mask)
            times.append(time.perf_counter() - start)
    finally:
        close = getattr(engine, "close", None)
        if callable(close):
            close()
    return statistics.median(times)


class Unavailable(RuntimeError):
    """A package that cannot be made here (the table says why)."""


def resolve_package(item: str, cache: Path) -> tuple[str, Path | None, tuple[int, int]]:
    """``demo``, ``HxW`` or a package folder -> (label, folder or None for the default,
    input size)."""
    from cadnode.runtime import DEFAULT_MODEL_PACKAGE, read_manifest

    if item == DEMO:
        folder: Path | None = None
        manifest = read_manifest(DEFAULT_MODEL_PACKAGE)
    elif "x" in item and not Path(item).exists():
        from tests.bench.backend_timing import package, parse_sizes

        try:
            import torch  # noqa: F401  (the export needs it; the node does not)
        except ImportError:
            raise Unavailable(f"{item}: exporting a package needs torch") from None

        (size,) = parse_sizes(item)
        folder = package(cache, SIZED_ARCH, size)[0]
        manifest = read_manifest(folder)
    else:
        folder = Path(item).absolute()
        manifest = read_manifest(folder)
    h, w = manifest.input_size
    return f"{manifest.name} {h}x{w}", folder, (h, w)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# --- the benchmark ---------------------------------------------------------------------------

def add_node_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the node under test and of its model-only reference (this benchmark's
    and bench_sustained's)."""
    p.add_argument("--quiet", type=float, default=1.0,
                   help="CADNODE_COMPLETE_SECONDS, the quiet period (default 1)")
    p.add_argument("--poll", type=float, default=MIN_POLL,
                   help=f"CADNODE_POLL_SECONDS (default {MIN_POLL}, the scheduler's minimum)")
    p.add_argument("--backend", default="onnxruntime", help="CADNODE_BACKEND")
    p.add_argument("--model-runs", type=int, default=5, help="model-only calls timed")
    p.add_argument("--cache", type=Path, default=REPO / "var" / "bench-packages",
                   help="where HxW packages are exported to (and reused from)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rounds", type=int, default=5, help="measured rounds per package "
                   "(after one warm-up round)")
    p.add_argument("--packages", default=f"{DEMO},512x256",
                   help="comma-separated: demo, HxW (cadnode-effb0-cpu at that size, exported "
                   "once; needs torch) or a package folder (default: demo,512x256)")
    add_node_arguments(p)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per round at most")


def run(args: argparse.Namespace) -> Table:
    table = Table(
        "turnaround", "Turnaround: last instance acknowledged to last result acknowledged",
        "python -m tests.bench.bench_turnaround",
        ["package", "step", "median s", "min s", "max s", "x model call"])
    with tempfile.TemporaryDirectory(prefix="bench-turnaround-") as tmp:
        root = Path(tmp)
        exam = Exam(root / "exam")
        for n, item in enumerate(str(args.packages).split(",")):
            try:
                label, folder, size = resolve_package(item.strip(), args.cache)
            except Unavailable as exc:
                table.notes.append(f"skipped {exc}")
                continue
            rounds, warm = _rounds(root / f"p{n}", exam, folder, args)
            model = model_seconds(folder, args.backend, exam.sources, args.model_runs)
            keys = list(rounds[0])
            for key in keys:
                values = [r[key] for r in rounds]
                table.add(label, key, median(values), min(values), max(values),
                          f"{median(values) / model:.2f}")
            table.add(label, "reference: model call alone (4 views)", model, "", "", "1.00")
            target = TARGETS.get(size)
            total = median([r["turnaround"] for r in rounds])
            beyond = median([r["turnaround beyond the quiet period"] for r in rounds])
            table.notes.append(
                f"{label}: turnaround {total:.2f} s, {beyond:.2f} s beyond the {args.quiet:g} s "
                f"quiet period" + (f" (target <= {target:g} s)" if target else "") +
                f"; warm-up round {warm:.2f} s; {len(rounds)} rounds.")
    table.notes.append(
        f"{exam.megabytes:.0f} MB 4-view demo exam (RLE lossless) pushed by storescu; "
        f"CADNODE_COMPLETE_SECONDS={args.quiet:g}, CADNODE_POLL_SECONDS={args.poll:g}, "
        f"backend {args.backend}; destination DCMTK storescp. Steps in order; turnaround = their "
        "sum. Each row's median is its own, so the medians need not add up.")
    return table


def _rounds(root: Path, exam: Exam, package: Path | None,
            args: argparse.Namespace) -> tuple[list[dict[str, float]], float]:
    """One node, ``1 + args.rounds`` studies one after another; the warm-up's turnaround
    apart."""
    pacs = StoreSCP(root / "pacs")
    try:
        node = start_node(root, pacs.destination, package, args)
        try:
            db = node.home / "cadnode.db"
            laps = []
            for _ in range(1 + args.rounds):
                uid, files = exam.write()
                sent = time.time()
                push(node.port, files)
                acked = time.time()
                found: dict[str, StudyRecord] = {}

                def finished(uid: str = uid, found: dict[str, StudyRecord] = found) -> bool:
                    if node.proc.poll() is not None:
                        raise RuntimeError(f"the node exited: {node.log.read_text()[-3000:]}")
                    found.update(finished_studies(db))
                    return uid in found

                if not wait_until(finished, args.timeout, interval=0.05):
                    raise TimeoutError(f"study {uid}: no results within {args.timeout:.0f} s; "
                                       f"see {node.log}")
                record = found[uid]
                attach_arrivals(record, pacs)
                laps.append(breakdown(record, acked, args.quiet))
                laps[-1]["reference: the push itself (storescu, not in the turnaround)"] = (
                    acked - sent)
        finally:
            node.stop()
    finally:
        pacs.stop()
    return laps[1:], laps[0]["turnaround"]


if __name__ == "__main__":
    report.main(__doc__, add_arguments, run)
