"""The job database: studies, instances, jobs, the delivery outbox and an event log.

SQLite (WAL) by default, PostgreSQL when several processes share the work. Times are stored as
UNIX seconds (float) so that comparisons behave the same on both engines.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from sqlalchemy import (
    Boolean,
    Engine,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
    make_url,
    select,
)
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from cadnode.jobs.enum import DeliveryState, JobState, StudyState

_log = logging.getLogger(__name__)

#: Tries of an outcome's transaction when the connection is lost (a server restart, a
#: terminated backend): the work done must not be thrown away for a dropped connection.
RECONNECT_TRIES = 6

_T = TypeVar("_T")


def reconnecting(fn: Callable[..., _T]) -> Callable[..., _T]:
    """Run ``fn`` (one short transaction) again on a new connection when the connection was
    lost, waiting 0.1, 0.2, 0.4 ... s; other errors, and the last loss, propagate. Only for
    transactions that are safe to repeat: they re-read and re-check the rows they change."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> _T:
        for attempt in range(RECONNECT_TRIES):
            try:
                return fn(*args, **kwargs)
            except (OperationalError, InterfaceError) as exc:
                if attempt == RECONNECT_TRIES - 1:
                    raise
                _log.warning("%s: the job database connection was lost (%s); trying again",
                            fn.__name__, str(exc.orig or exc).splitlines()[0])
                time.sleep(0.1 * 2**attempt)
        raise AssertionError("unreachable")

    return run


def process_name() -> str:
    """``cadnode:<host>:<pid>``: how this process names itself to the database server."""
    return f"cadnode:{socket.gethostname()}:{os.getpid()}"[:63]


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    accession: Mapped[str] = mapped_column(String(16), default="")
    study_date: Mapped[str] = mapped_column(String(8), default="")  # DICOM DA, YYYYMMDD
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    first_received: Mapped[float] = mapped_column(Float)
    last_received: Mapped[float] = mapped_column(Float, index=True)
    state: Mapped[str] = mapped_column(String(16), default=StudyState.RECEIVING, index=True)


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_uid: Mapped[str] = mapped_column(String(64), default="")
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(Integer, default=0)
    laterality: Mapped[str | None] = mapped_column(String(1), nullable=True)
    view: Mapped[str | None] = mapped_column(String(16), nullable=True)
    for_presentation: Mapped[bool] = mapped_column(Boolean, default=True)
    modifiers: Mapped[str] = mapped_column(String(255), default="")  # "+"-joined ViewModifier
    acquired: Mapped[str] = mapped_column(String(26), default="")  # acquisition_datetime()
    received_at: Mapped[float] = mapped_column(Float)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED, index=True)
    reason: Mapped[str] = mapped_column(String(32), default="")  # JobReason
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    scores_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    views: Mapped[str] = mapped_column(String(64), default="")  # e.g. "L-CC,L-MLO,R-CC,R-MLO"
    model_version: Mapped[str] = mapped_column(String(64), default="")
    error: Mapped[str | None] = mapped_column(Text, nullable=True)

    @property
    def scores(self) -> dict[str, Any] | None:
        return json.loads(self.scores_json) if self.scores_json else None


class Delivery(Base):
    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))  # ResultKind
    path: Mapped[str] = mapped_column(Text)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=DeliveryState.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt: Mapped[float] = mapped_column(Float, index=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    sent_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Event(Base):
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    level: Mapped[str] = mapped_column(String(8), default="info")
    kind: Mapped[str] = mapped_column(String(32))
    study_uid: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    message: Mapped[str] = mapped_column(Text, default="")


class Meta(Base):
    __tablename__ = "cadnode_meta"

    key: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Database:
    """An engine plus a session factory; one per process.

    With ``home``, file paths under it are stored relative to it (:meth:`stored_path`) and
    resolved against it when read (:meth:`file_path`), so that the home can be moved or
    mounted elsewhere; other paths, and those of databases made without a home, are absolute.
    """

    def __init__(self, url: str, home: Path | None = None, read_only: bool = False) -> None:
        self.url = url
        self.home = home
        self.read_only = read_only
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {"future": True}
        if self.is_sqlite:
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        else:
            kwargs["pool_pre_ping"] = True
            # pg_stat_activity (and cadnode.jobs.leader.holder) name the process each
            # connection belongs to
            kwargs["connect_args"] = {"application_name": process_name()}
            if read_only:  # every transaction of this engine is READ ONLY
                kwargs["connect_args"]["options"] = "-c default_transaction_read_only=on"
        engine_url = sqlite_read_only_url(url) if self.is_sqlite and read_only else url
        self.engine: Engine = create_engine(engine_url, **kwargs)
        if self.is_sqlite and read_only:
            # mode=ro opens the file without creating it; no write lock is ever taken
            event.listen(self.engine, "connect", _sqlite_read_only_pragmas)
            event.listen(self.engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN"))
        elif self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
            # Take the write lock at BEGIN so concurrent writers queue instead of failing.
            event.listen(self.engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def create_schema(self) -> None:
        """Bring the schema to this cadnode's revision (made when empty): what ``cadnode db
        upgrade`` does; tests and the demo use it directly."""
        from cadnode.jobs.schema import upgrade

        upgrade(self)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed on success, rolled back on error."""
        with self._sessions() as s, s.begin():
            yield s

    @reconnecting
    def log(
        self, kind: str, message: str, study_uid: str | None = None, level: str = "info"
    ) -> None:
        with self.session() as s:
            add_event(s, kind, message, study_uid, level)

    def dispose(self) -> None:
        self.engine.dispose()

    def stored_path(self, path: str | Path) -> str:
        """How ``path`` is written in the database."""
        full = Path(path)
        if self.home is not None and full.is_absolute() and full.is_relative_to(self.home):
            return full.relative_to(self.home).as_posix()
        return str(full)

    def file_path(self, stored: str) -> Path:
        """The file a path read from the database names.

        Versions before paths were stored relative to the home wrote them relative to the
        node's working directory, with the home's own relative name in front (``var/spool/
        ...`` for the old default home ``var``): such a path is found under the first parent
        of the home it exists in."""
        path = Path(stored)
        if path.is_absolute() or self.home is None:
            return path
        under_home = self.home / path
        if not under_home.exists():
            for parent in self.home.parents:
                if (parent / path).exists():
                    return parent / path
        return under_home


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # let SQLAlchemy's BEGIN IMMEDIATE drive transactions
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _sqlite_read_only_pragmas(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA query_only=ON")
    cur.close()


def sqlite_file(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL (None for an in-memory database)."""
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def sqlite_read_only_url(url: str) -> str:
    """The same SQLite file opened read-only (``mode=ro``: never created, never written)."""
    path = sqlite_file(url)
    if path is None:
        return url
    return f"sqlite:///file:{quote(str(path.absolute()))}?mode=ro&uri=true"


def add_event(
    s: Session, kind: str, message: str, study_uid: str | None = None, level: str = "info"
) -> None:
    s.add(Event(at=time.time(), kind=kind, message=message, study_uid=study_uid, level=level))


def latest_job(s: Session, study_id: int) -> Job | None:
    return s.scalars(
        select(Job).where(Job.study_id == study_id).order_by(Job.id.desc()).limit(1)
    ).first()
