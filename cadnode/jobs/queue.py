"""State changes of studies, jobs and deliveries; each function is one short transaction.

Workers claim jobs with ``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL and with an atomic
``UPDATE ... WHERE state='queued'`` on SQLite. A running job holds a lease, not a transaction;
an expired lease puts the job back in the queue (or fails it after too many attempts).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, cast

from sqlalchemy import CursorResult, func, select, update
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError

from cadnode.dicom.enum import ViewModifier
from cadnode.dicom.selection import Candidate, ImplantPolicy, select_views
from cadnode.dicom.spool import InstanceConflict, StoredInstance, StoreUnavailable
from cadnode.dicom.views import ViewInfo
from cadnode.jobs.db import (
    Database,
    Delivery,
    Instance,
    Job,
    Study,
    add_event,
    latest_job,
    reconnecting,
)
from cadnode.jobs.enum import (
    FINISHED_STUDY_STATES,
    DeliveryState,
    JobReason,
    JobState,
    StudyState,
)
from cadnode.results.findings import ObjectVersion

log = logging.getLogger(__name__)


#: Tries of record_instance when a concurrent association inserts the same study or instance.
_RECORD_TRIES = 4


def record_instance(db: Database, stored: StoredInstance, now: float | None = None) -> bool:
    """Commit the row for a spooled instance; returns False for a repeated SOP instance.

    Two associations may bring the same new study (or the same instance) at once: the loser
    of the insert race sees a unique violation and simply runs again, finding the row. A
    connection lost on the way is replaced and the transaction run again (it re-reads what it
    changes, and an instance whose row did commit is found as a repeat); only a database that
    stays away fails the store, and the sender is told to try again later."""
    now = time.time() if now is None else now
    try:
        return _record_reconnecting(db, stored, now)
    except (OperationalError, InterfaceError) as exc:  # connection lost, database locked
        raise StoreUnavailable(f"job database unavailable: {exc.orig or exc}") from exc


@reconnecting
def _record_reconnecting(db: Database, stored: StoredInstance, now: float) -> bool:
    for attempt in range(_RECORD_TRIES):
        try:
            with db.session() as s:
                return _record_instance(s, stored, db.stored_path(stored.path), now)
        except IntegrityError:
            if attempt == _RECORD_TRIES - 1:
                raise
            log.info("study %s: concurrent insert, recording %s again", stored.study_uid,
                     stored.sop_instance_uid)
    raise AssertionError("unreachable")


def _record_instance(s: Any, stored: StoredInstance, path: str, now: float) -> bool:
    # The study row is locked (PostgreSQL; SQLite takes the database lock at BEGIN) so that a
    # job cannot be claimed between reading its state and adding this instance: either the
    # claim comes first and this reopens the study, or the job's view selection sees it.
    v = stored.view
    study = s.scalars(select(Study).where(Study.study_uid == stored.study_uid)
                      .with_for_update()).first()
    if study is None:
        study = Study(
            study_uid=stored.study_uid,
            patient_id=stored.patient_id[:64],
            accession=stored.accession[:16],
            study_date=stored.study_date,
            calling_ae=stored.calling_ae,
            first_received=now,
            last_received=now,
            state=StudyState.RECEIVING,
        )
        s.add(study)
        s.flush()
        add_event(s, "study", f"new study from {stored.calling_ae}", stored.study_uid)
        log.info("study %s: first image received from %s", stored.study_uid,
                 stored.calling_ae, extra={"study_uid": stored.study_uid})
    existing = s.scalars(
        select(Instance).where(Instance.sop_instance_uid == stored.sop_instance_uid)
    ).first()
    if existing is not None and existing.study_id != study.id:
        old = s.scalar(select(Study.study_uid).where(Study.id == existing.study_id))
        raise InstanceConflict(
            f"SOP instance {stored.sop_instance_uid} already belongs to study {old}"
        )
    if existing is not None:
        # The file was replaced atomically by the same name; keep the row, note the repeat,
        # and take what the new header says (the assembler decides on these columns).
        existing.size = stored.size
        existing.transfer_syntax = stored.transfer_syntax
        existing.laterality, existing.view = v.laterality, v.view
        existing.for_presentation = v.for_presentation
        existing.modifiers = _modifiers_column(v)
        existing.acquired = stored.acquired
        add_event(s, "duplicate", f"instance received again: {stored.sop_instance_uid}",
                  stored.study_uid)
        return False
    s.add(
        Instance(
            study_id=study.id,
            sop_instance_uid=stored.sop_instance_uid,
            series_uid=stored.series_uid,
            sop_class_uid=stored.sop_class_uid,
            transfer_syntax=stored.transfer_syntax,
            path=path,
            size=stored.size,
            laterality=v.laterality,
            view=v.view,
            for_presentation=v.for_presentation,
            modifiers=_modifiers_column(v),
            acquired=stored.acquired,
            received_at=now,
        )
    )
    study.last_received = now
    if not study.study_date and stored.study_date:  # the first image may have had none
        study.study_date = stored.study_date
    if study.state in FINISHED_STUDY_STATES or study.state == StudyState.RUNNING:
        # running: the job reads the images it listed at its start; this one needs another
        # run, which the assembler queues once the running one has finished
        study.state = StudyState.RECEIVING
        add_event(s, "study", "new instance after processing: study reopened",
                  stored.study_uid)
    return True


@dataclass(frozen=True)
class QueueState:
    """What an admin watches: jobs waiting, how long the oldest has waited, jobs held."""

    depth: int
    oldest_age: float
    running: int


def queue_state(db: Database, now: float | None = None) -> QueueState:
    """The queue as the dashboard and ``/metrics`` both show it (one query, one meaning)."""
    now = time.time() if now is None else now
    with db.session() as s:
        depth, oldest = s.execute(select(func.count(), func.min(Job.created_at))
                                  .where(Job.state == JobState.QUEUED)).one()
        running = s.scalar(select(func.count()).where(Job.state == JobState.RUNNING))
    return QueueState(int(depth), max(0.0, now - oldest) if oldest is not None else 0.0,
                      int(running or 0))


def view_key(laterality: str | None, view: str | None) -> str | None:
    """The ``"L-CC"`` key of an instance row (None when side or view is unknown)."""
    return ViewInfo(laterality, view, True, "database").key


def _modifiers_column(info: ViewInfo) -> str:
    """``instances.modifiers``: the view's modifiers, "+"-joined (read by instance_candidate)."""
    return "+".join(m.value for m in info.modifiers)


