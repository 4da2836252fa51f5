"""UID syntax (PS3.5 9.1), one definition for settings, the spool and the result objects."""

from __future__ import annotations

import re

UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def is_valid_uid(value: object) -> bool:
    """Digits and dots, no empty or leading-zero components, at most 64 characters."""
    return isinstance(value, str) and len(value) <= 64 and bool(UID_RE.match(value))
