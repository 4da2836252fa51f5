"""The listener against DCMTK's storescu/echoscu: durable storage, refusals, C-ECHO."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from cadnode.demo import demo_cases
from cadnode.dicom.listener import Listener
from cadnode.jobs.db import Database, Event, Instance
from cadnode.jobs.queue import record_instance
from tests.helpers import require, wait_until


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[Listener, int, Database]]:
    require("storescu", "echoscu")
    db = Database(f"sqlite:///{tmp_path / 'jobs.db'}")
    db.create_schema()
    listener = Listener(
        tmp_path / "spool",
        on_stored=lambda st: record_instance(db, st),
        on_refused=lambda msg, uid: db.log("refused", msg, uid or None, "warning"),
    )
    port = listener.start("127.0.0.1", 0)
    yield listener, port, db
    listener.stop()
    db.dispose()


def storescu(port: int, *files: Path, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["storescu", "-aet", "MODALITY", "-aec", "CADNODE", *(extra or ("-xr",)), "127.0.0.1",
         str(port), *map(str, files)],
        capture_output=True, text=True, timeout=120,
    )


def echo(port: int) -> bool:
    r = subprocess.run(["echoscu", "-aec", "CADNODE", "127.0.0.1", str(port)],
                       capture_output=True, timeout=30)
    return r.returncode == 0


def test_storescu_file_is_on_disk_and_in_the_database(node, demo_study: list[Path]) -> None:  # type: ignore[no-untyped-def]
    listener, port, db = node
    r = storescu(port, *demo_study)
    assert r.returncode == 0, r.stderr
    with db.session() as s:
        rows = s.scalars(select(Instance)).all()
    assert len(rows) == 4
    for row in rows:
        ds = pydicom.dcmread(row.path)  # complete, parseable, pixel data included
        assert ds.SOPInstanceUID == row.sop_instance_uid
        assert len(ds.PixelData) > 1000
        assert Path(row.path).parent.parent == listener.spool_root
        # storescu offers RLE and uncompressed (-xr): the node takes RLE, no conversion
        assert row.transfer_syntax == pydicom.uid.RLELossless
    assert {(r.laterality, r.view) for r in rows} == {("L", "CC"), ("L", "MLO"), ("R", "CC"),
                                                     ("R", "MLO")}
    assert not any(listener.incoming.iterdir()), "temporary files left behind"
    assert echo(port)


def test_other_sop_classes_are_refused_and_the_node_keeps_serving(node) -> None:  # type: ignore[no-untyped-def]
    _, port, db = node
    secondary_capture = demo_cases()[0]["lcc"]  # the raw CBIS-DDSM file: SC, not MG
    r = storescu(port, secondary_capture)
    assert r.returncode != 0
    assert "no presentation context" in (r.stdout + r.stderr).lower()
    with db.session() as s:
        assert s.scalars(select(Instance)).all() == []

    def refused() -> list[Event]:  # recorded when the association ends, just after storescu
        with db.session() as s:
            return list(s.scalars(select(Event).where(Event.kind == "refused")).all())

    assert wait_until(lambda: refused() != [], 10)
    (event,) = refused()
    assert "sent nothing we accept" in event.message
    assert "Secondary Capture Image Storage" in event.message
    assert echo(port)


def test_invalid_uid_is_refused_with_an_event(node, demo_study: list[Path], tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, port, db = node
    ds = pydicom.dcmread(demo_study[0])
    ds.StudyInstanceUID = "1.2.3/../../etc"
    bad = tmp_path / "bad.dcm"
    ds.save_as(bad)
    r = storescu(port, bad)
    assert "0xc000" in (r.stdout + r.stderr).lower() or r.returncode != 0
    with db.session() as s:
        assert s.scalars(select(Instance)).all() == []
        (event,) = s.scalars(select(Event).where(Event.kind == "refused")).all()
    assert "not a valid UID" in event.message
    assert not list(tmp_path.glob("spool/**/etc*"))
    assert echo(port)


def test_two_listeners_each_receive_into_their_own_spool(tmp_path: Path) -> None:
    """No process-wide state: before, ``Listener.start`` pointed ``tempfile`` at its spool,
    so a second listener took the first one's folder and every other temporary file of the
    process (the decoder's, say) landed in the spool."""
    import tempfile

    from cadnode.dicom.sender import send_files
    from tests.helpers import write_small_study

    before = tempfile.gettempdir()
    got: dict[str, list[Path]] = {"a": [], "b": []}
    listeners = {name: Listener(tmp_path / name,
                                on_stored=lambda st, n=name: got[n].append(st.path))
                 for name in got}
    ports = {name: lst.start("127.0.0.1", 0) for name, lst in listeners.items()}
    try:
        assert tempfile.gettempdir() == before
        for name, port in ports.items():
            study = f"1.2.826.0.1.3680043.10.1.{ord(name)}"
            files = write_small_study(tmp_path / f"src-{name}", study, 64, 32)
            assert all(r.ok for r in send_files(files, "127.0.0.1", port, "CADNODE"))
        for name in got:
            assert len(got[name]) == 4
            assert all(p.is_relative_to(tmp_path / name) for p in got[name]), got[name]
            assert not [p for p in (tmp_path / name / ".incoming").rglob("*") if p.is_file()]
    finally:
        for lst in listeners.values():
            lst.stop()


def test_a_bug_behind_the_listener_is_not_answered_try_again_later(tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                   demo_study) -> None:
    """A programming error in ``on_stored`` is answered 0xC211 (a failure), not 0xA700 (which
    a sender retries for ever), with an event; the listener keeps serving."""
    from cadnode.dicom.sender import send_files

    refused: list[str] = []

    def buggy(_stored) -> None:  # type: ignore[no-untyped-def]
        raise KeyError("a bug")

    listener = Listener(tmp_path / "spool", on_stored=buggy,
                        on_refused=lambda msg, uid: refused.append(msg))
    port = listener.start("127.0.0.1", 0)
    try:
        (result,) = send_files(demo_study[:1], "127.0.0.1", port, "CADNODE")
        assert result.status == 0xC211
        assert any("internal error" in m and "KeyError" in m for m in refused), refused
        assert not list((tmp_path / "spool").glob("*/*.dcm"))  # nothing kept without a row
        assert echo(port)
    finally:
        listener.stop()


def test_listeners_sharing_a_spool_keep_to_their_own_partial_files(tmp_path: Path) -> None:
    """Two listener processes on one spool (a shared volume): each receives into its own
    folder; the clean-up of one removes another's partial files only when long stale, and a
    listener whose folder was removed makes it again rather than refusing stores."""
    import os
    import time

    from cadnode.dicom.listener import INCOMING, cleanup_incoming
    from cadnode.dicom.sender import send_files
    from tests.helpers import write_small_study

    spool = tmp_path / "spool"
    got: list[object] = []
    a = Listener(spool, on_stored=got.append)
    port = a.start("127.0.0.1", 0)
    try:
        other = spool / INCOMING / "otherhost-4242"  # another machine's listener
        other.mkdir(parents=True)
        fresh, stale = other / "fresh.dcm", other / "stale.dcm"
        fresh.write_bytes(b"being received")
        stale.write_bytes(b"left by a crash")
        os.utime(stale, (time.time() - 3600, time.time() - 3600))
        assert a.sweep(older_than=600) == 1
        assert fresh.exists() and not stale.exists()
        assert cleanup_incoming(spool, older_than=600) == 0 and other.is_dir()
        a.incoming.rmdir()  # removed under it (an admin, another host's clean-up)
        files = write_small_study(tmp_path / "src", "1.2.826.0.1.3680043.10.1.318.1", 64, 32)
        assert all(r.ok for r in send_files(files, "127.0.0.1", port, "CADNODE"))
        assert len(got) == 4 and a.incoming.is_dir()
    finally:
        a.stop()
