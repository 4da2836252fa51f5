"""What an admin asks of the job database: the study list (with filters), everything about one
study, refused associations, and the few changes an admin makes (resend, reprocess).

Every read returns plain, JSON-ready values: times as ISO 8601 strings with their UTC offset,
states as the stored strings. ``cadnode jobs`` / ``cadnode study`` and the web dashboard show
exactly these.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, or_, select

from cadnode.config import Destination
from cadnode.jobs.db import Database, Delivery, Event, Instance, Job, Study, add_event, latest_job
from cadnode.jobs.enum import DeliveryState, JobReason, JobState, StudyState
from cadnode.jobs.queue import view_key

#: Events of this kind record a refused association or C-STORE (see ``cadnode serve``).
REFUSED = "refused"


class AmbiguousStudy(LookupError):
    """An accession number that names several studies."""

    def __init__(self, key: str, study_uids: Sequence[str]) -> None:
        super().__init__(f"accession {key} matches {len(study_uids)} studies: "
                         + ", ".join(study_uids))
        self.key, self.study_uids = key, list(study_uids)


def iso(t: float | None) -> str | None:
    """UNIX seconds as ISO 8601 in UTC with its offset (``2026-12-02T08:00:01.250+00:00``)."""
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float | None:
    """``90s``, ``30m``, ``2h``, ``3d``, ``1w`` in seconds; None when ``text`` is not one.
    The one reading of a duration for every command (``--since``, ``--older-than``)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text.lower())
    return float(m.group(1)) * _UNITS[m.group(2)] if m else None


def parse_since(text: str, now: float | None = None) -> float:
    """UNIX seconds from an ISO 8601 date or date-time (local time when it has no offset) or
    a duration back from now (``90s``, ``30m``, ``2h``, ``3d``, ``1w``); ValueError else."""
    value = text.strip()
    now = time.time() if now is None else now
    back = parse_duration(value)
    if back is not None:
        return now - back
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{text!r} is neither an ISO date/time (2026-12-01, "
                         "2026-12-01T08:00, 2026-12-01T08:00+01:00) nor a duration "
                         "(30m, 2h, 3d, 1w)") from None
    return when.timestamp()  # a naive time is local time


@dataclass(frozen=True)
class StudyFilter:
    """Which studies ``list_studies`` returns; every field given must match."""

    state: str | None = None  # a StudyState value
    since: float | None = None  # last image received at or after (UNIX seconds)
    patient: str | None = None  # Patient ID, exactly
    accession: str | None = None  # Accession Number, exactly
    study: str | None = None  # Study Instance UID, whole or its trailing part
    limit: int = 50


def list_studies(db: Database, flt: StudyFilter = StudyFilter()) -> list[dict[str, Any]]:
    """Studies newest first (by last image received), each with its latest job and the
    delivery counts of that job."""
    q = select(Study)
    if flt.state:
        q = q.where(Study.state == StudyState(flt.state))
    if flt.since is not None:
        q = q.where(Study.last_received >= flt.since)
    if flt.patient:
        q = q.where(Study.patient_id == flt.patient)
    if flt.accession:
        q = q.where(Study.accession == flt.accession)
    if flt.study:
        q = q.where(or_(Study.study_uid == flt.study,
                        Study.study_uid.endswith(flt.study, autoescape=True)))
    q = q.order_by(Study.last_received.desc(), Study.id.desc()).limit(max(0, flt.limit))
    with db.session() as s:
        return [_study_row(s, st) for st in s.scalars(q).all()]


def find_studies(db: Database, key: str) -> list[str]:
    """Study Instance UIDs of the studies whose UID or accession number is ``key`` (newest
    first; a UID match comes first)."""
    key = key.strip()
    if not key:
        return []
    with db.session() as s:
        rows = s.execute(select(Study.study_uid, Study.accession)
                         .where(or_(Study.study_uid == key, Study.accession == key))
                         .order_by(Study.last_received.desc(), Study.id.desc())).all()
    return sorted((uid for uid, _ in rows), key=lambda uid: uid != key)


def resolve_study(db: Database, key: str) -> str | None:
    """The one study ``key`` names (its UID, or an accession of one study); None when none
    does; AmbiguousStudy when an accession names several."""
    found = find_studies(db, key)
    if not found:
        return None
    if found[0] == key or len(found) == 1:
        return found[0]
    raise AmbiguousStudy(key, found)


