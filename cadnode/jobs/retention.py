"""Retention: remove studies that are finished, delivered and older than a cutoff.

A study is removed only when it is finished (done, done-partial or failed, with no job queued
or running), every delivery of every one of its jobs is ``sent``, and its last activity (last
image received, last job finished, last delivery sent) is older than the cutoff. A study with
a pending or dead-lettered delivery is never removed, whatever its age: ``cadnode retry``
must still find its files. Removing a study removes its received images (spool), its result
objects (results) and its rows (deliveries, instances, jobs, then the study); events older
than the cutoff are pruned as well, but those of studies that are kept.

Each study is removed in its own short transaction, its row locked and the conditions checked
again there, so an image arriving meanwhile (which reopens the study) keeps it. Files are
removed after the commit, and only those written before the purge began: a new study under
the same UID (an image sent again after the rows went) keeps its own, although its file has
the same name. A file that cannot be removed (permissions, a read-only disk) is counted and
named in the report; the purge goes on with the rest.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, delete, func, or_, select

from cadnode.config import Settings
from cadnode.jobs.admin import parse_duration
from cadnode.jobs.db import Database, Delivery, Event, Instance, Job, Study, add_event
from cadnode.jobs.enum import FINISHED_STUDY_STATES, DeliveryState, JobState

log = logging.getLogger(__name__)

def parse_age(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``45s``, ``1w`` (or ``0``) in seconds; ValueError otherwise."""
    age = 0.0 if text.strip() == "0" else parse_duration(text)
    if age is None:
        raise ValueError(f"{text!r} is not an age such as 30d, 12h, 90m or 45s")
    return age


