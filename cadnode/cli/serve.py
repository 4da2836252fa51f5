"""``cadnode serve``: listener, assembler, worker and sender in one supervised process."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from typing import Any

from cadnode.cli.common import (
    model_error,
    open_database,
    port_error,
    prepare_home,
    setup_logging,
    tls_contexts,
)
from cadnode.config import Settings, SettingsError


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from cadnode.dicom.listener import Listener, Policy, cleanup_incoming
    from cadnode.jobs.queue import record_instance
    from cadnode.jobs.scheduler import create_outbox, create_scheduler
    from cadnode.jobs.worker import Worker

    prepare_home(settings)  # an unwritable home is one line now, not a traceback later
    tls = tls_contexts(settings)  # so is a certificate that does not load
    setup_logging(settings)
    log = logging.getLogger("cadnode.serve")
    db = open_database(settings)
    removed = cleanup_incoming(settings.spool_dir)
    if removed:
        db.log("startup", f"removed {removed} partial file(s) that were never acknowledged")
    from cadnode.runtime import BackendUnavailable

    metrics = _metrics(settings)
    try:  # the model first: a backend that cannot run stops start-up here, in one line
        worker = Worker(settings, db, metrics=metrics)
    except BackendUnavailable as exc:
        raise SettingsError(f"CADNODE_BACKEND={settings.backend}, CADNODE_DEVICE="
                            f"{settings.device}: {exc}") from None
    except Exception as exc:  # a corrupt or incomplete package (the manifest says which file)
        raise SettingsError(model_error(settings, exc)) from None
    http = _http_server(settings, db, worker, metrics)  # bound now: a port in use stops here
    on_stored, on_refused = _counted(
        lambda stored: record_instance(db, stored),
        lambda msg, uid: db.log("refused", msg, uid or None, "warning"), metrics)
    listener = Listener(
        settings.spool_dir,
        on_stored=on_stored,
        ae_title=settings.ae_title,
        on_refused=on_refused,
        policy=Policy.from_settings(settings, tls.server),
    )
    try:
        port = listener.start(settings.host, settings.port)
    except OSError as exc:
        worker.close()
        if http is not None:
            http.stop()
        raise SettingsError(port_error(settings, exc)) from None
    outbox = create_outbox(settings, db, metrics, tls.client)
    sched = create_scheduler(settings, db, outbox)
    sched.add_job(listener.sweep, "interval", seconds=60, id="sweep-incoming")
    sched.start()
    worker_thread = threading.Thread(target=worker.run_forever, name="worker", daemon=True)
    worker_thread.start()
    if http is not None:
        http.node.checks["worker"] = lambda: "" if worker_thread.is_alive() and worker.healthy \
            else "the worker is not running jobs (see the log)"
        http.start()
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
    if http is not None:
        print(f"cadnode: dashboard on {http.url} (/metrics, /healthz, /readyz)", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    dead = ""
    while not stop.wait(SUPERVISE_SECONDS) and not dead:
        dead = _dead_part(listener, worker_thread, sched) or (
            "the web server" if http is not None and not http.alive else "")
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
    if http is not None:
        http.stop()
    db.dispose()
    return 1 if dead else 0


#: How often ``serve`` checks that the listener, the worker and the scheduler still run.
SUPERVISE_SECONDS = 2.0


def _metrics(settings: Settings) -> Any:
    """The node's metrics (cadnode.web.metrics.NodeMetrics) when the web server is on."""
    if not settings.http_port:
        return None
    from cadnode.web.metrics import NodeMetrics

    return NodeMetrics()


def _http_server(settings: Settings, db: Any, worker: Any, metrics: Any) -> Any:
    """The dashboard, /metrics, /healthz and /readyz (not started yet), or None when
    CADNODE_HTTP_PORT is 0."""
    if metrics is None:
        return None
    from cadnode.web.app import Node
    from cadnode.web.metrics import ModelInfo
    from cadnode.web.server import HttpServer

    m = worker.engine.manifest
    model = ModelInfo(m.name, m.version, str(worker.engine.backend),
                      tuple(worker.engine.providers), bool(m.demo))
    node = Node(db=db, home=settings.home, spool_dir=settings.spool_dir,
                results_dir=settings.results_dir, ae_title=settings.ae_title, model=model,
                metrics=metrics, token=settings.http_token)
    try:
        return HttpServer(node, settings.http_host, settings.http_port)
    except SettingsError:  # the port is taken: one line, and the decoding child stopped
        worker.close()
        raise


def _counted(on_stored: Any, on_refused: Any, metrics: Any) -> tuple[Any, Any]:
    """The listener's callbacks, counting what they record when there are metrics."""
    if metrics is None:
        return on_stored, on_refused

    def stored(instance: Any) -> Any:
        result = on_stored(instance)
        metrics.instance_received(instance.size)
        return result

    def refused(message: str, study_uid: str) -> Any:
        try:
            return on_refused(message, study_uid)
        finally:  # counted once recorded (or once recording it failed)
            metrics.refused(message)

    return stored, refused


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
    p.set_defaults(func=cmd_serve, node_process=True)
