"""The bad-input corpus against the real listener (storescu / cadnode's sender) and a real Worker.

For every case: the C-STORE status of each file, the job state and report of each study it made,
the event in the job database, no temporary file left behind, and C-ECHO still answered after it.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select

from cadnode.config import Settings
from cadnode.dicom.listener import Listener
from cadnode.dicom.sender import send_files
from cadnode.dicom.views import detect_view
from cadnode.jobs import queue
from cadnode.jobs.db import Database, Event, Instance, Study, latest_job
from cadnode.jobs.worker import Worker
from cadnode.text.clinical import build_clinical_text
from tests.helpers import require, wait_until
from tests.robustness.corpus import CASES, JPLY, NOT_SENT, SUCCESS, Builder, Case

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Node:
    """A listener wired like `cadnode serve` (rows and refusal events), and one Worker."""

    settings: Settings
    db: Database
    listener: Listener
    port: int
    worker: Worker
    demo: list[Path]
    files: Path


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, demo_study: list[Path]) -> Iterator[Node]:
    require("storescu", "echoscu")
    home = tmp_path_factory.mktemp("robust-home")
    settings = Settings(home=home)
    db = Database(settings.database_url)
    db.create_schema()
    listener = Listener(
        settings.spool_dir,
        on_stored=lambda st: queue.record_instance(db, st),
        on_refused=lambda msg, uid: db.log("refused", msg, uid or None, "warning"),
    )
    port = listener.start("127.0.0.1", 0)
    worker = Worker(settings, db)
    yield Node(settings, db, listener, port, worker, demo_study,
               tmp_path_factory.mktemp("corpus"))
    listener.stop()
    db.dispose()


def echo(port: int) -> bool:
    r = subprocess.run(["echoscu", "-aec", "CADNODE", "127.0.0.1", str(port)],
                       capture_output=True, timeout=30)
    return r.returncode == 0


def storescu(port: int, files: list[Path]) -> list[int | None]:
    """Send with DCMTK; the status of each file as far as storescu's output tells it."""
    r = subprocess.run(
        ["storescu", "-aet", "ROBUST", "-aec", "CADNODE", "127.0.0.1", str(port),
         *map(str, files)], capture_output=True, text=True, timeout=120,
    )
    out = (r.stdout + r.stderr).lower()
    if "no presentation context" in out or "no acceptable presentation contexts" in out:
        return [NOT_SENT] * len(files)
    assert r.returncode == 0, out
    return [SUCCESS] * len(files)


def send(node: Node, case: Case, associations: list[list[Path]]) -> list[int | None]:
    statuses: list[int | None] = []
    for files in associations:
        if case.sender == "storescu":
            statuses += storescu(node.port, files)
        else:
            statuses += [r.status for r in send_files(files, "127.0.0.1", node.port, "CADNODE",
                                                     calling_ae="ROBUST")]
    return statuses


def process_all(node: Node) -> None:
    """Queue every receiving study and run jobs until the queue is empty (retries included)."""
    queue.assemble_studies(node.db, 0, 0, now=time.time() + 1)
    for _ in range(50):
        if not node.worker.run_once():
            return
    raise AssertionError("the worker never emptied the queue")


def last_event_id(db: Database) -> int:
    with db.session() as s:
        return int(s.scalar(select(func.max(Event.id))) or 0)


def spooled_text(db: Database, study_uid: str) -> str:
    """Clinical text of the study's L-CC (else first) spooled instance, read back from disk."""
    with db.session() as s:
        rows = s.execute(
            select(Instance.path, Instance.laterality, Instance.view)
            .join(Study, Study.id == Instance.study_id).where(Study.study_uid == study_uid)
            .order_by(Instance.id)
        ).all()
    path = next((p for p, lat, v in rows if (lat, v) == ("L", "CC")), rows[0][0])
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return build_clinical_text(ds, detect_view(ds))


def _params() -> list[object]:
    return [pytest.param(case, id=case.name) for case in CASES]


@pytest.mark.parametrize("case", _params())
def test_bad_input_gets_a_clear_answer(node: Node, case: Case) -> None:
    if "shared" in case.needs and not JPLY.is_file():
        pytest.skip(f"{JPLY} is not here (../shared/data absent)")
    b = Builder(node.files / case.name, node.demo, case.name)
    associations = case.build(b)
    before = last_event_id(node.db)
    e = case.expect

    statuses = send(node, case, associations)
    assert statuses == list(e.statuses), [hex(s) if s is not None else s for s in statuses]
    assert echo(node.port), "the listener stopped answering C-ECHO"
    assert not list(node.listener.incoming.iterdir()), "temporary files left in .incoming"

    if e.job is not None:
        process_all(node)
    with node.db.session() as s:
        events = s.scalars(select(Event).where(Event.id > before)).all()
        states = {}
        kept = len(b.study_uids) - e.refused_studies
        for uid in b.study_uids[kept:]:
            assert s.scalars(select(Study).where(Study.study_uid == uid)).first() is None, uid
        for uid in b.study_uids[:kept]:
            study = s.scalars(select(Study).where(Study.study_uid == uid)).first()
            job = latest_job(s, study.id) if study is not None else None
            states[uid] = (study, job)
    kinds = [ev.kind for ev in events]
    if e.event:
        assert any(ev.kind == e.event and e.event_text in ev.message for ev in events), \
            [(ev.kind, ev.message) for ev in events]
    if e.statuses and all(st == NOT_SENT for st in e.statuses):
        assert "study" not in kinds, "a refused SOP class must not create a study"

    for uid, (study, job) in states.items():
        if e.job is None:
            assert job is None, f"{uid}: unexpected job {job and job.state}"
            continue
        assert study is not None and job is not None, f"{uid}: no job"
        assert (job.state, study.state) == (e.job, e.job), job.error
        if e.job == "failed":
            assert e.error in (job.error or ""), job.error
            continue
        scores = job.scores or {}
        assert sorted(scores["views"]) == sorted(e.views)
        failed = scores["failed_views"]
        assert sorted(failed) == sorted(e.failed), failed
        # the job record keeps the whole error; what the reports show is one plain line
        assert all(e.error in msg for msg in scores["errors"].values()), scores["errors"]
        assert all("\n" not in msg and len(msg) <= 200 for msg in failed.values()), failed
        assert 0.0 <= scores["exam"]["cancer"] <= 1.0
        for phrase in e.text_has:
            assert phrase in spooled_text(node.db, uid)


def test_corpus_is_big_enough_and_documented() -> None:
    """At least 40 cases, and docs/robustness.md has a row for each one."""
    assert len(CASES) >= 40
    doc = (REPO / "docs" / "robustness.md").read_text()
    missing = [c.name for c in CASES if f"`{c.name}`" not in doc]
    assert not missing, f"cases missing from docs/robustness.md: {missing}"



def test_refused_sop_class_leaves_an_event(node: Node) -> None:
    """A modality pushing CT to the node shows up in the job database, not only in its log."""
    case = next(c for c in CASES if c.name == "sop-class-ct")
    b = Builder(node.files / "refused-event", node.demo, "refused-event")
    before = last_event_id(node.db)
    assert send(node, case, case.build(b)) == [NOT_SENT]

    def recorded() -> bool:  # written when the association ends, just after the sender returns
        with node.db.session() as s:
            messages = [ev.message for ev in s.scalars(select(Event).where(Event.id > before))]
        return any("CT Image Storage" in m for m in messages)

    assert wait_until(recorded, 10)