def instance_candidate(row: Instance) -> Candidate[int]:
    """What the view selection needs of an instance row (its header is not read again)."""
    known = {m.value for m in ViewModifier}
    modifiers = tuple(ViewModifier(m) if m in known else ViewModifier.OTHER
                      for m in row.modifiers.split("+") if m)
    info = ViewInfo(row.laterality, row.view, row.for_presentation, "database", modifiers)
    return Candidate(row.id, info, row.acquired, row.id, row.sop_instance_uid)


def assemble_studies(
    db: Database, complete_seconds: float, stable_seconds: float, now: float | None = None,
    policy: ImplantPolicy = ImplantPolicy.FALLBACK,
) -> list[str]:
    """Queue a job for each study whose four standard views can be read (by the same rules
    the worker applies) and that is quiet, or that has been quiet for long enough."""
    now = time.time() if now is None else now
    queued: list[str] = []
    with db.session() as s:
        studies = s.scalars(select(Study).where(Study.state == StudyState.RECEIVING)).all()
        for study in studies:
            quiet = now - study.last_received
            if quiet < min(complete_seconds, stable_seconds):
                continue
            latest = latest_job(s, study.id)
            if latest is not None and latest.state == JobState.RUNNING:
                continue  # reopened while a job runs: queue the next run after it
            rows = s.scalars(select(Instance).where(Instance.study_id == study.id)).all()
            selection = select_views((instance_candidate(r) for r in rows), policy)
            if selection.complete and quiet >= complete_seconds:
                reason = JobReason.COMPLETE
            elif quiet >= stable_seconds:
                reason = JobReason.STABLE
            else:
                continue
            s.add(Job(study_id=study.id, state=JobState.QUEUED, reason=reason, created_at=now))
            study.state = StudyState.QUEUED
            missing = f"; missing {', '.join(selection.missing)}" if selection.missing else ""
            add_event(s, "queued", f"{len(rows)} instance(s), {reason}{missing}",
                      study.study_uid)
            log.info("study %s queued: %d instance(s), %s%s", study.study_uid, len(rows),
                     reason, missing, extra={"study_uid": study.study_uid})
            queued.append(study.study_uid)
    return queued


@dataclass(frozen=True)
class ClaimedJob:
    """A job this worker holds the lease of: every later change is fenced by ``owner``."""

    id: int
    study_id: int
    study_uid: str
    attempt: int
    owner: str


