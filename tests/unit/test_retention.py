"""Retention on SQLite and PostgreSQL: only finished, delivered, old studies go, files too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from cadnode.config import load_settings
from cadnode.dicom.spool import StoredInstance
from cadnode.dicom.views import ViewInfo
from cadnode.jobs import queue
from cadnode.jobs.db import Database, Delivery, Event, Instance, Job, Study
from cadnode.jobs.retention import parse_age, purge, purge_by_settings

DEST = "PACS@127.0.0.1:104"
DAY = 86400.0


class Home:
    """Spool and results folders with real files, and the rows that name them."""

    def __init__(self, db: Database, root: Path) -> None:
        self.db, self.spool, self.results = db, root / "spool", root / "results"

    def study(self, uid: str, at: float, deliver: str | None = "sent",
              finish: bool = True) -> list[Path]:
        """A study received at ``at``, processed (``finish``) with two result objects for one
        destination whose deliveries end ``deliver`` (sent, pending, dead or None for no
        destination); returns its files."""
        files = []
        for n, (lat, view) in enumerate([("L", "CC"), ("R", "CC")]):
            path = self.spool / uid / f"{uid}.{n}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x" * 1000)
            files.append(path)
            queue.record_instance(self.db, StoredInstance(
                path=path, size=1000, sop_instance_uid=f"{uid}.{n}", sop_class_uid="1.2",
                transfer_syntax="1.2", study_uid=uid, series_uid=f"{uid}.9",
                patient_id="PATIENT-X", accession="A", calling_ae="MOD",
                view=ViewInfo(lat, view, True, "t")), now=at)
        if not finish:
            return files
        queue.assemble_studies(self.db, 0, 0, now=at + 1)
        job = queue.claim_next_job(self.db, "w", 60, now=at + 2)
        assert job is not None and job.study_uid == uid
        results = []
        for kind in ("cad_sr", "sc"):
            path = self.results / uid / f"{kind}.{uid}.7.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"r" * 500)
            files.append(path)
            results.append(queue.ResultFile(kind, str(path), f"{uid}.7.{kind == 'sc'}",
                                            (DEST,) if deliver else ()))
        queue.complete_job(self.db, job, {"exam": {}}, ["L-CC"], "v", results, now=at + 3)
        if deliver in ("sent", "dead"):
            with self.db.session() as s:
                ids = list(s.scalars(select(Delivery.id).join(Job).where(
                    Job.id == job.id)))
            for d in ids:
                queue.mark_delivery(self.db, d, None if deliver == "sent" else "down",
                                    now=at + 4, retry=queue.RetryPolicy(1, 1, 1))
        return files


def count(db: Database, table: type) -> int:
    with db.session() as s:
        return int(s.scalar(select(func.count()).select_from(table)) or 0)


def test_ages_have_units() -> None:
    assert parse_age("30d") == 30 * DAY and parse_age("12h") == 12 * 3600
    assert parse_age("90m") == 5400 and parse_age("45s") == 45 and parse_age("0") == 0
    assert parse_age("1w") == 7 * DAY  # the same reading as `jobs --since`
    for bad in ("30", "-1d", "3y", "d"):
        with pytest.raises(ValueError, match="30d, 12h"):
            parse_age(bad)


def test_only_finished_delivered_old_studies_are_removed(db: Database, tmp_path: Path) -> None:
    home = Home(db, tmp_path)
    now = time.time()
    old = now - 40 * DAY
    gone = home.study("1.2.1", old)
    gone += home.study("1.2.2", old, deliver=None)  # no destination: nothing to deliver
    pending = home.study("1.2.3", old, deliver="pending")
    dead = home.study("1.2.4", old, deliver="dead")
    recent = home.study("1.2.6", now - 2 * DAY)
    receiving = home.study("1.2.5", old, finish=False)  # last: nothing assembles it
    with db.session() as s:  # old events go, recent ones stay
        s.add(Event(at=old, kind="study", message="old", study_uid="1.2.1"))
        s.add(Event(at=old, kind="startup", message="old", study_uid=None))
        s.add(Event(at=old, kind="study", message="kept with its study", study_uid="1.2.3"))
    before = count(db, Event)

    dry = purge(db, 30 * DAY, home.spool, home.results, dry_run=True, now=now)
    assert sorted(dry.studies) == ["1.2.1", "1.2.2"]
    assert dry.files == 8 and dry.bytes == 2 * (2 * 1000 + 2 * 500)
    assert dry.rows == {"deliveries": 2, "instances": 4, "jobs": 2, "studies": 2}
    assert dry.events == 2 and "would remove 2 studies" in dry.summary()
    assert all(p.is_file() for p in gone) and count(db, Study) == 6
    assert count(db, Event) == before  # a dry run records nothing either

    report = purge(db, 30 * DAY, home.spool, home.results, now=now)
    assert sorted(report.studies) == ["1.2.1", "1.2.2"]
    assert (report.files, report.bytes, report.rows) == (dry.files, dry.bytes, dry.rows)
    assert report.kept == {"a delivery is pending": 1,
                           "a delivery is dead-lettered (cadnode retry)": 1,
                           "still receiving": 1}
    assert not any(p.exists() for p in gone)
    for uid in ("1.2.1", "1.2.2"):
        assert not (home.spool / uid).exists() and not (home.results / uid).exists()
    for kept in (pending, dead, receiving, recent):
        assert all(p.is_file() for p in kept)
    with db.session() as s:
        assert sorted(s.scalars(select(Study.study_uid))) == ["1.2.3", "1.2.4", "1.2.5", "1.2.6"]
        old_events = select(Event.message).where(Event.at < now - 30 * DAY)
        assert list(s.scalars(old_events)) == ["kept with its study"]
        (event,) = s.scalars(select(Event).where(Event.kind == "purge")).all()
        assert event.message.startswith("removed 2 studies, 8 file(s), 5.9 KB")
        assert "1 kept: a delivery is pending" in event.message
    assert count(db, Instance) == 8 and count(db, Job) == 3

    # Nothing older is left: a second purge removes nothing and says so
    again = purge(db, 30 * DAY, home.spool, home.results, now=now)
    assert again.studies == [] and again.files == 0


def test_an_image_after_processing_keeps_the_study(db: Database, tmp_path: Path) -> None:
    home = Home(db, tmp_path)
    now = time.time()
    home.study("1.3.1", now - 40 * DAY)
    assert queue.record_instance(db, StoredInstance(  # a late image reopens the study
        path=home.spool / "1.3.1" / "late.dcm", size=1, sop_instance_uid="1.3.1.99",
        sop_class_uid="1.2", transfer_syntax="1.2", study_uid="1.3.1", series_uid="1.3.1.9",
        patient_id="P", accession="A", calling_ae="MOD", view=ViewInfo("L", "MLO", True, "t")),
        now=now - 40 * DAY + 10)
    report = purge(db, 30 * DAY, home.spool, home.results, now=now)
    assert report.studies == [] and report.kept == {"still receiving": 1}


def test_a_file_written_during_the_purge_stays_and_one_that_cannot_go_is_named(
        db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An instance sent again after the rows went is written under the same name (spool
    paths are the study and SOP UIDs): the purge must not remove the new study's file. A file
    that cannot be removed is reported, and the rest still goes."""
    home = Home(db, tmp_path)
    now = time.time()
    resent, stuck = home.study("1.4.1", now - 40 * DAY)[0], home.study("1.4.2", now - 40 * DAY)[1]
    real_unlink = Path.unlink

    def unlink(path: Path, missing_ok: bool = False) -> None:
        if path == stuck:
            raise PermissionError(13, "Permission denied")
        return real_unlink(path, missing_ok)

    real_lstat = Path.lstat

    def lstat(path: Path) -> os.stat_result:
        if path == resent:  # the PACS sends it again as the purge goes: written after it began
            os.utime(path, (now + 5, now + 5))
        return real_lstat(path)

    monkeypatch.setattr(Path, "lstat", lstat)
    monkeypatch.setattr(Path, "unlink", unlink)
    report = purge(db, 30 * DAY, home.spool, home.results, now=now)
    monkeypatch.undo()
    assert sorted(report.studies) == ["1.4.1", "1.4.2"]
    assert resent.is_file() and stuck.is_file()
    assert report.failed == [f"{stuck}: Permission denied"]
    assert report.files == 8 - 2 and "1 file(s) could not be removed" in report.summary()


