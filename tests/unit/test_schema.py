"""Schema migrations (Alembic) on SQLite and the PostgreSQL server: a fresh database, one made
by the release before migrations, a newer one, and two processes migrating at once."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text

from cadnode.jobs import queue, schema
from cadnode.jobs.db import Base, Database, Study
from tests.conftest import REPO
from tests.helpers import empty_database
from tests.unit.test_admin import A, stored

DATA = REPO / "tests" / "data"


@pytest.fixture(params=["sqlite", "postgresql"])
def empty(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """An empty database on each engine (no table at all)."""
    if request.param == "sqlite":
        db = Database(f"sqlite:///{tmp_path / 'cadnode.db'}", home=tmp_path)
    else:
        db = Database(request.getfixturevalue("pg_url"), home=tmp_path)
        empty_database(db)
    yield db
    db.dispose()


def _release_database(db: Database, version: int = 3) -> None:
    """A job database as the release before migrations made it (its frozen DDL), holding a
    study; ``version`` 1 drops the columns versions 1 and 2 lacked."""
    sql = (DATA / f"schema3.{db.engine.dialect.name}.sql").read_text()
    code = "\n".join(line for line in sql.splitlines() if not line.startswith("--"))
    with db.engine.begin() as conn:
        for statement in filter(str.strip, code.split(";\n")):
            conn.exec_driver_sql(statement)
        if version < 3:
            for table, column in (("instances", "modifiers"), ("instances", "acquired"),
                                  ("studies", "study_date")):
                conn.exec_driver_sql(f"ALTER TABLE {table} DROP COLUMN {column}")
            conn.exec_driver_sql(f"UPDATE cadnode_meta SET value = '{version}' "
                                 "WHERE key = 'schema_version'")
        date_column, date = (", study_date", ", '20261201'") if version >= 3 else ("", "")
        conn.exec_driver_sql(
            "INSERT INTO studies (study_uid, patient_id, accession, calling_ae, first_received, "
            f"last_received, state{date_column}) VALUES "
            f"('{A}', 'P1', 'ACC1', 'MODALITY', 1.0, 2.0, 'done'{date})")


def _no_difference(db: Database) -> list[object]:
    with db.engine.connect() as conn:
        return list(compare_metadata(MigrationContext.configure(conn), Base.metadata))


def test_an_empty_database_is_made_at_the_head(empty: Database) -> None:
    st = schema.state(empty)
    assert st.empty and st.current is None
    with pytest.raises(schema.SchemaMismatch, match="run `cadnode db upgrade`"):
        schema.check(empty, create=False)
    assert schema.upgrade(empty) == (None, schema.head())
    assert schema.state(empty).up_to_date
    assert _no_difference(empty) == []  # the migrations make exactly what the models say
    assert schema.upgrade(empty) == (schema.head(), schema.head())  # again: nothing to do
    queue.record_instance(empty, stored(A, f"{A}.0", "L", "CC"), now=1.0)


@pytest.mark.parametrize("version", [3, 1])
def test_a_database_of_the_release_before_migrations_is_upgraded(empty: Database,
                                                                  version: int) -> None:
    _release_database(empty, version)
    st = schema.state(empty)
    assert st.current is None and st.legacy_version == version and not st.empty
    with pytest.raises(schema.SchemaMismatch) as refused:  # a node will not start on it
        schema.check(empty)
    assert str(refused.value).startswith(
        f"the job database is at the pre-migration schema version {version}, this cadnode "
        f"needs schema {schema.head()}: run `cadnode db upgrade`")
    assert schema.upgrade(empty) == (f"legacy-{version}", schema.head())
    assert schema.check(empty).up_to_date
    with empty.session() as s:  # what it held is still there, and the node can use it
        study = s.query(Study).one()
        assert (study.study_uid, study.accession) == (A, "ACC1")
    queue.record_instance(empty, stored(A, f"{A}.1", "R", "CC"), now=3.0)
    if version == 3:
        assert _no_difference(empty) == []


def test_a_newer_schema_is_refused(empty: Database) -> None:
    schema.upgrade(empty)
    with empty.engine.begin() as conn:  # as a later cadnode's migration would leave it
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(schema.SchemaMismatch, match="which a newer cadnode made .* upgrade "
                       "cadnode on this machine"):
        schema.check(empty)
    with pytest.raises(schema.SchemaMismatch, match="newer cadnode"):
        schema.upgrade(empty)


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cadnode", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_db_upgrade_and_a_node_that_refuses_an_old_schema(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    db = Database(f"sqlite:///{home / 'cadnode.db'}", home=home)
    _release_database(db)
    db.dispose()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CADNODE_")}
    env.update(CADNODE_HOME=str(home), CADNODE_PORT="0")
    served = _cli(env, "serve")  # refused before anything starts: one line, what to run
    assert served.returncode == 2 and served.stdout == "", served.stderr
    assert served.stderr.splitlines() == [
        f"cadnode: bad setting: CADNODE_HOME={home}: the job database is at the pre-migration "
        f"schema version 3, this cadnode needs schema {schema.head()}: run `cadnode db "
        "upgrade` (once, with every node of this version stopped or not yet started)"]
    current = _cli(env, "db", "current")
    assert current.returncode == 2 and "run `cadnode db upgrade`" in current.stderr
    up = _cli(env, "db", "upgrade")
    assert up.returncode == 0, up.stderr
    assert up.stdout == (f"cadnode db upgrade: the job database went from schema legacy-3 to "
                         f"{schema.head()}\n")
    again = _cli(env, "db", "upgrade")
    assert again.stdout == (f"cadnode db upgrade: the job database is at schema "
                            f"{schema.head()} already\n")
    current = _cli(env, "db", "current")
    assert current.returncode == 0 and "up to date" in current.stdout
    assert _cli(env, "jobs", "--json").returncode == 0


def test_two_processes_upgrading_at_once_both_succeed(pg_url: str, tmp_path: Path) -> None:
    """The deploy runs `cadnode db upgrade` from each replica's start: a lock serialises them."""
    db = Database(pg_url)
    empty_database(db)
    db.dispose()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CADNODE_")}
    env.update(CADNODE_HOME=str(tmp_path), CADNODE_DB_URL=pg_url)
    procs = [subprocess.Popen([sys.executable, "-m", "cadnode", "db", "upgrade"], env=env,
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    made = [out for out, _ in outs if "went from schema (none: made)" in out]
    assert len(made) == 1, outs  # one made it; the others found it made
    db = Database(pg_url)
    try:
        assert schema.state(db).up_to_date and _no_difference(db) == []
    finally:
        db.dispose()
