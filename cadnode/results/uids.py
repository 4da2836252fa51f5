"""Deterministic UIDs for result objects.

A result's Series and SOP Instance UIDs are a pure function of (UID root, study UID, model
version, object kind), so re-processing a study with the same model produces the same UIDs and
the PACS replaces the earlier objects instead of accumulating duplicates. A new model version
gives new UIDs, so results of different models never overwrite each other.

Default root: ``2.25`` (ISO/IEC 9834-8 / PS3.5 B.2, "UUID-derived UID"). Under that root the
component is the decimal integer of a name-based UUID (``uuid.uuid5``) of the parts, which is
a valid, registration-free UID. Under any other (organisation) root the component is the
decimal of a SHA-256 of the parts, truncated so that the whole UID fits in 64 characters.
"""

from __future__ import annotations

import hashlib
import uuid

from cadnode.results.findings import StudyFindings
from cadnode.uid import is_valid_uid

DEFAULT_UID_ROOT = "2.25"

_NAMESPACE = uuid.UUID("6f0e2d7c-5b1a-4c3e-9d8f-1a2b3c4d5e6f")  # cadnode's fixed namespace
_SEP = "\x1f"  # unit separator: ("a.b", "c") and ("a", "b.c") must not collide
_MIN_DIGITS = 20  # below ~66 bits collisions between studies become plausible



def derive_uid(root: str, *parts: str) -> str:
    """Return ``root.<decimal>`` derived from ``parts``; the same parts give the same UID."""
    root = root.rstrip(".")
    if not is_valid_uid(root):
        raise ValueError(f"invalid UID root {root!r}")
    key = _SEP.join(parts)
    if root == "2.25":
        component = str(uuid.uuid5(_NAMESPACE, key).int)
    else:
        room = 64 - len(root) - 1
        if room < _MIN_DIGITS:
            raise ValueError(f"UID root {root!r} too long: leaves {room} digits (< {_MIN_DIGITS})")
        digest = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest(), "big")
        component = str(digest)[:room]  # a prefix of a decimal never starts with 0 (unless "0")
    uid = f"{root}.{component}"
    assert is_valid_uid(uid), uid
    return uid


def result_series_uid(root: str, study_uid: str, model_version: str, kind: str) -> str:
    """Series Instance UID of result object ``kind`` ("cad-sr", "sc", ...) for a study."""
    return derive_uid(root, "series", study_uid, model_version, kind)


def result_instance_uid(
    root: str, study_uid: str, model_version: str, kind: str, index: int = 1
) -> str:
    """SOP Instance UID of result object ``kind`` (``index`` for several objects of a kind)."""
    return derive_uid(root, "instance", study_uid, model_version, kind, str(index))


def result_uids(root: str, findings: StudyFindings, kind: str) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of the single result object ``kind``."""
    return (result_series_uid(root, findings.study_uid, findings.model_version, kind),
            result_instance_uid(root, findings.study_uid, findings.model_version, kind))


def tracking_uid(root: str, study_uid: str, model_version: str, label: str) -> str:
    """Tracking UID of a finding (``label`` like "R-CC cancer suspicion"): stable across
    re-processing, and shared by the objects that show the same finding (TID 1500, GSPS)."""
    return derive_uid(root, "tracking", study_uid, model_version, label)
