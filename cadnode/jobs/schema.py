"""The job database's schema version: Alembic migrations, checked by every process at start.

``cadnode db upgrade`` (:func:`upgrade`) runs the migrations in ``cadnode/jobs/migrations``, the
same on SQLite and PostgreSQL, under a lock so that two processes never migrate at once. A node
starts only against the schema it was written for (:func:`check`): an empty database is made
(there is nothing to migrate), an older or newer one is refused with what to run.

Databases made before migrations existed (``create_all``, ``cadnode_meta.schema_version`` 1-3)
are brought to the baseline revision's columns and stamped with it, never re-created.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text

from cadnode.jobs.db import Database, sqlite_file

MIGRATIONS = Path(__file__).with_name("migrations")
#: The revision that is the schema ``create_all`` made up to cadnode_meta.schema_version 3.
BASELINE = "0003"
#: Columns versions before 3 lacked: (table, column, SQL type), added before stamping.
_LEGACY_COLUMNS = (
    ("instances", "modifiers", "VARCHAR(255)"),
    ("instances", "acquired", "VARCHAR(26)"),
    ("studies", "study_date", "VARCHAR(8)"),
)
#: Session advisory-lock key that serialises migrations on PostgreSQL ("cadnode" as an int).
_PG_MIGRATION_LOCK = 0x6361646E6F6465


class SchemaMismatch(RuntimeError):
    """The database's schema is not the one this cadnode was written for."""


@dataclass(frozen=True)
class SchemaState:
    current: str | None  # the Alembic revision; None: empty, or made before migrations
    head: str  # this cadnode's
    legacy_version: int | None  # cadnode_meta.schema_version of a database before migrations
    empty: bool  # no cadnode table at all

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head


def head() -> str:
    """This cadnode's schema revision."""
    revision = _scripts().get_current_head()
    assert revision is not None
    return revision


def state(db: Database) -> SchemaState:
    with db.engine.connect() as conn:
        tables = set(inspect(conn).get_table_names())
        current = MigrationContext.configure(conn).get_current_revision()
        legacy = (_legacy_version(conn) if current is None and "cadnode_meta" in tables
                  else None)
    cadnode_tables = tables & {"cadnode_meta", "studies", "jobs", "alembic_version"}
    return SchemaState(current, head(), legacy, empty=not cadnode_tables)


def known(revision: str) -> bool:
    """Whether ``revision`` is one of this cadnode's migrations (else: a newer cadnode's)."""
    try:
        return _scripts().get_revision(revision) is not None
    except Exception:
        return False


def upgrade(db: Database) -> tuple[str | None, str]:
    """Migrate to this cadnode's head; returns (revision before, after). A database a newer
    cadnode migrated is refused (its revisions are unknown here)."""
    with _migration_lock(db), db.engine.connect() as conn:
        before = MigrationContext.configure(conn).get_current_revision()
        if before is not None and not known(before):
            raise SchemaMismatch(_newer(before))
        tables = set(inspect(conn).get_table_names())
        config = _config(conn)
        if before is None and "cadnode_meta" in tables:  # made before migrations
            _add_legacy_columns(conn)
            command.stamp(config, BASELINE)
            before = f"legacy-{_legacy_version(conn)}"
        command.upgrade(config, "head")
        conn.commit()
    return before, head()


def check(db: Database, create: bool = True) -> SchemaState:
    """Refuse (SchemaMismatch) a database whose schema is not this cadnode's; with ``create``
    an empty one is made first. The message says what to run."""
    st = state(db)
    if st.empty and create:
        upgrade(db)
        return state(db)
    if st.up_to_date:
        return st
    if st.empty:
        raise SchemaMismatch("the job database has no cadnode schema yet: run "
                             "`cadnode db upgrade` (or start `cadnode serve`, which makes it)")
    if st.current is not None and not known(st.current):
        raise SchemaMismatch(_newer(st.current))
    was = (f"schema {st.current}" if st.current
           else f"the pre-migration schema version {st.legacy_version}")
    raise SchemaMismatch(f"the job database is at {was}, this cadnode needs schema {st.head}: "
                         "run `cadnode db upgrade` (once, with every node of this version "
                         "stopped or not yet started)")


def _newer(revision: str) -> str:
    return (f"the job database is at schema {revision}, which a newer cadnode made (this one "
            f"knows up to {head()}): upgrade cadnode on this machine")


def _scripts() -> ScriptDirectory:
    return ScriptDirectory(str(MIGRATIONS))


def _config(conn: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = conn
    return config


def _legacy_version(conn: Connection) -> int:
    """cadnode_meta.schema_version, as the releases before migrations kept it (0: none)."""
    value = conn.execute(text("SELECT value FROM cadnode_meta WHERE key = 'schema_version'"))
    raw = value.scalar()
    return int(raw) if raw is not None else 0


def _add_legacy_columns(conn: Connection) -> None:
    for table, column, sql_type in _LEGACY_COLUMNS:
        columns = {c["name"] for c in inspect(conn).get_columns(table)}
        if column not in columns:
            conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {sql_type} "
                              "NOT NULL DEFAULT ''"))


@contextlib.contextmanager
def _migration_lock(db: Database) -> Iterator[None]:
    """One migrating process at a time: a PostgreSQL advisory lock, or a lock file beside a
    SQLite database (SQLite's own write lock does not cover Alembic's several statements)."""
    if db.is_sqlite:
        path = sqlite_file(db.url)
        if path is None:
            yield
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".migrate-lock"), "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
        return
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_MIGRATION_LOCK})