class LeaseLost(RuntimeError):
    """The job's lease expired and was taken back (another worker may run it): stop, and
    write nothing more for it."""


def claim_next_job(
    db: Database, owner: str, lease_seconds: float, now: float | None = None
) -> ClaimedJob | None:
    """Take the oldest queued job under a lease, or return None."""
    now = time.time() if now is None else now
    with db.session() as s:
        pick = select(Job.id).where(Job.state == JobState.QUEUED).order_by(Job.id).limit(1)
        if not db.is_sqlite:
            pick = pick.with_for_update(skip_locked=True)
        job_id = s.scalar(pick)
        if job_id is None:
            return None
        claimed = cast(CursorResult[Any], s.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.QUEUED)
            .values(
                state=JobState.RUNNING,
                lease_owner=owner,
                lease_until=now + lease_seconds,
                started_at=now,
                attempts=Job.attempts + 1,
            )
        )).rowcount
        if claimed != 1:
            return None
        job = s.get(Job, job_id)
        assert job is not None
        study = s.get(Study, job.study_id)
        assert study is not None
        study.state = StudyState.RUNNING
        add_event(s, "running", f"job {job.id} attempt {job.attempts} on {owner}",
                  study.study_uid)
        log.info("study %s running: job %d attempt %d on %s", study.study_uid, job.id,
                 job.attempts, owner, extra={"study_uid": study.study_uid, "job_id": job.id})
        return ClaimedJob(job.id, job.study_id, study.study_uid, job.attempts, owner)


def _running(s: Any, job_id: int, *conditions: Any, **values: Any) -> Job | None:
    """Set ``values`` on a running job that meets ``conditions`` in one guarded UPDATE (which
    also locks its row for this transaction) and return the row read afresh; None when the
    job no longer qualifies (finished, requeued, renewed or taken by another worker)."""
    updated = cast(CursorResult[Any], s.execute(
        update(Job).where(Job.id == job_id, Job.state == JobState.RUNNING, *conditions)
        .values(**values))).rowcount
    if updated != 1:
        return None
    return cast(Job, s.get(Job, job_id, populate_existing=True))


def _fenced(s: Any, job: ClaimedJob, **values: Any) -> Job:
    """The job's row, locked, if ``job.owner`` still holds its lease (and ``values`` set),
    else LeaseLost: the fence every change of a running job goes through."""
    row = _running(s, job.id, Job.lease_owner == job.owner, lease_owner=job.owner, **values)
    if row is None:
        raise LeaseLost(f"job {job.id}: the lease of {job.owner} was lost")
    return row


@reconnecting
def renew_lease(db: Database, job: ClaimedJob, lease_seconds: float,
                now: float | None = None) -> None:
    """Extend the lease (between stages); LeaseLost when it is no longer this worker's."""
    now = time.time() if now is None else now
    with db.session() as s:
        _fenced(s, job, lease_until=now + lease_seconds)


def _locked_study(s: Any, study_id: int) -> Study:
    """The study row, read afresh and locked for this transaction (PostgreSQL): a concurrent
    ``record_instance`` that reopens it either commits first and is seen, or waits."""
    study = s.get(Study, study_id, with_for_update=True, populate_existing=True)
    assert study is not None
    return study


def _finish(s: Any, job: Job, state: JobState, now: float) -> Study:
    job.state = state
    job.finished_at = now
    job.lease_owner = None
    job.lease_until = None
    study = _locked_study(s, job.study_id)
    # A new instance may have reopened the study meanwhile; then leave it receiving.
    if study.state == StudyState.RUNNING:
        study.state = StudyState(state.value)
    return study


@dataclass(frozen=True)
class ResultFile:
    kind: str
    path: str
    sop_instance_uid: str
    destinations: tuple[str, ...]
    version: ObjectVersion | None = None  # recorded so that the next run can replace it

    def version_doc(self) -> dict[str, Any] | None:
        return _version_doc(self.version)


def _version_doc(v: ObjectVersion | None) -> dict[str, Any] | None:
    if v is None:
        return None
    return {"sop_instance_uid": v.sop_instance_uid, "series_uid": v.series_uid,
            "sop_class_uid": v.sop_class_uid, "instance_number": v.instance_number,
            "content_key": v.content_key,
            "predecessor": _version_doc(
                None if v.predecessor is None else replace(v.predecessor, predecessor=None))}


