"""Property-based fuzzing (hypothesis) of the header-to-text builder, the view/side detector and
the dataset reader followed by the node's header handling.

"Clear" errors, the only ones allowed out of node code:

* ``build_clinical_text`` and ``detect_view``: none at all (both promise never to raise);
* the listener's C-STORE handler: none; it answers every dataset with a DICOM status;
* ``decode_pixels``: ``PixelDecodeError`` only (its message names the transfer syntax).

``make test`` runs a short, time-bounded pass; ``CADNODE_FUZZ_EXAMPLES=20000`` runs a long one
(see docs/robustness.md).
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import ImplicitVRLittleEndian

from cadnode.dicom.listener import Listener
from cadnode.dicom.pixels import PixelDecodeError, decode_pixels
from cadnode.dicom.views import ViewInfo, detect_view
from cadnode.text.clinical import build_clinical_text, template_vocabulary
from tests.robustness.corpus import MG, synthetic_mg

EXAMPLES = int(os.environ.get("CADNODE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="CADNODE_FUZZ_SEED" not in
                os.environ, suppress_health_check=[HealthCheck.too_slow,
                                                   HealthCheck.function_scoped_fixture])

STATUSES = {0x0000, 0xA700, 0xA900, 0xC000}  # what the C-STORE handler may answer
VIEW_TERMS = {"CC", "MLO", "ML", "LM", "LMO", "XCC", "XCCL", "XCCM", "FB", "SIO", "ISO", "CV",
              "AT", "RL", "RM", "RS", "RI", "TAN", "SPECIMEN"}
VRS = ["AS", "CS", "DA", "DS", "IS", "LO", "PN", "SH", "SQ", "UI", "US", "UL", "FL", "FD", "OB",
       "UN", "ST", "UT", "SS", "AT", "TM", "DT"]

TEXT_KEYWORDS = [
    "PatientAge", "PatientBirthDate", "StudyDate", "Manufacturer", "ManufacturerModelName",
    "BreastImplantPresent", "BodyPartThickness", "CompressionForce", "KVP", "ExposureInuAs",
    "Exposure", "AnodeTargetMaterial", "FilterMaterial", "PresentationIntentType", "SOPClassUID",
    "ViewCodeSequence", "ViewModifierCodeSequence", "SpecificCharacterSet",
]
VIEW_KEYWORDS = [
    "ViewPosition", "ImageLaterality", "Laterality", "PatientOrientation", "SeriesDescription",
    "ProtocolName", "StudyDescription", "ViewCodeSequence", "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence", "SOPClassUID", "PresentationIntentType",
    "SpecificCharacterSet",
]
WORDS = ["L", "R", "B", "CC", "MLO", "ML", "XCCL", "LEFT", "RIGHT", "A", "P", "F", "FL", "FR",
         "R MLO", "LCC", "CCL", "OBLIQUE", "FOR PROCESSING", "FOR PRESENTATION", "399162004",
         "R-10226", "cranio-caudal", "HOLOGIC", "Selenia Dimensions", "055Y", "abc", "-40",
         "1e400", "NaN", "YES", "MOLYBDENUM", "ISO_IR 192", "ISO 2022 IR 87", MG, "20240230",
         "\\", "", " ", "\x00", "Ωμέγα", "山田"]

# --- strategies -------------------------------------------------------------------------------

raw_bytes = st.one_of(
    st.binary(max_size=40),
    st.lists(st.sampled_from(WORDS), max_size=4).map(lambda w: "\\".join(w).encode("utf-8")),
)


Spec = list[tuple[str, str, Any]]  # (keyword, kind, value): printable, unlike a bad Dataset


@st.composite
def element_values(draw: st.DrawFn, depth: int) -> tuple[str, Any]:
    """(kind, value): raw bytes under any VR, a Python value of any type, or a sequence."""
    kind = draw(st.sampled_from(["raw", "raw", "py", "seq"] if depth < 2 else ["raw", "py"]))
    if kind == "raw":
        return "raw", (draw(st.sampled_from(VRS)), draw(raw_bytes))
    if kind == "py":
        return "py", draw(st.one_of(
            st.sampled_from(WORDS), st.text(max_size=12), st.integers(-(2**40), 2**40),
            st.floats(allow_nan=True, allow_infinity=True),
            st.lists(st.sampled_from(WORDS), max_size=3),
        ))
    return "seq", draw(st.lists(specs(depth + 1), max_size=3))


@st.composite
def specs(draw: st.DrawFn, depth: int = 0,
          keywords: tuple[str, ...] = tuple(TEXT_KEYWORDS + VIEW_KEYWORDS)) -> Spec:
    """A random subset of ``keywords`` (plus those of nested items) with random values."""
    inner = ("CodeValue", "CodeMeaning", "FrameAnatomySequence", "FrameLaterality",
             "ViewModifierCodeSequence") if depth else ()
    chosen = draw(st.lists(st.sampled_from(list(keywords) + list(inner)), max_size=8,
                           unique=True))
    return [(kw, *draw(element_values(depth))) for kw in chosen]


def make_dataset(spec: Spec) -> Dataset:
    """The dataset a spec describes; raw values stay unconverted until the code reads them."""
    ds = Dataset()
    for keyword, kind, value in spec:
        tag = Tag(tag_for_keyword(keyword))
        if kind == "raw":
            vr, data = value
            ds._dict[tag] = RawDataElement(tag, vr, len(data), data, 0, False, True)
        elif kind == "seq":
            ds.add_new(tag, "SQ", Sequence([make_dataset(item) for item in value]))
        else:
            try:
                setattr(ds, keyword, value)
            except Exception:  # noqa: BLE001 - pydicom refused the type: store it raw as text
                data = str(value).encode("utf-8", "replace")
                ds._dict[tag] = RawDataElement(tag, "UN", len(data), data, 0, False, True)
    return ds


odd = st.one_of(st.none(), st.sampled_from(WORDS), st.integers(), st.binary(max_size=4))
view_infos = st.builds(
    lambda lat, view, pres, src: SimpleNamespace(laterality=lat, view=view, for_presentation=pres,
                                                 source=src),
    odd, odd, st.one_of(st.booleans(), st.none()), st.text(max_size=5),
) | st.builds(ViewInfo, st.sampled_from(["L", "R", None]), st.sampled_from(
    sorted(VIEW_TERMS) + [None]), st.booleans(), st.just("fuzz"))


# --- 1. header -> text ----------------------------------------------------------------------------

VOCAB = set(template_vocabulary())


@FUZZ
@given(spec=specs(), view=view_infos)
def test_clinical_text_never_raises_and_stays_in_vocabulary(spec: Spec, view: Any) -> None:
    ds = make_dataset(spec)
    text = build_clinical_text(ds, view)
    assert text == build_clinical_text(ds, view), "not deterministic"
    assert text.startswith("exam: age ") and " breast: side " in text and " view: " in text
    tokens = re.findall(r"[^\s:.]+|[:.]", text)
    assert set(tokens) <= VOCAB, set(tokens) - VOCAB


# --- 2. view / side detector ----------------------------------------------------------------------


@FUZZ
@given(spec=specs(keywords=tuple(VIEW_KEYWORDS)))
def test_detect_view_never_raises_and_answers_in_range(spec: Spec) -> None:
    ds = make_dataset(spec)
    info = detect_view(ds)
    assert info.laterality in ("L", "R", None)
    assert info.view is None or info.view in VIEW_TERMS, info.view
    assert isinstance(info.for_presentation, bool)
    assert re.fullmatch(r"\w+\+\w+", info.source), info.source
    assert detect_view(ds) == info, "not deterministic"


@FUZZ
@given(spec=specs(keywords=tuple(VIEW_KEYWORDS)), side=st.sampled_from(["L", "R"]),
       view=st.sampled_from(sorted(VIEW_TERMS)))
def test_detect_view_precedence_holds_whatever_else_is_there(spec: Spec, side: str,
                                                              view: str) -> None:
    """A valid ViewPosition and ImageLaterality always decide, whatever the other attributes."""
    ds = make_dataset([item for item in spec if item[0] not in ("ViewPosition",
                                                               "ImageLaterality")])
    ds.ViewPosition = view
    ds.ImageLaterality = side
    info = detect_view(ds)
    assert (info.laterality, info.view) == (side, view)
    assert info.source == "ViewPosition+ImageLaterality"


# --- 3. dataset reader + the listener's header path + worker header/pixel path -------------------


@dataclass(repr=False)
class Seed:
    data: bytes
    meta_end: int  # mutations touch only the dataset: the listener writes the file meta itself
    sop_class: str
    sop_uid: str
    ts: str

    def __repr__(self) -> str:
        return f"Seed({self.sop_uid}, {self.ts}, {len(self.data)} bytes)"


def _seed(ds: Dataset, **kwargs: Any) -> Seed:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True, **kwargs)
    data = buf.getvalue()
    meta_end = 132 + 12 + int.from_bytes(data[140:144], "little")
    return Seed(data, meta_end, str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                str(ds.file_meta.TransferSyntaxUID))


@pytest.fixture(scope="module")
def seeds(demo_study: list[Path]) -> list[Seed]:
    """Headers of the real demo study with small pixel data, in three encodings."""
    real = pydicom.dcmread(demo_study[0], stop_before_pixels=True)
    small = synthetic_mg(str(real.StudyInstanceUID), str(real.SOPInstanceUID), "L", "CC",
                         rows=32, cols=24)
    real.file_meta.TransferSyntaxUID = small.file_meta.TransferSyntaxUID
    for kw in ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelData"):
        real[kw] = small[kw]
    real["PixelData"].VR = "OW"
    implicit = pydicom.dcmread(BytesIO(_seed(real).data))
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    coded = synthetic_mg("1.2.3.4", "1.2.3.4.5", None, None, rows=16, cols=16)
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "399368009", "SCT", "MLO"
    coded.ViewCodeSequence = [item]
    anatomy = Dataset()
    anatomy.FrameLaterality = "R"
    group = Dataset()
    group.FrameAnatomySequence = [anatomy]
    coded.SharedFunctionalGroupsSequence = [group]
    return [_seed(real), _seed(implicit), _seed(coded)]


@st.composite
def mutations(draw: st.DrawFn, seed_count: int) -> tuple[int, list[tuple[str, int, bytes]]]:
    """(seed index, edit list): overwrite, insert, delete, truncate at fractions of the length."""
    ops = st.tuples(st.sampled_from(["set", "insert", "delete", "truncate"]),
                    st.integers(0, 2**31), st.binary(min_size=1, max_size=8))
    return draw(st.integers(0, seed_count - 1)), draw(st.lists(ops, min_size=1, max_size=6))


def mutate(seed: Seed, edits: list[tuple[str, int, bytes]]) -> bytes:
    head, body = seed.data[: seed.meta_end], bytearray(seed.data[seed.meta_end:])
    for op, where, blob in edits:
        pos = where % (len(body) + 1)
        if op == "set":
            body[pos : pos + len(blob)] = blob
        elif op == "insert":
            body[pos:pos] = blob
        elif op == "delete":
            del body[pos : pos + len(blob) * 4]
        else:
            del body[pos:]
    return head + bytes(body)


@pytest.fixture(scope="module")
def listener(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Listener, list[Any]]]:
    """The real listener class, not started: its C-STORE handler is called with a fake event."""
    stored: list[Any] = []
    lst = Listener(tmp_path_factory.mktemp("fuzz-spool"), on_stored=stored.append,
                   on_refused=lambda msg, uid: None)
    lst.incoming.mkdir(parents=True, exist_ok=True)
    yield lst, stored


def fake_store_event(path: Path, seed: Seed) -> Any:
    """What pynetdicom hands the handler: the streamed file and the request's UIDs."""
    return SimpleNamespace(
        dataset_path=str(path),
        assoc=SimpleNamespace(requestor=SimpleNamespace(ae_title="FUZZ")),
        request=SimpleNamespace(AffectedSOPClassUID=seed.sop_class,
                                AffectedSOPInstanceUID=seed.sop_uid),
        context=SimpleNamespace(transfer_syntax=seed.ts),
    )


