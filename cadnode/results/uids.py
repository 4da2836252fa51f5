"""Deterministic UIDs for result objects: the same content gets the same UID, new content a new one.

- Series Instance UID: a pure function of (UID root, study UID, model version, object kind), so
  every version of, say, the CAD SR of a study lands in one series.
- SOP Instance UID: a function of the same parts plus :meth:`StudyFindings.content_key`, the
  digest of what the object says (the images read and passed over, missing views, rounded
  scores, failures, thresholds, model and cadnode version), and of the UID of the version it
  replaces. Re-processing to the same content as the previous version keeps that version's
  UID, so re-delivery is idempotent; any other content gets a UID never used before (also when
  it equals an older version's: A, B, then A again gives three UIDs), as PS3.3 C.12.1.1.1
  requires (a PACS keeps the first copy of a UID it has seen, so reusing one would leave a
  stale object in place).
- A new version records the one it replaces (``StudyFindings.previous``): its Instance Number
  is one higher and the SRs name it in the Predecessor Documents Sequence.

Default root: ``2.25`` (ISO/IEC 9834-8 / PS3.5 B.2, "UUID-derived UID"). Under that root the
component is the decimal integer of a name-based UUID (``uuid.uuid5``) of the parts, which is
a valid, registration-free UID. Under any other (organisation) root the component is the
decimal of a SHA-256 of the parts, truncated so that the whole UID fits in 64 characters.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass

from cadnode.results.findings import ObjectVersion, StudyFindings
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


#: The name a kind had in UIDs before result kinds became an enum; kept so that the series of
#: an upgraded node's results stay where they were.
_UID_NAMES = {"cad_sr": "cad-sr"}


def result_series_uid(root: str, study_uid: str, model_version: str, kind: str) -> str:
    """Series Instance UID of result object ``kind`` for a study and model version."""
    return derive_uid(root, "series", study_uid, model_version, _UID_NAMES.get(kind, kind))


def result_instance_uid(
    root: str, study_uid: str, model_version: str, kind: str, content_key: str,
    replaces: str = "",
) -> str:
    """SOP Instance UID of result object ``kind`` with the content ``content_key``, replacing
    the version with SOP Instance UID ``replaces`` ("" for a first version)."""
    return derive_uid(root, "instance", study_uid, model_version, _UID_NAMES.get(kind, kind),
                      content_key, replaces)


@dataclass(frozen=True)
class ObjectIdentity:
    """Where a result object files, and which earlier version it replaces."""

    series_uid: str
    sop_instance_uid: str
    instance_number: int
    predecessor: ObjectVersion | None  # None for a first version
    content_key: str

    def version(self, sop_class_uid: str) -> ObjectVersion:
        """What the job record keeps of this object, for the next version to replace."""
        return ObjectVersion(self.sop_instance_uid, self.series_uid, sop_class_uid,
                             self.instance_number, self.predecessor, self.content_key)


def result_identity(root: str, findings: StudyFindings, kind: str) -> ObjectIdentity:
    """UIDs, Instance Number and predecessor of result object ``kind`` for ``findings``.

    The same content as the previous version keeps that version's identity whole (UID, number
    and predecessor), so a re-built object is the object already sent under that UID (only its
    creation date and time differ).
    """
    series = result_series_uid(root, findings.study_uid, findings.model_version, kind)
    key = findings.content_key()
    prev = findings.previous.get(kind)
    if prev is not None and prev.content_key == key:
        return ObjectIdentity(series, prev.sop_instance_uid, prev.instance_number,
                              prev.predecessor, key)
    sop = result_instance_uid(root, findings.study_uid, findings.model_version, kind, key,
                              prev.sop_instance_uid if prev is not None else "")
    number = 1 if prev is None else prev.instance_number + 1
    return ObjectIdentity(series, sop, number, prev, key)


def tracking_uid(root: str, study_uid: str, model_version: str, label: str) -> str:
    """Tracking UID of a finding (``label`` like "R-CC cancer suspicion"): stable across
    re-processing, and shared by the objects that show the same finding (TID 1500, GSPS)."""
    return derive_uid(root, "tracking", study_uid, model_version, label)