def _version_of(doc: dict[str, Any] | None) -> ObjectVersion | None:
    if not doc:
        return None
    return ObjectVersion(doc["sop_instance_uid"], doc["series_uid"], doc["sop_class_uid"],
                         int(doc["instance_number"]), _version_of(doc.get("predecessor")),
                         str(doc.get("content_key", "")))


@reconnecting
def study_instances(db: Database, study_id: int) -> list[tuple[str, str, str, str]]:
    """(path, SOP Instance UID, SOP Class UID, Series UID) of a study's received images, in
    arrival order."""
    with db.session() as s:
        rows = s.execute(select(Instance.path, Instance.sop_instance_uid,
                                Instance.sop_class_uid, Instance.series_uid)
                         .where(Instance.study_id == study_id).order_by(Instance.id)).all()
    return [(p, sop, cls, series) for p, sop, cls, series in rows]


@reconnecting
def previous_objects(db: Database, study_id: int, job_id: int) -> dict[str, ObjectVersion]:
    """The result objects of the study's latest earlier job that wrote any (kind -> version):
    what a new run's objects replace."""
    with db.session() as s:
        docs = s.scalars(select(Job.scores_json).where(
            Job.study_id == study_id, Job.id != job_id, Job.scores_json.is_not(None))
            .order_by(Job.id.desc())).all()
    for doc in docs:
        objects = json.loads(doc).get("objects") if doc else None
        if objects:
            return {kind: v for kind, d in objects.items() if (v := _version_of(d)) is not None}
    return {}


@reconnecting
def complete_job(
    db: Database,
    claimed: ClaimedJob,
    scores: Mapping[str, Any],
    views: list[str],
    model_version: str,
    results: list[ResultFile],
    partial: bool = False,
    now: float | None = None,
) -> JobState:
    """Record the scores and put every result into the outbox, in one transaction; a job
    whose exam lacked a standard view, or had one that could not be read, is done-partial."""
    now = time.time() if now is None else now
    with db.session() as s:
        job = _fenced(s, claimed)
        job.scores_json = json.dumps(scores, sort_keys=True)
        job.views = ",".join(views)
        job.model_version = model_version
        job.error = None
        state = JobState.DONE_PARTIAL if partial else JobState.DONE
        study = _finish(s, job, state, now)
        for r in results:
            for dest in r.destinations:
                s.add(
                    Delivery(
                        job_id=job.id,
                        destination=dest,
                        kind=r.kind,
                        path=db.stored_path(r.path),
                        sop_instance_uid=r.sop_instance_uid,
                        next_attempt=now,
                    )
                )
        add_event(s, state.value, f"job {job.id}: {json.dumps(scores.get('exam', {}))}",
                  study.study_uid, "warning" if partial else "info")
        return state


@reconnecting
def fail_job(
    db: Database, claimed: ClaimedJob, error: str, max_attempts: int, permanent: bool = False,
    now: float | None = None,
) -> JobState:
    """Record an error; requeue unless the job is out of attempts or the error is permanent.
    LeaseLost when this worker no longer holds the job."""
    now = time.time() if now is None else now
    with db.session() as s:
        return _fail(s, _fenced(s, claimed), error, max_attempts, permanent, now)


def _fail(s: Any, job: Job, error: str, max_attempts: int, permanent: bool,
          now: float) -> JobState:
    job.error = error
    if permanent or job.attempts >= max_attempts:
        study = _finish(s, job, JobState.FAILED, now)
        add_event(s, "failed", f"job {job.id}: {error}", study.study_uid, "error")
        log.error("study %s failed: job %d: %s", study.study_uid, job.id, error,
                  extra={"study_uid": study.study_uid, "job_id": job.id})
        return JobState.FAILED
    job.state = JobState.QUEUED
    job.lease_owner = None
    job.lease_until = None
    waiting = _locked_study(s, job.study_id)
    waiting.state = StudyState.QUEUED  # the next run reads every image, a late one included
    add_event(s, "retry", f"job {job.id} attempt {job.attempts}: {error}", waiting.study_uid,
              "warning")
    return JobState.QUEUED


def expire_leases(db: Database, max_attempts: int, now: float | None = None) -> int:
    """Put jobs whose worker vanished (or overran its lease) back in the queue, or fail them
    when out of attempts. Each job is taken back by one guarded UPDATE in the transaction
    that requeues it, so a job that finished meanwhile is left alone."""
    now = time.time() if now is None else now
    taken = 0
    with db.session() as s:
        stale = s.scalars(
            select(Job.id).where(Job.state == JobState.RUNNING, Job.lease_until < now)
            .order_by(Job.id)  # one lock order for every node sharing the database
        ).all()
        for job_id in stale:
            job = _running(s, job_id, Job.lease_until < now, lease_owner=None)
            if job is None:
                continue  # finished or renewed since the select
            _fail(s, job, "lease expired (worker stopped or overran its lease)", max_attempts,
                  False, now)
            taken += 1
    return taken


