"""``cadnode serve``: listener, assembler, worker and sender in one supervised process."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from typing import Any

from cadnode.cli.common import open_database, setup_logging
from cadnode.config import Settings, SettingsError


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




def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("serve", parents=[common],
                       help="listener + assembler + worker + sender in one process",
                       description="Receive mammograms, analyse them and send the results; "
                       "runs until SIGINT/SIGTERM.")
    p.set_defaults(func=cmd_serve)
