"""Durable files: a received instance is fsync'd and renamed into place before anyone is told.

Spool paths are built only from checked UIDs, never from a peer's raw string, so a SOP Instance
UID such as ``../../etc`` can never leave the spool.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from cadnode.dicom.views import ViewInfo

UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")


class SpoolError(ValueError):
    """The instance cannot be spooled (for example its UIDs are not valid)."""


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


def is_valid_uid(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 64 and bool(UID_RE.match(value))


def spool_path(root: Path, study_uid: str, sop_instance_uid: str) -> Path:
    """Where an instance lives: ``root/<study uid>/<sop instance uid>.dcm``."""
    for name, uid in (("Study Instance UID", study_uid), ("SOP Instance UID", sop_instance_uid)):
        if not is_valid_uid(uid):
            raise SpoolError(f"{name} {uid!r} is not a valid UID")
    return root / study_uid / f"{sop_instance_uid}.dcm"


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_file(tmp: Path, final: Path) -> None:
    """Make ``tmp`` durable under the name ``final`` (atomic rename, both fsync'd)."""
    fsync_path(tmp)
    final.parent.mkdir(parents=True, exist_ok=True)
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