@FUZZ
@given(data=st.data())
def test_mutated_files_get_a_status_and_never_crash_the_node(
    data: st.DataObject, seeds: list[Seed], listener: tuple[Listener, list[Any]]
) -> None:
    lst, stored = listener
    index, edits = data.draw(mutations(len(seeds)))
    seed = seeds[index]
    tmp = lst.incoming / f"{uuid.uuid4().hex}.dcm"
    tmp.write_bytes(mutate(seed, edits))
    stored.clear()

    status = lst._handle_store(fake_store_event(tmp, seed))  # the listener's header path
    assert status in STATUSES, hex(status)
    if status != 0:
        tmp.unlink(missing_ok=True)
        return
    assert stored and stored[0].path.is_file()
    path = stored[0].path
    # The worker's header path: it reads headers with stop_before_pixels and skips unreadable
    # files itself; what it then calls must not raise.
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - the worker logs and skips such a file
        return
    info = detect_view(header)
    assert isinstance(build_clinical_text(header, info), str)
    try:
        full = pydicom.dcmread(path)
    except Exception:  # noqa: BLE001 - the worker reports the view as failed
        return
    try:
        arr = decode_pixels(full, max_pixels=2_000_000)
    except PixelDecodeError as exc:
        assert str(exc)
    else:
        assert arr.dtype == np.float32 and arr.ndim == 2


def test_unknown_vr_is_refused_not_raised(seeds: list[Seed],
                                          listener: tuple[Listener, list[Any]]) -> None:
    """Found by the reader fuzz: a header element whose VR bytes are not a VR."""
    lst, _ = listener
    seed = seeds[0]
    data = bytearray(seed.data)
    pos = data.index(b"\x08\x00\x18\x00UI", seed.meta_end)  # SOP Instance UID element
    data[pos + 4 : pos + 6] = b"U\x00"
    tmp = lst.incoming / "unknown-vr.dcm"
    tmp.write_bytes(bytes(data))
    assert lst._handle_store(fake_store_event(tmp, seed)) == 0xC000