def study_detail(db: Database, key: str, results_dir: Path | None = None) -> dict[str, Any] | None:
    """Everything about one study (by UID, or by an accession that names one study): the list
    row plus instances (and whether each was analysed, and why not), every job attempt with
    its stage times, the result objects, every delivery and the study's events. None when no
    study matches; AmbiguousStudy when an accession names several.

    Result files are looked for under ``results_dir`` (default: the database's home's
    ``results`` folder)."""
    uid = resolve_study(db, key)
    if uid is None:
        return None
    if results_dir is None and db.home is not None:
        results_dir = db.home / "results"
    with db.session() as s:
        st = s.scalars(select(Study).where(Study.study_uid == uid)).one()
        row = _study_row(s, st)
        jobs = s.scalars(select(Job).where(Job.study_id == st.id).order_by(Job.id)).all()
        instances = s.scalars(select(Instance).where(Instance.study_id == st.id)
                              .order_by(Instance.id)).all()
        deliveries = s.scalars(select(Delivery).join(Job, Job.id == Delivery.job_id)
                               .where(Job.study_id == st.id).order_by(Delivery.id)).all()
        events = s.scalars(select(Event).where(Event.study_uid == uid)
                           .order_by(Event.id.desc()).limit(500)).all()
        row["instances"] = _instance_rows(instances, jobs)
        row["jobs"] = [_job_dict(j, full=True) for j in jobs]
        row["results"] = _results(db, st.study_uid, jobs, deliveries, results_dir)
        row["deliveries"] = [_delivery_dict(d) for d in deliveries]
        row["delivery_counts"] = _delivery_counts(s, row["job"]["id"] if row["job"] else None)
        row["events"] = [_event_dict(e) for e in reversed(events)]
    return row


def refused_associations(db: Database, since: float | None = None,
                         limit: int = 50) -> list[dict[str, Any]]:
    """Refused associations and C-STOREs (events of kind "refused"), newest first."""
    q = select(Event).where(Event.kind == REFUSED)
    if since is not None:
        q = q.where(Event.at >= since)
    with db.session() as s:
        events = s.scalars(q.order_by(Event.id.desc()).limit(max(0, limit))).all()
        return [_event_dict(e) for e in events]


def count_refused(db: Database, since: float | None = None) -> int:
    """How many refusals were recorded (since ``since``)."""
    q = select(func.count()).select_from(Event).where(Event.kind == REFUSED)
    if since is not None:
        q = q.where(Event.at >= since)
    with db.session() as s:
        return int(s.scalar(q) or 0)


# --- changes an admin asks for --------------------------------------------------------------


@dataclass(frozen=True)
class Resent:
    """What ``resend`` queued, and what it could not."""

    study_uid: str
    job_id: int | None
    queued: list[dict[str, str]]  # kind, sop_instance_uid, destination
    missing: list[dict[str, str]]  # kind, sop_instance_uid, why (file gone, no destination)
    already_pending: int


def resend(db: Database, study_uid: str, destinations: Sequence[Destination],
           kinds: Iterable[str] | None = None, results_dir: Path | None = None,
           now: float | None = None) -> Resent:
    """Queue the study's result objects (of the latest job that produced any) again, to each
    destination that takes their kind: new pending deliveries that the running node's outbox
    sends. A delivery of the same object to the same destination that is still pending is not
    doubled. ``kinds`` limits the objects (default: all)."""
    now = time.time() if now is None else now
    wanted = None if kinds is None else {str(k) for k in kinds}
    with db.session() as s:
        st = s.scalars(select(Study).where(Study.study_uid == study_uid)).one()
        jobs = s.scalars(select(Job).where(Job.study_id == st.id).order_by(Job.id)).all()
        deliveries = s.scalars(select(Delivery).join(Job, Job.id == Delivery.job_id)
                               .where(Job.study_id == st.id).order_by(Delivery.id)).all()
        objects = _results(db, study_uid, jobs, deliveries, results_dir)
        queued: list[dict[str, str]] = []
        missing: list[dict[str, str]] = []
        pending = {(d.job_id, d.destination, d.sop_instance_uid) for d in deliveries
                   if d.state == DeliveryState.PENDING}
        already = 0
        job_id = objects[0]["job_id"] if objects else None
        for obj in objects:
            if wanted is not None and obj["kind"] not in wanted:
                continue
            if not obj["exists"]:
                missing.append({"kind": obj["kind"], "sop_instance_uid": obj["sop_instance_uid"],
                                "why": f"file not found: {obj['path']}"})
                continue
            for destination in destinations:
                if not destination.takes(obj["kind"]):
                    continue
                dest = str(destination)
                if (obj["job_id"], dest, obj["sop_instance_uid"]) in pending:
                    already += 1
                    continue
                s.add(Delivery(job_id=obj["job_id"], destination=dest, kind=obj["kind"],
                               path=db.stored_path(obj["path"]),
                               sop_instance_uid=obj["sop_instance_uid"], next_attempt=now))
                queued.append({"kind": obj["kind"], "sop_instance_uid": obj["sop_instance_uid"],
                               "destination": dest})
        if queued:
            add_event(s, "resend_requested", f"{len(queued)} result object(s) queued again for "
                      + ", ".join(sorted({q["destination"] for q in queued})), study_uid)
    return Resent(study_uid, job_id, queued, missing, already)


