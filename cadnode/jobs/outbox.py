"""The outbox: sends every pending result to its destination; a failure only delays it.

Each destination is served by its own thread, so a PACS that hangs (every association up to the
timeout) delays only its own deliveries. Each object's outcome is recorded as the destination
answered it: an object it acknowledged is delivered even if the association aborts later.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable
from typing import Protocol

from cadnode.config import parse_destinations
from cadnode.dicom.sender import DeliveryError, client_ssl_context, send_files
from cadnode.jobs.db import Database, Delivery
from cadnode.jobs.queue import (
    DEFAULT_RETRY,
    RetryPolicy,
    due_deliveries,
    due_destinations,
    mark_delivery,
    study_uids_of_jobs,
)

log = logging.getLogger(__name__)


class DeliveryMetrics(Protocol):
    """What an outbox reports per object tried, when given one (cadnode.web.metrics)."""

    def delivered(self, destination: str, kind: str) -> None: ...
    def delivery_failed(self, destination: str, kind: str) -> None: ...


class Outbox:
    """Delivers due results, one thread per destination at a time."""

    def __init__(self, db: Database, calling_ae: str, retry: RetryPolicy = DEFAULT_RETRY,
                 timeout: float = 30.0, tls: ssl.SSLContext | None = None,
                 metrics: DeliveryMetrics | None = None) -> None:
        self.db, self.calling_ae, self.retry = db, calling_ae, retry
        self.timeout, self.tls = timeout, tls
        self.metrics = metrics
        self._busy: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self.delivered = 0  # objects delivered since this outbox was made

    def tick(self) -> list[threading.Thread]:
        """Start a delivery thread for each destination with due deliveries that has none
        running; returns the threads started (the scheduler does not wait for them)."""
        started = []
        destinations = due_destinations(self.db)
        with self._lock:
            for dest in destinations:
                running = self._busy.get(dest)
                if running is not None and running.is_alive():
                    continue
                thread = threading.Thread(target=self._deliver_logged, args=(dest,),
                                          daemon=True, name=f"outbox {dest}")
                self._busy[dest] = thread
                thread.start()
                started.append(thread)
        return started

    def join(self, timeout: float | None = None) -> None:
        """Wait for the delivery threads running now."""
        with self._lock:
            threads = list(self._busy.values())
        for thread in threads:
            thread.join(timeout)

    def _deliver_logged(self, dest_text: str) -> None:
        try:
            n = self.deliver_to(dest_text)
            with self._lock:
                self.delivered += n
        except Exception:  # the database is down, say: the next tick tries again
            log.exception("outbox: delivering to %s failed", dest_text)

    def deliver_to(self, dest_text: str) -> int:
        """Try each due delivery of one destination once, over one association; returns how
        many were delivered. Errors are recorded per delivery, never raised."""
        items = due_deliveries(self.db, destination=dest_text)
        if not items:
            return 0
        (dest,) = parse_destinations(dest_text)
        files = [self.db.file_path(d.path) for d in items]
        try:
            results = send_files(
                files, dest.host, dest.port, dest.ae_title,
                calling_ae=self.calling_ae, timeout=self.timeout,
                tls=(self.tls or client_ssl_context()) if dest.tls else None,
            )
        except DeliveryError as exc:
            error = str(exc)
            for d in items:
                mark_delivery(self.db, d.id, error, retry=self.retry)
                self._count(dest_text, d.kind, ok=False)
            self._log_by_job(logging.WARNING, items,
                             lambda kinds: f"delivery of {kinds} to {dest_text} failed: {error}")
            return 0
        by_path = {str(r.path): r for r in results}
        delivered: list[Delivery] = []
        for d, file in zip(items, files, strict=True):
            r = by_path.get(str(file))
            if r is not None and r.ok:
                mark_delivery(self.db, d.id, None, retry=self.retry)
                delivered.append(d)
                self._count(dest_text, d.kind, ok=True)
            else:
                why = "not sent" if r is None else r.error or f"status 0x{r.status:04X}"
                mark_delivery(self.db, d.id, why, retry=self.retry)
                self._count(dest_text, d.kind, ok=False)
        self._log_by_job(logging.INFO, delivered, lambda kinds: f"delivered {kinds} to {dest_text}")
        return len(delivered)

    def _log_by_job(self, level: int, items: list[Delivery],
                    message: Callable[[str], str]) -> None:
        """One line per job, carrying its study and job ids; ``message`` gets its objects."""
        by_job: dict[int, list[str]] = {}
        for d in items:
            by_job.setdefault(d.job_id, []).append(d.kind)
        studies = study_uids_of_jobs(self.db, by_job)
        for job_id, kinds in by_job.items():
            log.log(level, message(", ".join(kinds)),
                    extra={"job_id": job_id, "study_uid": studies.get(job_id)})

    def _count(self, destination: str, kind: str, ok: bool) -> None:
        if self.metrics is None:
            return
        if ok:
            self.metrics.delivered(destination, kind)
        else:
            self.metrics.delivery_failed(destination, kind)


def deliver_due(
    db: Database, calling_ae: str, retry: RetryPolicy = DEFAULT_RETRY, timeout: float = 30.0,
    tls: ssl.SSLContext | None = None,
) -> int:
    """Try every due delivery once, all destinations at once, and wait for them (over TLS
    with ``tls`` for a ``;tls`` destination); returns how many were delivered."""
    outbox = Outbox(db, calling_ae, retry, timeout, tls)
    outbox.tick()
    outbox.join()
    return outbox.delivered
