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
