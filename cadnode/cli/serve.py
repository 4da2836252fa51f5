"""``cadnode serve``, ``cadnode listen`` and ``cadnode worker``: the node's processes.

``serve`` runs everything in one supervised process (a clinic); ``listen`` and ``worker`` split
it so that several listeners and many workers share one job database and one spool (a
programme). Duties that must run once (assembling, sending) go to whichever process holds
their lock (cadnode.jobs.leader)."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import socket
import threading
from enum import StrEnum
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


class Role(StrEnum):
    """What a node process runs: ``serve`` is both."""

    LISTEN = "listen"  # the DICOM listener, and (when it leads) the assembler and retention
    WORK = "work"  # the workers, and (when it leads) the sender and lease expiry


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    return run_node(settings, frozenset(Role), args.concurrency)


def cmd_listen(settings: Settings, args: argparse.Namespace) -> int:
    return run_node(settings, frozenset({Role.LISTEN}))


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    return run_node(settings, frozenset({Role.WORK}), args.concurrency)


def run_node(settings: Settings, roles: frozenset[Role], concurrency: int = 1) -> int:
    """Start the parts ``roles`` name, supervise them until SIGINT/SIGTERM or until one stops
    by itself (exit status 1, so that the service manager restarts the process)."""
    from cadnode.dicom.listener import cleanup_incoming
    from cadnode.jobs.leader import Duty, Leadership
    from cadnode.jobs.scheduler import create_outbox, create_scheduler, send_now

    prepare_home(settings)  # an unwritable home is one line now, not a traceback later
    tls = tls_contexts(settings)  # so is a certificate that does not load
    setup_logging(settings)
    log = logging.getLogger("cadnode.serve")
    db = open_database(settings)
    metrics = _metrics(settings)
    workers = _workers(settings, db, metrics, concurrency) if Role.WORK in roles else []
    http = _http_server(settings, db, workers, metrics)  # bound now: a port in use stops here
    listener, port = None, 0
    if Role.LISTEN in roles:
        stale = 4 * settings.network_timeout  # other listeners' files being received are newer
        removed = cleanup_incoming(settings.spool_dir, older_than=stale)
        if removed:
            db.log("startup", f"removed {removed} partial file(s) that were never acknowledged")
        try:
            listener, port = _listener(settings, db, metrics, tls.server)
        except SettingsError:
            for w in workers:
                w.close()
            if http is not None:
                http.stop()
            raise
    leaders = ([Leadership(db, Duty.ASSEMBLER)] if Role.LISTEN in roles else []) + (
        [Leadership(db, Duty.SENDER)] if Role.WORK in roles else [])
    outbox = create_outbox(settings, db, metrics, tls.client) if Role.WORK in roles else None
    # A study queued here is claimed by these workers at once, and results leave at once:
    # the polls remain for what other processes queue and for retries.
    sched = create_scheduler(settings, db, leaders, outbox,
                             on_queued=lambda _uids: [w.wake() for w in workers])
    for w in workers:
        w.after_job = functools.partial(send_now, sched)
    if listener is not None:
        sched.add_job(listener.sweep, "interval", seconds=60, id="sweep-incoming")
    sched.start()
    threads = [threading.Thread(target=w.run_forever, name=f"worker-{n}", daemon=True)
               for n, w in enumerate(workers)]
    for t in threads:
        t.start()
    if http is not None:
        if workers:
            http.node.checks["worker"] = lambda: "" if all(
                t.is_alive() for t in threads) and all(w.healthy for w in workers) \
                else "a worker is not running jobs (see the log)"
        if listener is not None:
            http.node.checks["listener"] = lambda: "" if listener.serving \
                else "the DICOM listener is not serving"
        http.start()
    _announce(settings, db, roles, port, workers)
    if http is not None:
        print(f"cadnode: dashboard on {http.url} (/metrics, /healthz, /readyz)", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    dead = ""
    while not stop.wait(SUPERVISE_SECONDS) and not dead:
        dead = _dead_part(listener, threads, sched) or (
            "the web server" if http is not None and not http.alive else "")
    if dead:  # never a live listener over a dead worker: let systemd/Kubernetes restart us
        log.error("%s stopped; exiting so that the service manager restarts the node", dead)
        try:
            db.log("stopped", f"{dead} stopped; the node exits", level="error")
        except Exception:  # the database may be what failed
            log.exception("could not record the stop")
    log.info("stopping")
    if listener is not None:
        listener.stop()
    for w in workers:
        w.stop()
    sched.shutdown(wait=True)
    if outbox is not None:
        outbox.join(timeout=60)  # deliveries in flight finish and are recorded
    for lead in leaders:  # a follower takes over at its next poll, not at a timeout
        lead.release()
    for t in threads:
        t.join(timeout=60)
    if http is not None:
        http.stop()
    db.dispose()
    return 1 if dead else 0


def _workers(settings: Settings, db: Any, metrics: Any, n: int) -> list[Any]:
    """``n`` workers, each with its model loaded; a backend that cannot run or a broken
    package stops start-up here, in one line."""
    from cadnode.jobs.worker import Worker
    from cadnode.runtime import BackendUnavailable

    workers: list[Any] = []
    try:
        for _ in range(n):
            owner = f"{socket.gethostname()}:{os.getpid()}:{len(workers)}"
            workers.append(Worker(settings, db, owner=owner, metrics=metrics))
    except Exception as exc:
        for w in workers:  # the decoding children of those already made
            w.close()
        if isinstance(exc, BackendUnavailable):
            raise SettingsError(f"CADNODE_BACKEND={settings.backend}, CADNODE_DEVICE="
                                f"{settings.device}: {exc}") from None
        # a corrupt or incomplete package (the manifest says which file)
        raise SettingsError(model_error(settings, exc)) from None
    return workers


def _listener(settings: Settings, db: Any, metrics: Any, tls: Any) -> tuple[Any, int]:
    """The DICOM listener, started; its port."""
    from cadnode.dicom.listener import Listener, Policy
    from cadnode.jobs.queue import record_instance

    on_stored, on_refused = _counted(
        lambda stored: record_instance(db, stored),
        lambda msg, uid: db.log("refused", msg, uid or None, "warning"), metrics)
    listener = Listener(settings.spool_dir, on_stored=on_stored, ae_title=settings.ae_title,
                        on_refused=on_refused, policy=Policy.from_settings(settings, tls))
    try:
        return listener, listener.start(settings.host, settings.port)
    except OSError as exc:
        raise SettingsError(port_error(settings, exc)) from None


def _announce(settings: Settings, db: Any, roles: frozenset[Role], port: int,
              workers: list[Any]) -> None:
    """The start-up line (on stdout and in the event log): what this process runs."""
    parts = []
    if Role.LISTEN in roles:
        parts.append(f"listening as {settings.ae_title} on {settings.host}:{port}")
    if workers:
        engine = workers[0].engine
        m = engine.manifest
        parts.append(f"{len(workers)} worker(s), model {m.name} {m.version} on "
                     f"{engine.backend} ({', '.join(engine.providers)})")
    what = "; ".join(parts)
    db.log("startup", f"{' + '.join(sorted(roles))} started: {what}")
    destinations = ', '.join(map(str, settings.destinations)) or 'none'
    print(f"cadnode: {what}; home {settings.home}"
          + (f"; destinations {destinations}" if workers else ""), flush=True)


#: How often ``serve`` checks that the listener, the worker and the scheduler still run.
SUPERVISE_SECONDS = 2.0


def _metrics(settings: Settings) -> Any:
    """The node's metrics (cadnode.web.metrics.NodeMetrics) when the web server is on."""
    if not settings.http_port:
        return None
    from cadnode.web.metrics import NodeMetrics

    return NodeMetrics()