class NotNow(RuntimeError):
    """The study cannot be reprocessed now (a job of it is queued or running)."""


def reprocess(db: Database, study_uid: str, now: float | None = None) -> int:
    """Queue a new job for the study (every image it holds is read again); returns the job's
    id. NotNow when a job of the study is already queued or running."""
    now = time.time() if now is None else now
    with db.session() as s:
        st = s.scalars(select(Study).where(Study.study_uid == study_uid)
                       .with_for_update()).one()
        busy = s.scalars(select(Job).where(
            Job.study_id == st.id, Job.state.in_((JobState.QUEUED, JobState.RUNNING)))).first()
        if busy is not None:
            raise NotNow(f"job {busy.id} of study {study_uid} is already {busy.state}")
        job = Job(study_id=st.id, state=JobState.QUEUED, reason=JobReason.REQUESTED,
                  created_at=now)
        s.add(job)
        st.state = StudyState.QUEUED
        s.flush()
        add_event(s, "queued", f"job {job.id}: reprocessing requested by an admin", study_uid)
        return job.id


# --- rows -------------------------------------------------------------------------------------


def _study_row(s: Any, st: Study) -> dict[str, Any]:
    job = latest_job(s, st.id)
    inst = s.execute(select(Instance.laterality, Instance.view)
                     .where(Instance.study_id == st.id)).all()
    views = sorted({k for k in (view_key(a, b) for a, b in inst) if k})
    job_doc = None if job is None else _job_dict(job)
    return {
        "study_uid": st.study_uid,
        "accession": st.accession,
        "patient_id": st.patient_id,
        "study_date": st.study_date,
        "calling_ae": st.calling_ae,
        "state": st.state,
        "note": state_note(job_doc),
        "instance_count": len(inst),
        "views": views,
        "first_received": iso(st.first_received),
        "last_received": iso(st.last_received),
        "job": job_doc,
        "deliveries": _delivery_counts(s, job.id if job is not None else None),
    }


def _delivery_counts(s: Any, job_id: int | None) -> dict[str, int]:
    if job_id is None:
        return {}
    return {state: n for state, n in s.execute(
        select(Delivery.state, func.count()).where(Delivery.job_id == job_id)
        .group_by(Delivery.state)).all()}


def state_note(job: dict[str, Any] | None) -> str:
    """Why a study is failed or done-partial, in a few words ("" when nothing to say)."""
    if not job:
        return ""
    if job.get("error") and job.get("state") in (JobState.FAILED, JobState.QUEUED):
        return str(job["error"]).splitlines()[0][:60]
    scores = job.get("scores") or {}
    notes = []
    missing = (scores.get("selection") or {}).get("missing") or {}
    if missing:
        notes.append("missing " + ",".join(missing))
    failed = scores.get("failed_views") or {}
    if failed:
        notes.append("unreadable " + ",".join(failed))
    return "; ".join(notes)


def _job_dict(job: Job, full: bool = False) -> dict[str, Any]:
    scores = job.scores
    out: dict[str, Any] = {
        "id": job.id,
        "state": job.state,
        "reason": job.reason,
        "attempts": job.attempts,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "scores": scores,
        "views_used": job.views.split(",") if job.views else [],
        "model_version": job.model_version,
        "error": job.error,
    }
    if full:
        out["stage_seconds"] = dict((scores or {}).get("seconds") or {})
        out["lease_owner"] = job.lease_owner
        out["lease_until"] = iso(job.lease_until)
    return out