@dataclass
class PurgeReport:
    """What a purge removed (or, dry, would remove)."""

    cutoff: float
    dry_run: bool
    studies: list[str] = field(default_factory=list)  # study UIDs removed
    files: int = 0
    bytes: int = 0
    rows: dict[str, int] = field(default_factory=dict)  # table -> rows removed
    events: int = 0  # events pruned
    kept: dict[str, int] = field(default_factory=dict)  # why older studies were kept -> count
    failed: list[str] = field(default_factory=list)  # "path: why" of files that stayed

    def summary(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        kept = "; ".join(f"{n} kept: {why}" for why, n in sorted(self.kept.items()))
        failed = (f"; {len(self.failed)} file(s) could not be removed (first: "
                  f"{self.failed[0]})" if self.failed else "")
        return (f"{verb} {len(self.studies)} stud{'y' if len(self.studies) == 1 else 'ies'}, "
                f"{self.files} file(s), {_size(self.bytes)}, {self.events} event(s) older "
                f"than {_when(self.cutoff)}" + (f"; {kept}" if kept else "") + failed)

    def as_dict(self) -> dict[str, Any]:
        return {"cutoff": _when(self.cutoff), "dry_run": self.dry_run, "studies": self.studies,
                "files": self.files, "bytes": self.bytes, "rows": self.rows,
                "events": self.events, "kept": self.kept, "failed": self.failed}


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _size(n: int) -> str:
    value = float(n)
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{n} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _last_activity(s: Any, study: Study) -> float:
    finished = s.scalar(select(func.max(Job.finished_at)).where(Job.study_id == study.id))
    sent = s.scalar(select(func.max(Delivery.sent_at)).join(Job, Delivery.job_id == Job.id)
                    .where(Job.study_id == study.id))
    return max(study.last_received, finished or 0.0, sent or 0.0)


def _why_kept(s: Any, study: Study, cutoff: float) -> str:
    """Why ``study`` must stay ("" when it may go)."""
    if study.state not in FINISHED_STUDY_STATES:
        return f"still {study.state}"
    active = s.scalar(select(func.count()).select_from(Job).where(
        Job.study_id == study.id, Job.state.in_([JobState.QUEUED, JobState.RUNNING])))
    if active:
        return "a job is queued or running"
    undelivered = s.scalars(select(Delivery.state).join(Job, Delivery.job_id == Job.id).where(
        Job.study_id == study.id, Delivery.state != DeliveryState.SENT)).all()
    if DeliveryState.DEAD in undelivered:
        return "a delivery is dead-lettered (cadnode retry)"
    if undelivered:
        return "a delivery is pending"
    if _last_activity(s, study) >= cutoff:
        return "recent activity"
    return ""


def _remove_rows(s: Any, study_id: int, dry_run: bool) -> dict[str, int]:
    """Delete (dry: count) the study's rows, children first (foreign keys)."""
    jobs = select(Job.id).where(Job.study_id == study_id)
    where = {Delivery: Delivery.job_id.in_(jobs), Instance: Instance.study_id == study_id,
             Job: Job.study_id == study_id, Study: Study.id == study_id}
    counts: dict[str, int] = {}
    for table, condition in where.items():
        name = table.__tablename__
        if dry_run:
            counts[name] = s.scalar(select(func.count()).select_from(table).where(condition))
        else:
            counts[name] = cast(CursorResult[Any], s.execute(delete(table).where(condition))
                                ).rowcount
    return counts


def _files_of(s: Any, db: Database, study: Study) -> list[Path]:
    stored = list(s.scalars(select(Instance.path).where(Instance.study_id == study.id)))
    stored += s.scalars(select(Delivery.path).join(Job, Delivery.job_id == Job.id)
                        .where(Job.study_id == study.id))
    return [db.file_path(p) for p in stored]


def _study_folders(study_uid: str, spool_dir: Path, results_dir: Path) -> list[Path]:
    # Folders are named by the UID the listener checked; never follow a strange one out.
    if "/" in study_uid or study_uid in ("", ".", ".."):
        return []
    return [spool_dir / study_uid, results_dir / study_uid]


def purge(db: Database, older_than_s: float, spool_dir: Path, results_dir: Path,
          dry_run: bool = False, now: float | None = None, record: bool = True) -> PurgeReport:
    """Remove (``dry_run``: only count) what is older than ``older_than_s`` seconds and
    delivered; records an event ``purge`` unless dry (or ``record`` is False and nothing
    was removed)."""
    started = time.time()  # files written after this belong to a study received since
    cutoff = (started if now is None else now) - older_than_s
    report = PurgeReport(cutoff, dry_run)
    with db.session() as s:
        candidates = list(s.scalars(select(Study.id).where(Study.last_received < cutoff)
                                    .order_by(Study.id)))
    for study_id in candidates:
        with db.session() as s:
            study = s.get(Study, study_id, with_for_update=not dry_run,
                          populate_existing=True)
            if study is None:  # removed by another node's purge meanwhile
                continue
            why = _why_kept(s, study, cutoff)
            if why:
                report.kept[why] = report.kept.get(why, 0) + 1
                continue
            files = _files_of(s, db, study)
            uid = study.study_uid
            for table, count in _remove_rows(s, study.id, dry_run).items():
                report.rows[table] = report.rows.get(table, 0) + count
        report.studies.append(uid)
        _remove_files(report, files, _study_folders(uid, spool_dir, results_dir), started,
                      dry_run)
    with db.session() as s:
        if dry_run:
            report.events = s.scalar(select(func.count()).select_from(Event)
                                     .where(*_old_events(cutoff, report.studies))) or 0
        else:
            report.events = cast(CursorResult[Any], s.execute(
                delete(Event).where(*_old_events(cutoff, [])))).rowcount
            if record or report.studies or report.events:
                add_event(s, "purge", report.summary())
    if not dry_run and (report.studies or report.events):
        log.log(logging.WARNING if report.failed else logging.INFO, "purge: %s",
                report.summary())
    return report


def _old_events(cutoff: float, going: list[str]) -> tuple[Any, ...]:
    """Events older than ``cutoff``, but those of studies still kept (their history stays
    with them until they go); ``going``: studies a dry run would remove."""
    kept = select(Study.study_uid).where(Study.study_uid.not_in(going))
    return (Event.at < cutoff, or_(Event.study_uid.is_(None), Event.study_uid.not_in(kept)))


def _remove_files(report: PurgeReport, files: list[Path], folders: list[Path], started: float,
                  dry_run: bool) -> None:
    """The study's recorded files, then what else its folders held (result objects of jobs
    that had no destination), then the folders once empty; never a file written after the
    purge began."""
    seen: set[Path] = set()
    extra = [p for folder in folders if folder.is_dir() for p in sorted(folder.rglob("*"))]
    for path in files + extra:
        if path in seen:
            continue
        seen.add(path)
        try:
            st = path.lstat()
        except OSError:
            continue  # already gone
        if not path.is_file() or st.st_mtime > started:  # written since: a new study's
            continue
        if not dry_run:
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                report.failed.append(f"{path}: {exc.strerror or exc}")
                continue
        report.files += 1
        report.bytes += st.st_size
    if dry_run:
        return
    for folder in folders:
        for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True) + [folder]:
            try:
                os.rmdir(sub)
            except OSError:
                pass  # not empty (a new image arrived) or already gone


def purge_by_settings(settings: Settings, db: Database, dry_run: bool = False) -> PurgeReport:
    """The scheduled retention (``CADNODE_RETENTION_DAYS``): quiet when nothing was due."""
    return purge(db, settings.retention_days * 86400, settings.spool_dir, settings.results_dir,
                 dry_run=dry_run, record=False)