def test_the_scheduled_retention_runs_at_start_and_hourly(db: Database, tmp_path: Path) -> None:
    from cadnode.jobs.leader import Duty, Leadership
    from cadnode.jobs.scheduler import RETENTION_EVERY_SECONDS, create_outbox, create_scheduler

    settings = load_settings(environ={"CADNODE_HOME": str(tmp_path),
                                      "CADNODE_RETENTION_DAYS": "30"})
    home = Home(db, tmp_path)
    files = home.study("1.4.1", time.time() - 31 * DAY)
    keep = home.study("1.4.2", time.time() - 29 * DAY)
    lead = Leadership(db, Duty.ASSEMBLER)
    sched = create_scheduler(settings, db, [lead], create_outbox(settings, db))
    assert lead.held  # polled once when made: the first run is at once, not after a poll
    job = sched.get_job("retention")
    assert job is not None and job.trigger.interval.total_seconds() == RETENTION_EVERY_SECONDS
    assert job.next_run_time is not None  # at once when the node starts
    follower = Leadership(db, Duty.ASSEMBLER)  # another process: it does not lead, runs nothing
    other = create_scheduler(settings, db, [follower], create_outbox(settings, db))
    assert not follower.held
    other_job = other.get_job("retention")
    other_job.func(*other_job.args)
    assert all(p.exists() for p in files)
    job.func(*job.args)
    assert not any(p.exists() for p in files) and all(p.exists() for p in keep)
    lead.release()
    follower.release()
    # off by default; a quiet hour records no event
    off = load_settings(environ={"CADNODE_HOME": str(tmp_path)})
    quiet = Leadership(db, Duty.ASSEMBLER)
    assert create_scheduler(off, db, [quiet]).get_job("retention") is None
    quiet.release()
    events = count(db, Event)
    assert purge_by_settings(settings, db).studies == [] and count(db, Event) == events