def _instance_rows(instances: Sequence[Instance], jobs: Sequence[Job]) -> list[dict[str, Any]]:
    """Each instance, and whether the latest finished job read it (and why not)."""
    done = next((j for j in reversed(jobs) if j.state in (JobState.DONE, JobState.DONE_PARTIAL,
                                                             JobState.FAILED)), None)
    scores = (done.scores if done is not None else None) or {}
    selection = scores.get("selection") or {}
    read = {str(v.get("sop_instance_uid")): (key, str(v.get("reason", "")))
            for key, v in (selection.get("read") or {}).items()}
    skipped = {str(n.get("sop_instance_uid")): str(n.get("reason", ""))
               for n in selection.get("not_analysed") or []}
    failed = scores.get("failed_views") or {}
    out = []
    for i in instances:
        analysed, why, because = False, "", ""
        if done is None:
            why = "not processed yet"
        elif i.sop_instance_uid in read:
            key, because = read[i.sop_instance_uid]
            if key in failed:
                why = f"selected for {key} but could not be read: {failed[key]}"
            else:
                analysed = True
        elif i.sop_instance_uid in skipped:
            why = skipped[i.sop_instance_uid]
        elif done.state == JobState.FAILED and not selection:
            why = f"job {done.id} failed: {(done.error or '').splitlines()[0][:200]}" \
                if done.error else f"job {done.id} failed"
        elif done.started_at is not None and i.received_at > done.started_at:
            why = "received after the last job started"
        elif not i.for_presentation:
            why = "For Processing image"
        elif view_key(i.laterality, i.view) is None:
            why = "unknown laterality or view"
        else:
            why = "not selected"
        out.append({
            "sop_instance_uid": i.sop_instance_uid,
            "series_uid": i.series_uid,
            "sop_class_uid": i.sop_class_uid,
            "laterality": i.laterality,
            "view": i.view,
            "view_key": view_key(i.laterality, i.view),
            "modifiers": [m for m in i.modifiers.split("+") if m],
            "for_presentation": i.for_presentation,
            "received_at": iso(i.received_at),
            "size": i.size,
            "analysed": analysed,
            "selected_because": because,
            "why_not": why,
        })
    return out


def _results(db: Database, study_uid: str, jobs: Sequence[Job], deliveries: Sequence[Delivery],
             results_dir: Path | None) -> list[dict[str, Any]]:
    """The result objects of the latest job that produced any: kind, SOP Instance UID, file
    (absolute), whether the file is still there."""
    if results_dir is None and db.home is not None:
        results_dir = db.home / "results"
    for job in reversed(jobs):
        found: dict[str, dict[str, Any]] = {}
        for d in deliveries:
            if d.job_id == job.id and d.sop_instance_uid not in found:
                found[d.sop_instance_uid] = {"kind": d.kind, "sop_instance_uid": d.sop_instance_uid,
                                             "path": str(db.file_path(d.path))}
        objects = ((job.scores or {}).get("objects") or {})
        for kind, doc in objects.items():
            uid = str((doc or {}).get("sop_instance_uid", ""))
            if not uid or uid in found:
                continue
            path = (results_dir / study_uid / f"{kind}.{uid}.dcm") if results_dir else None
            found[uid] = {"kind": kind, "sop_instance_uid": uid,
                          "path": str(path) if path else ""}
        if found:
            rows = sorted(found.values(), key=lambda r: (r["kind"], r["sop_instance_uid"]))
            return [{**r, "job_id": job.id,
                     "exists": bool(r["path"]) and Path(r["path"]).is_file()} for r in rows]
    return []


def _delivery_dict(d: Delivery) -> dict[str, Any]:
    return {
        "id": d.id,
        "job_id": d.job_id,
        "destination": d.destination,
        "kind": d.kind,
        "sop_instance_uid": d.sop_instance_uid,
        "state": d.state,
        "attempts": d.attempts,
        "last_error": d.last_error,
        "sent_at": iso(d.sent_at),
        "next_attempt": iso(d.next_attempt) if d.state == DeliveryState.PENDING else None,
    }


def _event_dict(e: Event) -> dict[str, Any]:
    return {"at": iso(e.at), "level": e.level, "kind": e.kind, "study_uid": e.study_uid,
            "message": e.message}
