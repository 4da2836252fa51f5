"""Periodic duties (APScheduler): assemble studies, expire leases, drain the outbox, and
remove delivered studies past their retention; each run by the process that leads it
(cadnode.jobs.leader)."""

from __future__ import annotations

import functools
import logging
import ssl
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler

from cadnode.config import Settings
from cadnode.jobs.db import Database
from cadnode.jobs.leader import LEAD_POLL_SECONDS, Duty, Leadership, polled
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


def create_scheduler(settings: Settings, db: Database, leaders: Sequence[Leadership],
                     outbox: Outbox | None = None,
                     on_queued: Callable[[list[str]], object] | None = None,
                     ) -> BackgroundScheduler:
    """A scheduler for the duties of ``leaders`` (the assembler: assembling and retention;
    the sender: the outbox and expired leases), each run only while this process leads it.
    Its jobs never overlap themselves and never pile up after a pause. The locks are polled
    once here, so that a process that leads runs its first duties at once. ``on_queued``
    hears the studies each assembling queued (``cadnode serve`` wakes its workers with it);
    :func:`send_now` runs the outbox at once."""
    sched = BackgroundScheduler(
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None}
    )
    polled(list(leaders))
    sched.add_job(polled, "interval", seconds=LEAD_POLL_SECONDS, id="leadership",
                  args=[list(leaders)])
    every = max(0.2, settings.poll_seconds)
    by_duty = {lead.duty: lead for lead in leaders}
    if (assembler := by_duty.get(Duty.ASSEMBLER)) is not None:
        sched.add_job(
            _led(assembler, _then(assemble_studies, on_queued)), "interval", seconds=every,
            id="assemble", args=[db, settings.complete_seconds, settings.stable_seconds],
            kwargs={"policy": settings.implant_policy},
        )
        if settings.retention_days > 0:  # first at start-up, then hourly
            sched.add_job(_led(assembler, purge_by_settings), "interval",
                          seconds=RETENTION_EVERY_SECONDS, id="retention", args=[settings, db],
                          next_run_time=datetime.now())
    if (sender := by_duty.get(Duty.SENDER)) is not None:
        if outbox is None:
            raise ValueError("the sender's duties need an outbox")
        sched.add_job(
            _led(sender, expire_leases), "interval", seconds=max(every, 10.0), id="leases",
            args=[db, settings.max_attempts], next_run_time=datetime.now(),
        )
        sched.add_job(_led(sender, outbox.tick), "interval", seconds=every, id=OUTBOX_JOB)
    return sched


#: The scheduler's id of the outbox duty.
OUTBOX_JOB = "outbox"


def send_now(sched: BackgroundScheduler) -> None:
    """Run the outbox duty now (new results), not at its next interval; still only while
    this process leads it, and never beside a run in progress (``max_instances``)."""
    try:
        sched.modify_job(OUTBOX_JOB, next_run_time=datetime.now())
    except JobLookupError:  # a process without the sender's duty, or one shutting down
        pass


def _then(duty: Callable[..., list[str]],
          hear: Callable[[list[str]], object] | None) -> Callable[..., list[str]]:
    """``duty``, whose non-empty result is then passed to ``hear`` (when there is one)."""
    if hear is None:
        return duty

    @functools.wraps(duty)
    def run(*args: Any, **kwargs: Any) -> list[str]:
        done = duty(*args, **kwargs)
        if done:
            hear(done)
        return done

    return run


def _led(lead: Leadership, duty: Callable[..., Any]) -> Callable[..., None]:
    """``duty``, run only while this process holds ``lead``."""

    @functools.wraps(duty)
    def run(*args: Any, **kwargs: Any) -> None:
        if lead.held:
            duty(*args, **kwargs)

    return run
