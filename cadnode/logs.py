"""Log records that carry the study and job they are about, as text or as JSON lines.

The worker wraps each job in :func:`log_context`; every record logged in that thread meanwhile
(by cadnode or by a library) gets ``study_uid`` and ``job_id`` attributes, which both formats
print. A call may also pass them itself: ``log.info(..., extra={"study_uid": uid})``. Nothing
here is process-wide beyond the handlers that ``cadnode.cli.common.setup_logging`` installs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

#: The ids that records may carry, in the order they are printed.
FIELDS = ("study_uid", "job_id")

_context: ContextVar[dict[str, Any]] = ContextVar("cadnode_log_context", default={})  # noqa: B039


@contextmanager
def log_context(**ids: Any) -> Iterator[None]:
    """Records logged in this thread (or task) inside the block carry ``ids``
    (``study_uid=..., job_id=...``; None values are left out)."""
    token = _context.set({**_context.get(), **{k: v for k, v in ids.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


class ContextFilter(logging.Filter):
    """Puts the ids of the current :func:`log_context` on every record (on a handler, so that
    records of every logger get them); ids a call passed itself win."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            if getattr(record, key, None) is None:
                setattr(record, key, value)
        return True


def _ids(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k in FIELDS if (v := getattr(record, k, None)) is not None}


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message [study=... job=...]`` (an id the message already names is
    not repeated)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        message = record.getMessage()
        ids = [f"{'study' if k == 'study_uid' else 'job'}={v}" for k, v in _ids(record).items()
               if not (k == "study_uid" and str(v) in message)]
        if not ids:
            return text
        first, newline, rest = text.partition("\n")  # after the message, before a traceback
        return f"{first} [{' '.join(ids)}]{newline}{rest}"


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (ISO 8601, UTC), level, logger, message, study_uid and
    job_id when known, exception (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_ids(record),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exception"] = record.exc_text
        return json.dumps(doc, ensure_ascii=False, default=str)


def formatter(log_format: str) -> logging.Formatter:
    """The formatter for a ``CADNODE_LOG_FORMAT`` value (``text`` or ``json``)."""
    return JsonFormatter() if log_format == "json" else TextFormatter()
