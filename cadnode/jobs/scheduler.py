"""Periodic duties (APScheduler): assemble studies, expire leases, drain the outbox, and
remove delivered studies past their retention."""

from __future__ import annotations

import logging
import ssl
from datetime import datetime

from apscheduler.schedulers.background import BackgroundScheduler

from cadnode.config import Settings
from cadnode.jobs.db import Database
from cadnode.jobs.outbox import DeliveryMetrics, Outbox
from cadnode.jobs.queue import RetryPolicy, assemble_studies, expire_leases
from cadnode.jobs.retention import purge_by_settings

log = logging.getLogger(__name__)

#: How often the retention (CADNODE_RETENTION_DAYS > 0) runs.
RETENTION_EVERY_SECONDS = 3600.0


def create_outbox(settings: Settings, db: Database, metrics: DeliveryMetrics | None = None,
                  tls: ssl.SSLContext | None = None) -> Outbox:
    """The outbox the scheduler ticks; ``tls`` is the client context for ";tls" destinations
    (cadnode.cli.common.tls_contexts, made once at start-up)."""
    retry = RetryPolicy(settings.delivery_max_attempts, settings.retry_base_seconds,
                        settings.retry_cap_seconds)
    return Outbox(db, settings.ae_title, retry, tls=tls, metrics=metrics)


def create_scheduler(settings: Settings, db: Database, outbox: Outbox) -> BackgroundScheduler:
    """A scheduler whose jobs never overlap themselves and never pile up after a pause."""
    sched = BackgroundScheduler(
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None}
    )
    every = max(0.2, settings.poll_seconds)
    sched.add_job(
        assemble_studies, "interval", seconds=every, id="assemble",
        args=[db, settings.complete_seconds, settings.stable_seconds],
        kwargs={"policy": settings.implant_policy},
    )
    sched.add_job(
        expire_leases, "interval", seconds=max(every, 10.0), id="leases",
        args=[db, settings.max_attempts], next_run_time=datetime.now(),
    )
    sched.add_job(outbox.tick, "interval", seconds=every, id="outbox")
    if settings.retention_days > 0:  # first at start-up, then hourly
        sched.add_job(purge_by_settings, "interval", seconds=RETENTION_EVERY_SECONDS,
                      id="retention", args=[settings, db], next_run_time=datetime.now())
    return sched
