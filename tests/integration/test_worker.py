"""A real Worker (ONNX Runtime, packaged model) over a spool filled by the real listener."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select, update

from cadnode.config import Destination, Settings
from cadnode.dicom.listener import Listener
from cadnode.dicom.sender import send_files
from cadnode.jobs import admin, queue
from cadnode.jobs.db import Database, Delivery, Study
from cadnode.jobs.worker import Worker

PACS = Destination("PACS", "127.0.0.1", 104)
VIEWER = Destination("OHIF", "127.0.0.1", 4242, ("tid1500",))


@pytest.fixture(scope="module")
def worker_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, Database]]:
    home = tmp_path_factory.mktemp("home")
    settings = Settings(home=home, destinations=(PACS, VIEWER))
    db = Database(settings.database_url)
    db.create_schema()
    yield settings, db
    db.dispose()


@pytest.fixture(scope="module")
def worker(worker_env: tuple[Settings, Database]) -> Worker:
    return Worker(*worker_env)


def receive(db: Database, settings: Settings, files: list[Path]) -> None:
    listener = Listener(settings.spool_dir, lambda s: queue.record_instance(db, s))
    port = listener.start("127.0.0.1", 0)
    try:
        assert all(r.ok for r in send_files(files, "127.0.0.1", port, "CADNODE"))
    finally:
        listener.stop()


def corrupt_pixels(src: Path, dst: Path, study_uid: str, n: int) -> Path:
    ds = pydicom.dcmread(src)
    ds.StudyInstanceUID = study_uid
    ds.SOPInstanceUID = f"{study_uid}.{n}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    frame = bytearray(ds.PixelData)
    frame[200:] = b"\xff" * (len(frame) - 200)  # RLE segments now point past the data
    ds.PixelData = bytes(frame)
    ds.save_as(dst, enforce_file_format=True)
    return dst


def run_study(db: Database, worker: Worker, study_uid: str) -> dict:
    assert study_uid in queue.assemble_studies(db, 0, 0, now=time.time() + 1)
    assert worker.run_once()
    return next(r for r in admin.list_studies(db) if r["study_uid"] == study_uid)


def test_study_is_processed_into_results_and_outbox(worker_env, worker, demo_study) -> None:  # type: ignore[no-untyped-def]
    settings, db = worker_env
    receive(db, settings, demo_study)
    study_uid = str(pydicom.dcmread(demo_study[0], stop_before_pixels=True).StudyInstanceUID)
    row = run_study(db, worker, study_uid)
    assert row["state"] == "done" and row["job"]["error"] is None
    scores = row["job"]["scores"]
    assert set(scores["views"]) == {"L-CC", "L-MLO", "R-CC", "R-MLO"}
    assert scores["exam"]["cancer"] == max(b["cancer"] for b in scores["breasts"].values())
    assert row["deliveries"] == {"pending": 5}  # four objects to the PACS, TID 1500 to the viewer
    with db.session() as s:
        sent = s.execute(select(Delivery.destination, Delivery.kind)).all()
        first = sorted(s.scalars(select(Delivery.sop_instance_uid)).all())
    assert sorted(k for d, k in sent if d == str(VIEWER)) == ["tid1500"]
    assert sorted(k for d, k in sent if d == str(PACS)) == ["cad_sr", "gsps", "sc", "tid1500"]
    for kind in ("cad_sr", "tid1500", "sc", "gsps"):
        (path,) = (settings.results_dir / study_uid).glob(f"{kind}.*.dcm")
        ds = pydicom.dcmread(path)
        assert ds.StudyInstanceUID == study_uid and path.name == f"{kind}.{ds.SOPInstanceUID}.dcm"

    # Re-processing the same study replaces its results: same UIDs, not new ones.
    with db.session() as s:
        s.execute(update(Study).values(state="receiving"))
    run_study(db, worker, study_uid)
    with db.session() as s:
        uids = s.scalars(select(Delivery.sop_instance_uid)).all()
    assert sorted(uids) == sorted(first * 2)  # the second run's rows repeat the first's UIDs


def test_undecodable_view_is_reported_failed_not_dropped(worker_env, worker, demo_study,  # type: ignore[no-untyped-def]
                                                         tmp_path) -> None:
    settings, db = worker_env
    study_uid = "1.2.826.0.1.3680043.10.1407.77"
    files = []
    for n, f in enumerate(demo_study):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID = study_uid
        ds.SOPInstanceUID = f"{study_uid}.{n}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        files.append(tmp_path / f"{n}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    files[0] = corrupt_pixels(demo_study[0], tmp_path / "bad.dcm", study_uid, 0)  # lcc
    receive(db, settings, files)
    row = run_study(db, worker, study_uid)
    assert row["state"] == "done-partial"  # a standard view could not be read
    assert set(row["job"]["scores"]["failed_views"]) == {"L-CC"}
    assert "L-CC" not in row["job"]["scores"]["views"]
    (sr_path,) = (settings.results_dir / study_uid).glob("cad_sr.*.dcm")
    sr = pydicom.dcmread(sr_path)
    texts, containers = [], []

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            if item.get("ValueType") == "TEXT":
                texts.append(str(item.TextValue))
            if item.get("ValueType") == "CONTAINER":
                containers.append(item.ConceptNameCodeSequence[0].CodeMeaning)
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    assert "Failed Detections" in containers
    assert any("L-CC not analysed:" in t for t in texts), texts


def test_study_with_nothing_decodable_fails_with_its_error(worker_env, worker, demo_study,  # type: ignore[no-untyped-def]
                                                         tmp_path) -> None:
    settings, db = worker_env
    study_uid = "1.2.826.0.1.3680043.10.1407.78"
    files = [corrupt_pixels(f, tmp_path / f"{n}.dcm", study_uid, n)
             for n, f in enumerate(demo_study)]
    receive(db, settings, files)
    row = run_study(db, worker, study_uid)
    assert row["state"] == "failed" and row["job"]["state"] == "failed"
    assert row["job"]["error"].startswith("no selected view could be decoded")
    assert row["job"]["attempts"] == 1  # permanent: not retried
    assert row["deliveries"] == {}


@pytest.mark.parametrize("processes", [1, 2])
def test_a_view_over_the_decoding_memory_limit_fails_alone(tmp_path, processes) -> None:  # type: ignore[no-untyped-def]
    """The real 17-megapixel film needs ~200 MB to decode; with a 160 MB limit its child process
    fails, the view is reported with a one-line reason, the small views are scored (decoded
    beside it in the other child when there are two: a pool broken by one view's crash decodes
    the others again alone), and the worker goes on with a new child."""
    from cadnode.demo import write_demo_study
    from tests.helpers import write_small_study

    settings = Settings(home=tmp_path / "home", decode_memory_mb=160, decode_processes=processes)
    settings.home.mkdir()
    db = Database(settings.database_url)
    db.create_schema()
    worker = Worker(settings, db)
    try:
        study_uid = "1.2.826.0.1.3680043.10.1407.79"
        small = write_small_study(tmp_path / "small", study_uid)  # L-CC, L-MLO, R-CC, R-MLO
        big = pydicom.dcmread(write_demo_study(tmp_path / "big")[0])  # the real L-CC film
        big.StudyInstanceUID = study_uid
        big.SOPInstanceUID = big.file_meta.MediaStorageSOPInstanceUID = f"{study_uid}.9"
        big.save_as(tmp_path / "big.dcm", enforce_file_format=True)
        receive(db, settings, [*small, tmp_path / "big.dcm"])
        row = run_study(db, worker, study_uid)
        assert row["state"] == "done-partial"
        scores = row["job"]["scores"]
        assert scores["selection"]["read"]["L-CC"]["sop_instance_uid"] == f"{study_uid}.9"
        assert set(scores["views"]) == {"L-MLO", "R-CC", "R-MLO"}
        # the decoder either aborts the child (the pool is replaced) or raises inside it
        reason = scores["failed_views"]["L-CC"]
        assert "\n" not in reason and ("memory limit" in reason or "could not be decoded"
                                       in reason), reason
        again = "1.2.826.0.1.3680043.10.1407.80"
        receive(db, settings, write_small_study(tmp_path / "again", again))
        assert run_study(db, worker, again)["state"] == "done"  # the child still (or anew) works
        # the limit, not the image, failed the view: without it the same study is read whole
        unlimited = Worker(replace(settings, decode_memory_mb=0), db)
        with db.session() as s:
            s.execute(update(Study).where(Study.study_uid == study_uid).values(state="receiving"))
        assert run_study(db, unlimited, study_uid)["state"] == "done"
    finally:
        worker.close()
        db.dispose()


def test_an_idle_worker_claims_a_woken_job_at_once_and_reports_it_done(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """With a 60 s poll, a worker told by ``wake()`` that a job is queued runs it well before
    its next poll, then calls ``after_job`` (``cadnode serve`` sends the results from there)."""
    import threading

    from tests.helpers import write_small_study

    settings = Settings(home=tmp_path / "home", poll_seconds=60.0, decode_memory_mb=0)
    settings.home.mkdir()
    db = Database(settings.database_url)
    db.create_schema()
    idle, ran = threading.Event(), threading.Event()

    class Observed(Worker):
        def run_once(self) -> bool:
            busy = super().run_once()
            if not busy:
                idle.set()  # about to wait for the next poll (or a wake-up)
            return busy

    worker = Observed(settings, db)
    worker.after_job = ran.set
    thread = threading.Thread(target=worker.run_forever, daemon=True)
    thread.start()
    try:
        assert idle.wait(60), "the worker never found the queue empty"
        study_uid = "1.2.826.0.1.3680043.10.1407.81"
        receive(db, settings, write_small_study(tmp_path / "s", study_uid))
        assert study_uid in queue.assemble_studies(db, 0, 0, now=time.time() + 1)
        worker.wake()
        assert ran.wait(30), "not run within 30 s of the wake-up (the poll is 60 s)"
        row = next(r for r in admin.list_studies(db) if r["study_uid"] == study_uid)
        assert row["state"] == "done"
    finally:
        worker.stop()  # wakes the wait too: the thread ends now, not after the poll
        thread.join(30)
        db.dispose()
    assert not thread.is_alive()
