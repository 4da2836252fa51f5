"""Durable files: a received instance is fsync'd and renamed into place before anyone is told.

Spool paths are built only from checked UIDs, never from a peer's raw string, so a SOP Instance
UID such as ``../../etc`` can never leave the spool.
"""

from __future__ import annotations

import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.filereader import _read_file_meta_info, read_dataset
from pydicom.uid import UID

from cadnode.dicom.views import ViewInfo
from cadnode.uid import is_valid_uid


class SpoolError(ValueError):
    """The instance cannot be spooled (for example its UIDs are not valid)."""


class StoreUnavailable(RuntimeError):
    """``on_stored`` could not record the instance for a reason that may pass (the database is
    down or busy): the sender should try again later (0xA700)."""


class InstanceConflict(ValueError):
    """``on_stored`` refuses an instance that contradicts one already stored (0xA900)."""


@dataclass(frozen=True)
class StoredInstance:
    """What the listener hands on once an instance is safely on disk."""

    path: Path
    size: int
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    study_uid: str
    series_uid: str
    patient_id: str
    accession: str
    calling_ae: str
    view: ViewInfo
    acquired: str = ""  # cadnode.dicom.selection.acquisition_datetime of the header
    study_date: str = ""  # the header's Study Date (DA, YYYYMMDD) when it is a valid one


def study_date(ds: Any) -> str:
    """The header's Study Date as ``YYYYMMDD``, or "" when absent or not a valid date (a
    malformed value never stops an instance from being stored)."""
    try:
        value = str(ds.get("StudyDate", "") or "").strip()
    except Exception:  # whatever pydicom raises on a damaged element
        return ""
    return value if len(value) == 8 and value.isascii() and value.isdigit() else ""


#: Sequences nested deeper than this are refused at the listener (real headers nest 3 or 4).
MAX_NESTING = 16


def nesting_depth(ds: Any, limit: int = MAX_NESTING) -> int:
    """How deeply sequences nest in ``ds`` (0: none), counted without recursion and stopping
    once past ``limit``."""
    deepest = 0
    todo = [(ds, 0)]
    while todo:
        item, depth = todo.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            break
        for elem in item:
            if elem.VR == "SQ":
                todo.extend((child, depth + 1) for child in elem.value)
    return deepest


def spool_path(root: Path, study_uid: str, sop_instance_uid: str) -> Path:
    """Where an instance lives: ``root/<study uid>/<sop instance uid>.dcm``."""
    for name, uid in (("Study Instance UID", study_uid), ("SOP Instance UID", sop_instance_uid)):
        if not is_valid_uid(uid) or "." not in uid:  # a real UID has a root and a suffix
            raise SpoolError(f"{name} {uid!r} is not a valid UID")
    return root / study_uid / f"{sop_instance_uid}.dcm"


PIXEL_DATA = 0x7FE00010
_ITEM, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE0DD
_DEFLATED = "1.2.840.10008.1.2.1.99"


def check_pixel_data_complete(path: Path) -> None:
    """Raise SpoolError when the file ends inside its Pixel Data element.

    A sender can push a truncated file; reading the header alone would not notice. This walks
    the element (and the fragments of encapsulated data) by their lengths, reading only a few
    bytes, so the check costs nothing next to the receive.
    """
    size = path.stat().st_size
    with open(path, "rb") as fp:
        fp.seek(128)
        if fp.read(4) != b"DICM":
            return  # no file meta: nothing more to check than what the header read did
        meta = _read_file_meta_info(fp)
        ts = UID(str(meta.get("TransferSyntaxUID", "")))
        if str(ts) == _DEFLATED or not ts.is_transfer_syntax:
            return
        def stop_at_pixel_data(tag: Any, vr: Any, length: Any) -> bool:
            """Every element before the Pixel Data (private ones too) must fit in the file."""
            if int(tag) == PIXEL_DATA:
                return True
            if length not in (None, 0xFFFFFFFF) and fp.tell() + int(length) > size:
                raise SpoolError(f"file truncated: element {tag} needs {length} bytes, "
                                 f"{size - fp.tell()} present")
            return False

        read_dataset(fp, ts.is_implicit_VR, ts.is_little_endian, stop_when=stop_at_pixel_data)
        start = fp.tell()
        endian = "<" if ts.is_little_endian else ">"
        head = fp.read(8)
        if len(head) < 8:
            if head:
                raise SpoolError("file truncated inside the Pixel Data element header")
            return  # no pixel data at all: the worker reports that view as failed
        if ts.is_implicit_VR:
            length = struct.unpack(endian + "L", head[4:8])[0]
        elif head[4:6] in (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"UT", b"SQ"):
            extra = fp.read(4)
            if len(extra) < 4:
                raise SpoolError("file truncated inside the Pixel Data element header")
            length = struct.unpack(endian + "L", extra)[0]
        else:
            length = struct.unpack(endian + "H", head[6:8])[0]
        if length != 0xFFFFFFFF:
            if fp.tell() + length > size:
                raise SpoolError(f"file truncated: Pixel Data needs {length} bytes, "
                                 f"{size - fp.tell()} present")
            return
        while True:  # encapsulated: items until the sequence delimiter
            item = fp.read(8)
            if len(item) < 8:
                raise SpoolError(f"file truncated inside encapsulated Pixel Data "
                                 f"(at byte {fp.tell()} of {size}, from {start})")
            group, elem, item_len = struct.unpack(endian + "HHL", item)
            tag = (group << 16) | elem
            if tag == _SEQUENCE_END:
                return
            if tag != _ITEM or fp.tell() + item_len > size:
                raise SpoolError("file truncated inside encapsulated Pixel Data")
            fp.seek(item_len, 1)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_file(tmp: Path, final: Path) -> None:
    """Make ``tmp`` durable under the name ``final`` (atomic rename, both fsync'd).

    The study folder must be a real folder inside the spool: a symbolic link planted there
    (by anyone with local write access) would take acknowledged data out of the spool, so it
    is refused rather than followed."""
    fsync_path(tmp)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.parent.is_symlink() or final.is_symlink():
        raise SpoolError(f"{final.parent} is a symbolic link; the spool does not follow links")
    os.replace(tmp, final)
    fsync_path(final.parent)


def write_durably(data: bytes, final: Path) -> None:
    """Write bytes so that a crash leaves either the old file or the whole new one."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    fsync_path(final.parent)


def nearest_existing(path: Path) -> Path:
    """``path``, or its closest parent that exists (where a folder still to be made lives)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(folder: Path) -> float | None:
    """Free bytes on the file system that holds (or will hold) ``folder``; None when it
    cannot be asked."""
    try:
        return float(shutil.disk_usage(nearest_existing(folder)).free)
    except OSError:
        return None