def due_destinations(db: Database, now: float | None = None) -> list[str]:
    """Every destination with at least one delivery due now."""
    now = time.time() if now is None else now
    with db.session() as s:
        return sorted(s.scalars(select(Delivery.destination).distinct().where(
            Delivery.state == DeliveryState.PENDING, Delivery.next_attempt <= now)).all())


def due_deliveries(db: Database, now: float | None = None, limit: int = 100,
                   destination: str | None = None) -> list[Delivery]:
    """Pending deliveries whose next attempt is due (of one destination, when given)."""
    now = time.time() if now is None else now
    q = select(Delivery).where(Delivery.state == DeliveryState.PENDING,
                               Delivery.next_attempt <= now)
    if destination is not None:
        q = q.where(Delivery.destination == destination)
    with db.session() as s:
        return list(s.scalars(q.order_by(Delivery.id).limit(limit)).all())


def study_uids_of_jobs(db: Database, job_ids: Iterable[int]) -> dict[int, str]:
    """Each job's Study Instance UID (for log lines about a batch of deliveries)."""
    ids = set(job_ids)
    if not ids:
        return {}
    with db.session() as s:
        rows = s.execute(select(Job.id, Study.study_uid).join(Study, Study.id == Job.study_id)
                         .where(Job.id.in_(ids))).all()
    return {job_id: uid for job_id, uid in rows}


def backoff_seconds(attempts: int, base: float = 5.0, cap: float = 300.0) -> float:
    """Exponential backoff with full jitter on the upper half."""
    delay = min(cap, base * 2 ** max(0, attempts - 1))
    return delay / 2 + random.uniform(0, delay / 2)


@dataclass(frozen=True)
class RetryPolicy:
    """How long a failing delivery keeps being retried before it is dead-lettered."""

    max_attempts: int = 20
    base_seconds: float = 5.0
    cap_seconds: float = 300.0


DEFAULT_RETRY = RetryPolicy()


@reconnecting
def mark_delivery(
    db: Database, delivery_id: int, error: str | None, now: float | None = None,
    retry: RetryPolicy = DEFAULT_RETRY,
) -> str:
    """Record one try; returns the delivery's new state (sent, pending or dead)."""
    now = time.time() if now is None else now
    with db.session() as s:
        d = s.get(Delivery, delivery_id)
        assert d is not None
        d.attempts += 1
        study_uid = s.scalar(
            select(Study.study_uid).join(Job, Job.study_id == Study.id).where(Job.id == d.job_id)
        )
        if error is None:
            d.state = DeliveryState.SENT
            d.sent_at = now
            d.last_error = None
            add_event(s, "delivered", f"{d.kind} to {d.destination}", study_uid)
        elif d.attempts >= retry.max_attempts:
            d.state = DeliveryState.DEAD
            d.last_error = error
            add_event(s, "dead_letter", f"{d.kind} to {d.destination} after {d.attempts} "
                      f"tries: {error}", study_uid, "error")
        else:
            d.last_error = error
            d.next_attempt = now + backoff_seconds(d.attempts, retry.base_seconds,
                                                   retry.cap_seconds)
            add_event(s, "delivery_retry", f"{d.kind} to {d.destination}: {error}", study_uid,
                      "warning")
        return d.state


def retry_dead_deliveries(
    db: Database, study_uid: str | None = None, now: float | None = None
) -> int:
    """Put dead-lettered deliveries (of one study, or all) back in the outbox."""
    now = time.time() if now is None else now
    with db.session() as s:
        q = select(Delivery).where(Delivery.state == DeliveryState.DEAD)
        if study_uid:
            q = q.join(Job, Job.id == Delivery.job_id).join(Study, Study.id == Job.study_id).where(
                Study.study_uid == study_uid)
        dead = s.scalars(q).all()
        for d in dead:
            d.state, d.attempts, d.next_attempt = DeliveryState.PENDING, 0, now
        if dead:
            add_event(s, "retry_requested", f"{len(dead)} dead delivery(ies) back in the outbox",
                      study_uid)
        return len(dead)
