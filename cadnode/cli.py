"""The command line: thin wrappers over the library (serve, jobs, send, retry, demo)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cadnode.config import Settings, SettingsError, load_settings
from cadnode.runtime.enum import PRECISIONS, Backend


def setup_logging(settings: Settings | None, level: str = "INFO") -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if settings is not None:
        logs = settings.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(logs / "cadnode.log"))
    # Third-party libraries (pynetdicom's PDUs, highdicom's template chatter, APScheduler's
    # runs) log at WARNING and above; cadnode's own loggers at the configured level.
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    logging.getLogger("cadnode").setLevel((settings.log_level if settings else level).upper())
    # A poll that finds the previous one still running is skipped by design (coalescing);
    # APScheduler warns about each skip, which tells an admin nothing.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)


def open_database(settings: Settings) -> Any:
    from cadnode.jobs.db import Database

    try:
        settings.home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SettingsError(f"CADNODE_HOME: cannot create {settings.home}: "
                            f"{exc.strerror or exc}") from None
    db = Database(settings.database_url, home=settings.home)
    db.create_schema()
    return db


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from cadnode.dicom.listener import Listener, Policy, cleanup_incoming
    from cadnode.jobs.queue import record_instance
    from cadnode.jobs.scheduler import create_outbox, create_scheduler
    from cadnode.jobs.worker import Worker

    setup_logging(settings)
    log = logging.getLogger("cadnode.serve")
    db = open_database(settings)
    removed = cleanup_incoming(settings.spool_dir)
    if removed:
        db.log("startup", f"removed {removed} partial file(s) that were never acknowledged")
    from cadnode.runtime import BackendUnavailable

    try:  # the model first: a backend that cannot run stops start-up here, in one line
        worker = Worker(settings, db)
    except BackendUnavailable as exc:
        raise SettingsError(f"CADNODE_BACKEND={settings.backend}, CADNODE_DEVICE="
                            f"{settings.device}: {exc}") from None
    listener = Listener(
        settings.spool_dir,
        on_stored=lambda stored: record_instance(db, stored),
        ae_title=settings.ae_title,
        on_refused=lambda msg, uid: db.log("refused", msg, uid or None, "warning"),
        policy=Policy.from_settings(settings),
    )
    port = listener.start(settings.host, settings.port)
    outbox = create_outbox(settings, db)
    sched = create_scheduler(settings, db, outbox)
    sched.add_job(listener.sweep, "interval", seconds=60, id="sweep-incoming")
    sched.start()
    worker_thread = threading.Thread(target=worker.run_forever, name="worker", daemon=True)
    worker_thread.start()
    m = worker.engine.manifest
    runs_on = f"{worker.engine.backend} ({', '.join(worker.engine.providers)})"
    db.log("startup", f"serving as {settings.ae_title} on port {port}, model {m.name} "
           f"{m.version} on {runs_on}")
    print(
        f"cadnode: listening as {settings.ae_title} on {settings.host}:{port}; "
        f"home {settings.home}; model {m.name} {m.version} on {runs_on}; "
        f"destinations {', '.join(map(str, settings.destinations)) or 'none'}",
        flush=True,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    dead = ""
    while not stop.wait(SUPERVISE_SECONDS) and not dead:
        dead = _dead_part(listener, worker_thread, sched)
    if dead:  # never a live listener over a dead worker: let systemd/Kubernetes restart us
        log.error("%s stopped; exiting so that the service manager restarts the node", dead)
        try:
            db.log("stopped", f"{dead} stopped; the node exits", level="error")
        except Exception:  # the database may be what failed
            log.exception("could not record the stop")
    log.info("stopping")
    listener.stop()
    worker.stop()
    sched.shutdown(wait=True)
    outbox.join(timeout=60)  # deliveries in flight finish and are recorded
    worker_thread.join(timeout=60)
    db.dispose()
    return 1 if dead else 0


#: How often ``serve`` checks that the listener, the worker and the scheduler still run.
SUPERVISE_SECONDS = 2.0


def _dead_part(listener: Any, worker_thread: threading.Thread, sched: Any) -> str:
    """The name of a part of the node that has stopped by itself, or ""."""
    if not worker_thread.is_alive():
        return "the worker"
    if not sched.running:
        return "the scheduler"
    if not listener.serving:
        return "the listener"
    return ""


def _fmt_time(t: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) if t else "-"


def _fmt_scores(job: dict[str, Any] | None) -> str:
    if not job or not job.get("scores"):
        return "-"
    breasts = job["scores"].get("breasts", {})
    return " ".join(
        f"{side}:ca={b['cancer']:.2f},calc={b['calcification']:.2f}"
        for side, b in sorted(breasts.items())
    )


def _state_note(job: dict[str, Any]) -> str:
    """Why a study is failed or done-partial, in a few words."""
    if job.get("error"):
        return f" ({job['error'][:40]})"
    scores = job.get("scores") or {}
    notes = []
    missing = (scores.get("selection") or {}).get("missing") or {}
    if missing:
        notes.append("missing " + ",".join(missing))
    failed = scores.get("failed_views") or {}
    if failed:
        notes.append("unreadable " + ",".join(failed))
    return f" ({'; '.join(notes)})" if notes else ""


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ["STUDY", "STATE", "VIEWS", "SCORES", "SENT", "RECEIVED", "FINISHED"]
    lines = [header]
    for r in rows:
        job = r["job"] or {}
        d = r["deliveries"]
        total = sum(d.values())
        lines.append([
            "…" + r["study_uid"][-20:] if len(r["study_uid"]) > 21 else r["study_uid"],
            r["state"] + _state_note(job),
            ",".join(r["views"]) or "-",
            _fmt_scores(job),
            (f"{d.get('sent', 0)}/{total}" + (f" ({d['dead']} dead)" if d.get("dead") else ""))
            if total else "-",
            _fmt_time(r["last_received"]),
            _fmt_time(job.get("finished_at")),
        ])
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in lines)


def cmd_jobs(settings: Settings, args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from cadnode.jobs.db import Event
    from cadnode.jobs.queue import study_rows

    db = open_database(settings)
    rows = study_rows(db, args.limit)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows))
    if not args.follow:
        return 0
    with db.session() as s:
        last = s.scalar(select(Event.id).order_by(Event.id.desc()).limit(1)) or 0
    try:
        while True:
            time.sleep(1.0)
            with db.session() as s:
                events = s.scalars(select(Event).where(Event.id > last).order_by(Event.id)).all()
            for e in events:
                last = e.id
                if args.json:
                    print(json.dumps({"at": e.at, "level": e.level, "kind": e.kind,
                                      "study_uid": e.study_uid, "message": e.message}), flush=True)
                else:
                    print(f"{_fmt_time(e.at)} {e.level:<7} {e.kind:<14} "
                          f"{(e.study_uid or '-')[-24:]:<24} {e.message}", flush=True)
    except KeyboardInterrupt:
        return 0


def cmd_send(settings: Settings, args: argparse.Namespace) -> int:
    from cadnode.dicom.sender import DeliveryError, iter_dicom_files, send_files

    tls = None
    if args.tls:
        from cadnode.dicom.sender import client_ssl_context

        tls = client_ssl_context(settings.send_tls_ca, settings.send_tls_cert,
                                 settings.send_tls_key)
    files = list(iter_dicom_files(Path(p) for p in args.paths))
    if not files:
        print("cadnode send: no DICOM files found", file=sys.stderr)
        return 2
    try:
        results = send_files(files, args.host, args.port, args.called_aet, calling_ae=args.aet,
                             tls=tls)
    except DeliveryError as exc:
        print(f"cadnode send: {exc}", file=sys.stderr)
        return 1
    bad = 0
    for r in results:
        status = "-" if r.status is None else f"0x{r.status:04X}"
        if not r.ok:
            bad += 1
        print(f"{status}  {r.path}" + (f"  {r.error}" if r.error else ""))
    print(f"sent {len(results) - bad} of {len(results)} file(s)")
    return 1 if bad else 0


def cmd_retry(settings: Settings, args: argparse.Namespace) -> int:
    from cadnode.jobs.queue import retry_dead_deliveries

    db = open_database(settings)
    n = retry_dead_deliveries(db, args.study)
    print(f"{n} dead-lettered delivery(ies) put back in the outbox")
    return 0


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    from cadnode.demo import run_demo

    return run_demo(keep=args.keep, timeout=args.timeout)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cadnode", description=__doc__)
    p.add_argument("--config", help="TOML settings file (default: ./cadnode.toml if present)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="listener + assembler + worker + sender in one process")
    j = sub.add_parser("jobs", help="recent studies and their jobs")
    j.add_argument("--json", action="store_true", help="print a JSON list")
    j.add_argument("--follow", action="store_true", help="keep printing events as they happen")
    j.add_argument("--limit", type=int, default=50)
    s = sub.add_parser("send", help="push DICOM files or folders to a storage SCP")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=None, help="default: CADNODE_PORT")
    s.add_argument("--aet", default="CADNODE_SCU", help="calling AE title")
    s.add_argument("--called-aet", default=None, help="default: CADNODE_AE_TITLE")
    s.add_argument("--tls", action="store_true",
                   help="TLS, with CADNODE_SEND_TLS_CA / _CERT / _KEY")
    s.add_argument("paths", nargs="+")
    r = sub.add_parser("retry", help="put dead-lettered deliveries back in the outbox")
    r.add_argument("--study", help="only this Study Instance UID")
    d = sub.add_parser("demo", help="node + demo PACS + a real 4-view exam, end to end")
    d.add_argument("--keep", action="store_true", help="keep the temporary home")
    d.add_argument("--timeout", type=float, default=300.0)
    e = sub.add_parser("engine", help="model repositories and engines for GPU servers")
    esub = e.add_subparsers(dest="engine_command", required=True)
    t = esub.add_parser("triton-repo", help="a Triton model repository for a model package",
                        description="Write OUT/<model>/config.pbtxt and OUT/<model>/1/ for a "
                        "Triton Inference Server (see trt_engines/README.md).")
    t.add_argument("--package", default=None, help="model package (default: CADNODE_MODEL, "
                   "else the packaged demonstration model)")
    t.add_argument("--out", required=True, help="the model repository folder")
    t.add_argument("--platform", default="onnxruntime_onnx",
                   choices=["onnxruntime_onnx", "tensorrt_plan"])
    t.add_argument("--plan", default=None, help="the TensorRT engine, for tensorrt_plan")
    t.add_argument("--max-views", type=int, default=8, help="max_batch_size (views)")
    t.add_argument("--kind", default="gpu", choices=["gpu", "cpu"], help="instance_group kind")
    b = esub.add_parser("build", help="a TensorRT engine for this GPU from a package's ONNX",
                        description="Build (or find up to date) the TensorRT plan of a model "
                        "package for this GPU and TensorRT version, under CADNODE_HOME/engines "
                        "(see trt_engines/README.md). Needs an NVIDIA GPU, TensorRT and "
                        "cuda-python.")
    b.add_argument("--package", default=None, help="model package (default: CADNODE_MODEL, "
                   "else the packaged demonstration model)")
    b.add_argument("--precision", default="fp16", choices=[p.value for p in
                                                           PRECISIONS[Backend.TENSORRT]])
    b.add_argument("--fp16", dest="precision", action="store_const", const="fp16",
                   help="same as --precision fp16 (the default)")
    b.add_argument("--int8", dest="precision", action="store_const", const="int8",
                   help="same as --precision int8 (needs --calibration)")
    b.add_argument("--calibration", default=None,
                   help="int8: a folder of this site's own DICOM mammograms")
    b.add_argument("--max-views", type=int, default=None,
                   help="largest batch of the profile (default: CADNODE_MAX_VIEWS)")
    b.add_argument("--workspace-mb", type=int, default=4096, help="builder workspace limit")
    q = esub.add_parser("quantize", help="an int8 ONNX model for CPUs, kept only if it scores "
                        "the benchmark as well as fp32",
                        description="Quantise a package's model.onnx to int8 with ONNX Runtime "
                        "and keep it under CADNODE_HOME/engines only if view AUROC (cancer and "
                        "calcification) stays within --max-auroc-drop of fp32 on the benchmark; "
                        "CADNODE_PRECISION=int8 then serves it (see trt_engines/README.md).")
    q.add_argument("--package", default=None, help="model package (default: CADNODE_MODEL, "
                   "else the packaged demonstration model)")
    q.add_argument("--benchmark", default=None, help="a labelled DICOM folder (labels.csv as "
                   "train/synthetic.py writes it); default: a held-out synthetic set")
    q.add_argument("--calibration", default=None, help="DICOM files for static int8 ranges "
                   "(default: a small synthetic set)")
    q.add_argument("--max-auroc-drop", type=float, default=0.005)
    q.add_argument("--method", default="auto", choices=["auto", "dynamic", "static"])
    return p


def cmd_engine(settings: Settings, args: argparse.Namespace) -> int:
    """The ``engine`` subcommands; whatever stops one is one line on stderr, exit 2."""
    from cadnode.runtime import DEFAULT_MODEL_PACKAGE, BackendUnavailable

    package = args.package or settings.model or str(DEFAULT_MODEL_PACKAGE)
    actions = {"build": _engine_build, "quantize": _engine_quantize,
               "triton-repo": _engine_triton_repo}
    try:
        return actions[args.engine_command](settings, args, package)
    except ImportError as exc:
        extra = " (pip install 'cadnode[triton]')" if (exc.name or "").startswith("tritonclient") \
            else ""
        print(f"cadnode engine {args.engine_command}: needs the Python module {exc.name}{extra}",
              file=sys.stderr)
    except (BackendUnavailable, ValueError, OSError) as exc:
        print(f"cadnode engine {args.engine_command}: {exc}", file=sys.stderr)
    return 2


def _engine_triton_repo(settings: Settings, args: argparse.Namespace, package: str) -> int:
    from trt_engines.triton_repo import RepositoryOptions, write_repository

    options = RepositoryOptions(platform=args.platform, max_views=args.max_views, kind=args.kind)
    folder = write_repository(package, args.out, options, plan=args.plan)
    print(f"wrote {folder / 'config.pbtxt'} and {folder / str(options.version)}/")
    return 0


def _engine_build(settings: Settings, args: argparse.Namespace, package: str) -> int:
    from trt_engines.build import build_engine

    plan = build_engine(package, home=settings.home, precision=args.precision,
                        max_views=args.max_views or settings.max_views,
                        workspace_mb=args.workspace_mb,
                        calibration=Path(args.calibration) if args.calibration else None)
    print(f"engine {plan}")
    return 0


def _engine_quantize(settings: Settings, args: argparse.Namespace, package: str) -> int:
    """Exit 1 when the int8 model was refused (the summary says why)."""
    from trt_engines.quantize import quantize_package

    report = quantize_package(
        package, home=settings.home, max_auroc_drop=args.max_auroc_drop, method=args.method,
        benchmark=Path(args.benchmark) if args.benchmark else None,
        calibration=Path(args.calibration) if args.calibration else None)
    print(report.summary())
    return 0 if report.kept else 1


COMMANDS = {"serve": cmd_serve, "jobs": cmd_jobs, "send": cmd_send, "retry": cmd_retry,
            "demo": cmd_demo, "engine": cmd_engine}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cadnode.dicom.sender import configure_pynetdicom

    configure_pynetdicom()  # the one place process-wide library settings are made
    try:
        settings = load_settings(args.config)
    except SettingsError as exc:
        print(f"cadnode: bad setting: {exc}", file=sys.stderr)
        return 2
    if args.command == "send":
        args.port = settings.port if args.port is None else args.port
        args.called_aet = args.called_aet or settings.ae_title
    try:
        return COMMANDS[args.command](settings, args)
    except SettingsError as exc:
        print(f"cadnode: bad setting: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