def test_cadnode_purge_command(tmp_path: Path) -> None:
    env = {"CADNODE_HOME": str(tmp_path / "home"), "PATH": os.environ["PATH"]}
    settings = load_settings(environ=env)
    settings.home.mkdir()
    db = Database(settings.database_url, home=settings.home)
    db.create_schema()
    home = Home(db, settings.home)
    files = home.study("1.5.1", time.time() - 3 * 3600)
    db.dispose()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cadnode", "purge", *args], env=env,
                              capture_output=True, text=True, timeout=60)

    r = run("--older-than", "2h", "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["dry_run"] and doc["studies"] == ["1.5.1"] and doc["bytes"] == 3000
    assert all(p.exists() for p in files)
    r = run("--older-than", "4h")
    assert r.returncode == 0 and "removed 0 studies" in r.stdout
    r = run("--older-than", "2h")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("cadnode purge: removed 1 study, 4 file(s), 2.9 KB")
    assert not any(p.exists() for p in files)
    r = run("--older-than", "30")
    assert r.returncode == 2 and "30d, 12h" in r.stderr
    r = run()
    assert r.returncode == 2 and "CADNODE_RETENTION_DAYS" in r.stderr


def test_the_scheduler_hears_queued_studies_and_sends_on_request(db: Database,
                                                                 tmp_path: Path) -> None:
    """``on_queued`` gets what each assembling queued; ``send_now`` runs the outbox duty at
    once instead of at its next interval (60 s here); neither fails once the scheduler has
    stopped."""
    import threading

    from cadnode.jobs.leader import Duty, Leadership
    from cadnode.jobs.scheduler import create_outbox, create_scheduler, send_now

    settings = load_settings(environ={"CADNODE_HOME": str(tmp_path),
                                      "CADNODE_POLL_SECONDS": "60"})
    heard: list[list[str]] = []
    ticked = threading.Event()
    outbox = create_outbox(settings, db)
    real_tick = outbox.tick

    def tick() -> list[threading.Thread]:
        ticked.set()
        return real_tick()

    outbox.tick = tick  # type: ignore[method-assign]  # what the scheduler's duty calls
    leads = [Leadership(db, Duty.ASSEMBLER), Leadership(db, Duty.SENDER)]
    sched = create_scheduler(settings, db, leads, outbox, on_queued=heard.append)
    job = sched.get_job("assemble")
    job.func(*job.args, **job.kwargs)  # nothing received: nothing queued, nothing heard
    assert heard == []
    home = Home(db, tmp_path)
    home.study("1.4.9", time.time() - 3600, finish=False)
    job.func(*job.args, **job.kwargs)
    assert heard == [["1.4.9"]]
    sched.start()
    try:
        ticked.clear()
        send_now(sched)
        assert ticked.wait(20), "the outbox did not run on request (its interval is 60 s)"
    finally:
        sched.shutdown(wait=True)
        for lead in leads:
            lead.release()
    send_now(sched)  # after shutdown: nothing to run, no error
