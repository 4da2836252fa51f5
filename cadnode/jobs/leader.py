"""Leadership: the duties that must run in one process at a time, whichever holds a lock.

Several ``cadnode listen`` and ``cadnode worker`` processes share one job database. Most of
their work is claimed row by row (jobs with SKIP LOCKED), but two duties are periodic sweeps
that one process should run: the **assembler** (grouping received images into studies and
queuing their jobs, and retention) and the **sender** (the outbox, and putting back jobs whose
lease expired). Each is led by whichever process holds its lock:

- PostgreSQL: a session-level advisory lock (``pg_try_advisory_lock``) on a connection the
  leader keeps for that purpose. When the leader dies its session ends and the server drops the
  lock at once; when its connection is cut (a server restart, ``pg_terminate_backend``) the next
  :meth:`Leadership.poll` notices, steps down and tries again on a new connection.
- SQLite (one machine): an exclusive ``flock`` on a file beside the database, which the kernel
  drops when the process dies.

Every process polls each lock it competes for (``LEAD_POLL_SECONDS``), so a follower takes over
within about one poll of the leader's death. Between a cut connection and the leader's next
poll, both may run a duty once: assembling is a transaction that re-checks its rows, and a
result sent twice is the same SOP instance, which a PACS stores once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
from enum import StrEnum
from typing import IO, Any

from sqlalchemy import text

from cadnode.jobs.db import Database, sqlite_file

log = logging.getLogger(__name__)

#: Seconds between two polls of a lock: how soon a follower takes over.
LEAD_POLL_SECONDS = 1.0


class Duty(StrEnum):
    """The duties one process at a time leads."""

    ASSEMBLER = "assembler"  # assemble studies, retention
    SENDER = "sender"  # the outbox, expired leases


def lock_key(duty: str) -> int:
    """The advisory-lock key of a duty: a signed 64-bit number derived from its name."""
    digest = hashlib.sha256(f"cadnode:{duty}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class Leadership:
    """One duty's lock, as this process sees it; :meth:`poll` keeps it up to date."""

    def __init__(self, db: Database, duty: Duty) -> None:
        self.db, self.duty = db, duty
        self.held = False
        self._conn: Any = None  # PostgreSQL: the connection that holds the lock
        self._file: IO[str] | None = None  # SQLite: the locked file

    def poll(self) -> bool:
        """Verify the lock when held (step down if it was lost), else try to take it;
        returns whether this process leads now. Never raises: a database that cannot be
        reached means not leading."""
        was = self.held
        try:
            self.held = self._verify() if self.held else self._acquire()
        except Exception as exc:  # the server is down or the connection was cut
            log.debug("leadership of %s: %s", self.duty, exc)
            self._drop()
            self.held = False
        if self.held != was:
            self._announce()
        return self.held

    def release(self) -> None:
        """Give the lock up (at shutdown), so that a follower takes over without waiting."""
        if self.held and self._conn is not None:
            # unlocked explicitly: the server frees the lock of a closed connection only once
            # its backend has exited, a moment later
            with contextlib.suppress(Exception):
                self._conn.execute(text("SELECT pg_advisory_unlock(:k)"),
                                   {"k": lock_key(self.duty)})
        self._drop()
        if self.held:
            self.held = False
            self._announce()

    # --- the two engines ---------------------------------------------------------------------

    def _acquire(self) -> bool:
        if self.db.is_sqlite:
            return self._acquire_file()
        if self._conn is None:
            self._conn = self.db.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        got = self._conn.execute(text("SELECT pg_try_advisory_lock(:k)"),
                                 {"k": lock_key(self.duty)}).scalar()
        return bool(got)

    def _verify(self) -> bool:
        if self.db.is_sqlite:
            return self._file is not None
        self._conn.execute(text("SELECT 1"))  # a session lock lives as long as its session
        return True

    def _acquire_file(self) -> bool:
        path = sqlite_file(self.db.url)
        if path is None:  # an in-memory database belongs to this process alone
            return True
        if self._file is None:
            self._file = open(path.with_name(f"{path.name}.{self.duty}.lock"), "a")  # noqa: SIM115
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.invalidate()  # a cut connection must not go back to the pool
                self._conn.close()
            self._conn = None
        if self._file is not None:
            self._file.close()  # closing the file drops its flock
            self._file = None

    def _announce(self) -> None:
        message = (f"process {os.getpid()} leads the {self.duty}" if self.held
                   else f"process {os.getpid()} no longer leads the {self.duty}")
        log.info("%s", message)
        with contextlib.suppress(Exception):  # the database may be why it stepped down
            self.db.log("leader", message)


def holder(db: Database, duty: Duty) -> str | None:
    """Which process leads ``duty`` now, as it names itself (``cadnode:<host>:<pid>``), from
    the server's lock table; None when no one does, or on SQLite (a lock file says nothing)."""
    if db.is_sqlite:
        return None
    key = lock_key(duty) & 0xFFFFFFFFFFFFFFFF  # pg_locks shows the key as two unsigned halves
    with db.engine.connect() as conn:
        name = conn.execute(text(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
            "AND l.classid = :hi AND l.objid = :lo AND l.database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())"),
            {"hi": key >> 32, "lo": key & 0xFFFFFFFF}).scalar()
    return str(name) if name is not None else None


def polled(leaders: list[Leadership]) -> None:
    """Poll each lock (a scheduler job)."""
    for lead in leaders:
        lead.poll()
