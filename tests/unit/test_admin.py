"""What an admin reads of the job database (and the few changes they make), on SQLite and on
the PostgreSQL server: cadnode.jobs.admin and opening an existing database."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError

from cadnode.config import Destination, Settings
from cadnode.dicom.spool import StoredInstance, study_date
from cadnode.dicom.views import ViewInfo
from cadnode.jobs import admin, queue, schema
from cadnode.jobs.db import Database, Delivery, Job, Study
from cadnode.results.enum import ResultKind

MG = "1.2.840.10008.5.1.4.1.1.1.2"
A, B, C1, C2 = "1.2.826.0.1.100", "1.2.826.0.1.200", "1.2.826.0.1.301", "1.2.826.0.1.302"
PACS = "PACS@127.0.0.1:104"
NOW = time.time()
DAY = 86400.0


def stored(study: str, sop: str, lat: str | None, view: str | None, *, patient: str = "P1",
           accession: str = "ACC1", date: str = "20240105", presentation: bool = True
           ) -> StoredInstance:
    return StoredInstance(
        path=Path(f"/spool/{study}/{sop}.dcm"), size=10, sop_instance_uid=sop,
        sop_class_uid=MG, transfer_syntax="1.2.840.10008.1.2.1", study_uid=study,
        series_uid=f"{study}.9", patient_id=patient, accession=accession, calling_ae="MODALITY",
        view=ViewInfo(lat, view, presentation, "test"), study_date=date)


def process_a(db: Database, results: Path) -> None:
    """Study A: four views and a For Processing copy; R-MLO could not be decoded; two result
    objects, one delivered and one dead-lettered."""
    for n, (lat, view) in enumerate([("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")]):
        queue.record_instance(db, stored(A, f"{A}.{n}", lat, view), now=NOW - 3 * DAY)
    queue.record_instance(db, stored(A, f"{A}.4", "L", "CC", presentation=False),
                          now=NOW - 3 * DAY)
    assert queue.assemble_studies(db, 0, 0, now=NOW - 3 * DAY + 10) == [A]
    job = queue.claim_next_job(db, "w", 60, now=NOW - 3 * DAY + 11)
    assert job is not None
    folder = results / A
    folder.mkdir(parents=True)
    files = []
    for kind, uid in (("cad_sr", "9.1"), ("sc", "9.2")):
        path = folder / f"{kind}.{uid}.dcm"
        path.write_bytes(b"not really DICOM")
        files.append(queue.ResultFile(kind, str(path), uid, (PACS,)))
    scores = {
        "views": {k: {"cancer": 0.1, "calcification": 0.2} for k in ("L-CC", "L-MLO", "R-CC")},
        "breasts": {"L": {"cancer": 0.12, "calcification": 0.34},
                    "R": {"cancer": 0.56, "calcification": 0.78}},
        "exam": {"cancer": 0.56, "calcification": 0.78},
        "failed_views": {"R-MLO": "the pixel data could not be decoded"},
        "outside_domain": {},
        "selection": {
            "read": {k: {"sop_instance_uid": f"{A}.{n}", "reason": "the only image"}
                     for n, k in enumerate(("L-CC", "L-MLO", "R-CC", "R-MLO"))},
            "not_analysed": [{"sop_instance_uid": f"{A}.4", "label": "L-CC",
                              "reason": "For Processing image (not analysed)"}],
            "missing": {},
        },
        "objects": {"cad_sr": {"sop_instance_uid": "9.1"}, "sc": {"sop_instance_uid": "9.2"}},
        "seconds": {"select": 0.01, "model": 1.5, "total": 2.0},
    }
    queue.complete_job(db, job, scores, ["L-CC", "L-MLO", "R-CC", "R-MLO"], "0.3", files,
                       partial=True, now=NOW - 3 * DAY + 12)
    sent, dead = queue.due_deliveries(db, now=NOW)
    queue.mark_delivery(db, sent.id, None, now=NOW - 3 * DAY + 13)
    queue.mark_delivery(db, dead.id, "refused", now=NOW - 3 * DAY + 13,
                        retry=queue.RetryPolicy(max_attempts=1))


@pytest.fixture
def filled(db: Database, tmp_path: Path) -> Database:
    process_a(db, tmp_path / "results")
    queue.record_instance(db, stored(B, f"{B}.0", "L", "CC", patient="P2", accession="ACC2",
                                     date=""), now=NOW - 3600)
    for study, at in ((C1, NOW - 2 * DAY), (C2, NOW - DAY)):
        queue.record_instance(db, stored(study, f"{study}.0", "R", "CC", patient="P3",
                                         accession="DUP"), now=at)
    return db


def _epoch(text: str) -> float:
    when = datetime.fromisoformat(text)
    assert when.utcoffset() is not None, text  # ISO 8601 with its offset
    return when.timestamp()


def test_the_list_is_newest_first_with_iso_times_and_the_latest_job(filled: Database) -> None:
    rows = admin.list_studies(filled)
    assert [r["study_uid"] for r in rows] == [B, C2, C1, A]
    a = rows[-1]
    assert (a["accession"], a["patient_id"], a["study_date"]) == ("ACC1", "P1", "20240105")
    assert a["state"] == "done-partial" and a["note"] == "unreadable R-MLO"
    assert a["views"] == ["L-CC", "L-MLO", "R-CC", "R-MLO"] and a["instance_count"] == 5
    assert abs(_epoch(a["first_received"]) - (NOW - 3 * DAY)) < 0.01
    assert abs(_epoch(a["last_received"]) - (NOW - 3 * DAY)) < 0.01
    job = a["job"]
    assert abs(_epoch(job["finished_at"]) - (NOW - 3 * DAY + 12)) < 0.01
    assert _epoch(job["created_at"]) < _epoch(job["started_at"]) < _epoch(job["finished_at"])
    assert job["scores"]["breasts"]["R"]["cancer"] == 0.56 and job["model_version"] == "0.3"
    assert a["deliveries"] == {"sent": 1, "dead": 1}
    b = rows[0]
    assert b["state"] == "receiving" and b["job"] is None and b["deliveries"] == {}
    assert b["study_date"] == ""


def test_filters(filled: Database) -> None:
    def uids(**kw: object) -> list[str]:
        return [r["study_uid"] for r in admin.list_studies(filled, admin.StudyFilter(**kw))]  # type: ignore[arg-type]

    assert uids(state="done-partial") == [A]
    assert uids(state="receiving") == [B, C2, C1]
    assert uids(state="failed") == []
    assert uids(since=admin.parse_since("36h")) == [B, C2]
    assert uids(since=admin.parse_since("2h")) == [B]
    assert uids(patient="P3") == [C2, C1]
    assert uids(accession="ACC1") == [A]
    assert uids(study=A) == [A]
    assert uids(study=".301") == [C1]  # the trailing digits `cadnode jobs` shows
    assert uids(study="0.1") == []  # the end of a UID, not any part of it
    assert uids(limit=2) == [B, C2]
    assert uids(patient="P3", since=admin.parse_since("30h")) == [C2]


def test_find_and_resolve_by_uid_or_accession(filled: Database) -> None:
    assert admin.find_studies(filled, A) == [A]
    assert admin.find_studies(filled, "ACC1") == [A]
    assert admin.find_studies(filled, "DUP") == [C2, C1]
    assert admin.find_studies(filled, "nope") == [] and admin.find_studies(filled, " ") == []
    assert admin.resolve_study(filled, "ACC2") == B
    assert admin.resolve_study(filled, "nope") is None
    with pytest.raises(admin.AmbiguousStudy) as err:
        admin.resolve_study(filled, "DUP")
    assert err.value.study_uids == [C2, C1]
    with pytest.raises(admin.AmbiguousStudy):
        admin.study_detail(filled, "DUP")
    assert admin.study_detail(filled, "nope") is None


def test_study_detail(filled: Database, tmp_path: Path) -> None:
    d = admin.study_detail(filled, "ACC1", tmp_path / "results")
    assert d is not None and d["study_uid"] == A and d["state"] == "done-partial"
    by_uid = {i["sop_instance_uid"]: i for i in d["instances"]}
    assert [by_uid[f"{A}.{n}"]["analysed"] for n in range(5)] == [True, True, True, False, False]
    assert "could not be decoded" in by_uid[f"{A}.3"]["why_not"]
    assert by_uid[f"{A}.4"]["why_not"].startswith("For Processing image")
    assert by_uid[f"{A}.4"]["for_presentation"] is False
    assert by_uid[f"{A}.0"]["view_key"] == "L-CC" and by_uid[f"{A}.0"]["why_not"] == ""
    assert by_uid[f"{A}.0"]["selected_because"] == "the only image"
    (job,) = d["jobs"]
    assert job["state"] == "done-partial" and job["attempts"] == 1
    assert job["stage_seconds"] == {"select": 0.01, "model": 1.5, "total": 2.0}
    assert [(r["kind"], r["sop_instance_uid"], r["exists"]) for r in d["results"]] == [
        ("cad_sr", "9.1", True), ("sc", "9.2", True)]
    assert sorted((x["kind"], x["state"], x["destination"]) for x in d["deliveries"]) == [
        ("cad_sr", "sent", PACS), ("sc", "dead", PACS)]
    sent = next(x for x in d["deliveries"] if x["state"] == "sent")
    assert abs(_epoch(sent["sent_at"]) - (NOW - 3 * DAY + 13)) < 0.01
    assert d["delivery_counts"] == {"sent": 1, "dead": 1}
    kinds = [e["kind"] for e in d["events"]]
    assert kinds[0] == "study" and "done-partial" in kinds and "dead_letter" in kinds
    assert all(_epoch(e["at"]) for e in d["events"])


def test_instances_of_a_study_not_yet_processed(filled: Database) -> None:
    d = admin.study_detail(filled, B)
    assert d is not None and d["jobs"] == [] and d["results"] == []
    (inst,) = d["instances"]
    assert inst["analysed"] is False and inst["why_not"] == "not processed yet"


def test_refused_associations(db: Database) -> None:
    db.log("refused", "association from X@10.0.0.1:5000 rejected: calling AE 'X' is not "
           "allowed", None, "warning")
    db.log("study", "new study from MODALITY", A)
    db.log("refused", "C-STORE refused (0xA900): dataset UIDs differ", A, "warning")
    events = admin.refused_associations(db)
    assert [e["study_uid"] for e in events] == [A, None]  # newest first
    assert events[1]["message"].startswith("association from X@")
    assert all(e["kind"] == "refused" and _epoch(e["at"]) > NOW - 60 for e in events)
    assert admin.count_refused(db) == 2
    assert admin.refused_associations(db, since=time.time() + 60) == []
    assert admin.count_refused(db, since=time.time() + 60) == 0
    assert len(admin.refused_associations(db, limit=1)) == 1


def test_resend_queues_new_deliveries_once(filled: Database, tmp_path: Path) -> None:
    results = tmp_path / "results"
    other = Destination("OTHER", "127.0.0.1", 11113)
    done = admin.resend(filled, A, [other], results_dir=results)
    assert done.job_id == 1 and done.missing == [] and done.already_pending == 0
    assert sorted(q["kind"] for q in done.queued) == ["cad_sr", "sc"]
    pending = queue.due_deliveries(filled, destination=str(other))
    assert sorted((d.kind, d.sop_instance_uid) for d in pending) == [("cad_sr", "9.1"),
                                                                      ("sc", "9.2")]
    again = admin.resend(filled, A, [other], results_dir=results)
    assert again.queued == [] and again.already_pending == 2  # not doubled while pending
    # a destination restricted to some kinds, and a kind filter
    sc_only = Destination("SCONLY", "127.0.0.1", 11114, (ResultKind.SC,))
    assert [q["kind"] for q in admin.resend(filled, A, [sc_only], results_dir=results).queued] \
        == ["sc"]
    pacs = Destination("PACS", "127.0.0.1", 104)
    done = admin.resend(filled, A, [pacs], kinds=["cad_sr"], results_dir=results)
    assert [(q["kind"], q["destination"]) for q in done.queued] == [("cad_sr", PACS)]
    # a result file that retention removed is reported, not queued
    (results / A / "sc.9.2.dcm").unlink()
    gone = admin.resend(filled, A, [Destination("THIRD", "127.0.0.1", 11115)],
                        results_dir=results)
    assert [q["kind"] for q in gone.queued] == ["cad_sr"]
    assert [m["kind"] for m in gone.missing] == ["sc"]
    assert "file not found" in gone.missing[0]["why"]
    # a study without results
    assert admin.resend(filled, B, [other], results_dir=results).job_id is None


def test_reprocess_queues_a_new_job(filled: Database) -> None:
    job_id = admin.reprocess(filled, A)
    with filled.session() as s:
        job = s.get(Job, job_id)
        assert job is not None and (job.state, job.reason) == ("queued", "requested")
        assert s.scalars(select(Study.state).where(Study.study_uid == A)).one() == "queued"
    with pytest.raises(admin.NotNow, match="already queued"):
        admin.reprocess(filled, A)
    claimed = queue.claim_next_job(filled, "w", 60)
    assert claimed is not None and (claimed.id, claimed.study_uid) == (job_id, A)
    with pytest.raises(admin.NotNow, match="already running"):
        admin.reprocess(filled, A)
    d = admin.study_detail(filled, A)
    assert d is not None and [j["state"] for j in d["jobs"]] == ["done-partial", "running"]
    assert d["job"]["id"] == job_id


def test_a_read_only_database_reads_and_never_writes(filled: Database, tmp_path: Path) -> None:
    ro = Database(filled.url, read_only=True)
    try:
        assert [r["study_uid"] for r in admin.list_studies(ro)][-1] == A
        assert admin.study_detail(ro, A) is not None
        with pytest.raises(DBAPIError, match="(?i)read.?only"), ro.session() as s:
            s.add(Delivery(job_id=1, destination="X@h:1", kind="sc", path="p",
                           sop_instance_uid="1.2", next_attempt=0.0))
    finally:
        ro.dispose()
    with filled.session() as s:
        assert len(s.scalars(select(Delivery)).all()) == 2


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")
def test_study_date_comes_from_the_header(db: Database) -> None:
    ds = pydicom.Dataset()
    assert study_date(ds) == ""
    ds.StudyDate = "20240229"
    assert study_date(ds) == "20240229"
    ds.StudyDate = "2024"
    assert study_date(ds) == ""
    queue.record_instance(db, stored(A, f"{A}.0", "L", "CC", date=""), now=1.0)
    assert admin.list_studies(db)[0]["study_date"] == ""
    queue.record_instance(db, stored(A, f"{A}.1", "L", "MLO", date="20240105"), now=2.0)
    queue.record_instance(db, stored(A, f"{A}.2", "R", "CC", date="20990101"), now=3.0)
    assert admin.list_studies(db)[0]["study_date"] == "20240105"  # the first one given


def test_parse_since() -> None:
    now = 1_800_000_000.0
    assert admin.parse_since("90s", now) == now - 90
    assert admin.parse_since("2h", now) == now - 7200
    assert admin.parse_since("3d", now) == now - 3 * DAY
    assert admin.parse_since("1w", now) == now - 7 * DAY
    assert admin.parse_since("2026-12-01T08:00+01:00") == 1796108400.0
    assert admin.parse_since("2026-12-01") == datetime(2026, 12, 1).timestamp()  # local
    for bad in ("yesterday", "2x", "-3d", ""):
        with pytest.raises(ValueError, match="neither an ISO"):
            admin.parse_since(bad, now)


# --- opening an existing database (SQLite; the admin command line's entry) -------------------


def _open(home: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("CADNODE_")}
    env["CADNODE_HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "cadnode", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_no_database_is_one_line_and_creates_nothing(tmp_path: Path) -> None:
    from cadnode.cli.common import open_existing_database

    home, cwd = tmp_path / "nowhere", tmp_path / "cwd"
    cwd.mkdir()
    with pytest.raises(SystemExit) as exit_:
        open_existing_database(replace(Settings(), home=home))
    assert exit_.value.code == 2
    r = _open(home, cwd, "jobs")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == (f"cadnode: no job database at {home / 'cadnode.db'} "
                        f"(CADNODE_HOME={home}); run this where the node runs, or pass "
                        "--config / set CADNODE_HOME\n")
    assert not home.exists() and list(cwd.iterdir()) == []


def test_a_foreign_file_is_not_taken_for_a_database(tmp_path: Path) -> None:
    import sqlite3

    from cadnode.cli.common import open_existing_database

    tmp_path.joinpath("cadnode.db").write_bytes(b"")  # an empty file: no tables at all
    with pytest.raises(SystemExit):
        open_existing_database(replace(Settings(), home=tmp_path))
    with sqlite3.connect(tmp_path / "cadnode.db") as con:
        con.execute("CREATE TABLE other (a)")
    r = _open(tmp_path, tmp_path, "jobs")
    assert r.returncode == 2 and "is not a cadnode job database" in r.stderr
    with sqlite3.connect(tmp_path / "cadnode.db") as con:
        tables = {n for (n,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"other"}  # nothing was created in it


def test_an_existing_database_opens_read_only_and_an_old_one_is_refused(tmp_path: Path) -> None:
    from cadnode.cli.common import open_existing_database

    settings = replace(Settings(), home=tmp_path)
    db = Database(settings.database_url, home=tmp_path)
    db.create_schema()
    queue.record_instance(db, stored(A, f"{A}.0", "L", "CC"), now=1.0)
    db.dispose()
    ro = open_existing_database(settings)
    try:
        assert ro.read_only and [r["study_uid"] for r in admin.list_studies(ro)] == [A]
    finally:
        ro.dispose()
    import sqlite3

    with sqlite3.connect(tmp_path / "cadnode.db") as con:  # as a release before migrations
        con.execute("DROP TABLE alembic_version")
    r = _open(tmp_path, tmp_path, "jobs", "--json")
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1, r.stderr
    assert ("is at the pre-migration schema version 3, this cadnode needs schema "
            f"{schema.head()}") in r.stderr
    assert "run `cadnode db upgrade`" in r.stderr
    with sqlite3.connect(tmp_path / "cadnode.db") as con:  # an admin command changed nothing
        tables = {n for (n,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "alembic_version" not in tables


def test_an_existing_postgresql_database_opens_read_only(pg_url: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    from cadnode.cli.common import open_existing_database
    from tests.helpers import empty_database

    settings = replace(Settings(), home=tmp_path / "no-home", db_url=pg_url)
    db = Database(pg_url)
    empty_database(db)  # a server database without cadnode's tables
    with pytest.raises(SystemExit) as exit_:
        open_existing_database(settings)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "is not a cadnode job database (CADNODE_DB_URL=postgresql+psycopg://" in err
    db.create_schema()
    queue.record_instance(db, stored(A, f"{A}.0", "L", "CC"), now=1.0)
    ro = open_existing_database(settings)
    try:
        assert [r["study_uid"] for r in admin.list_studies(ro)] == [A]
        with pytest.raises(DBAPIError, match="read-only transaction"):
            admin.reprocess(ro, A)
    finally:
        ro.dispose()
        db.dispose()
    assert not (tmp_path / "no-home").exists()