def _http_server(settings: Settings, db: Any, workers: list[Any], metrics: Any) -> Any:
    """The dashboard, /metrics, /healthz and /readyz (not started yet), or None when
    CADNODE_HTTP_PORT is 0."""
    if metrics is None:
        return None
    from cadnode.web.app import Node
    from cadnode.web.metrics import ModelInfo
    from cadnode.web.server import HttpServer

    model = None
    if workers:  # a listener alone has no model
        engine = workers[0].engine
        m = engine.manifest
        model = ModelInfo(m.name, m.version, str(engine.backend), tuple(engine.providers),
                          bool(m.demo))
    node = Node(db=db, home=settings.home, spool_dir=settings.spool_dir,
                results_dir=settings.results_dir, ae_title=settings.ae_title, model=model,
                metrics=metrics, token=settings.http_token)
    try:
        return HttpServer(node, settings.http_host, settings.http_port)
    except SettingsError:  # the port is taken: one line, and the decoding children stopped
        for w in workers:
            w.close()
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


def _dead_part(listener: Any, worker_threads: list[threading.Thread], sched: Any) -> str:
    """The name of a part of the node that has stopped by itself, or ""."""
    if any(not t.is_alive() for t in worker_threads):
        return "a worker"
    if not sched.running:
        return "the scheduler"
    if listener is not None and not listener.serving:
        return "the listener"
    return ""


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    concurrency = argparse.ArgumentParser(add_help=False)
    concurrency.add_argument("--concurrency", type=_positive, default=1, metavar="N",
                             help="workers in this process, each with its own model "
                             "(default 1)")
    p = sub.add_parser("serve", parents=[common, concurrency],
                       help="listener + assembler + worker + sender in one process",
                       description="Receive mammograms, analyse them and send the results; "
                       "runs until SIGINT/SIGTERM. The same as `cadnode listen` and "
                       "`cadnode worker` in one process.")
    p.set_defaults(func=cmd_serve, node_process=True)
    listen = sub.add_parser("listen", parents=[common],
                            help="the DICOM listener and study assembler only",
                            description="Receive mammograms into the spool and record them in "
                            "the job database; the listener that leads (a lock in the "
                            "database) assembles studies and queues their jobs. Run several "
                            "against one database and one shared spool.")
    listen.set_defaults(func=cmd_listen, node_process=True)
    worker = sub.add_parser("worker", parents=[common, concurrency],
                            help="workers and the sender only",
                            description="Claim jobs from the job database, analyse them and "
                            "write the results; the worker process that leads (a lock in the "
                            "database) sends them and puts back jobs whose lease expired. Run "
                            "as many as the machines have GPUs or cores.")
    worker.set_defaults(func=cmd_worker, node_process=True)


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return n
