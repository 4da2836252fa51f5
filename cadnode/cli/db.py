"""``cadnode db upgrade`` and ``cadnode db current``: the job database's schema migrations."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cadnode.config import Settings


def cmd_upgrade(settings: Settings, args: argparse.Namespace) -> int:
    from cadnode.cli.common import database_setting
    from cadnode.jobs.db import Database
    from cadnode.jobs.schema import SchemaMismatch, upgrade

    if settings.database_url.startswith("sqlite"):
        settings.home.mkdir(parents=True, exist_ok=True)
    db = Database(settings.database_url, home=settings.home)
    try:
        before, after = upgrade(db)
    except SchemaMismatch as exc:
        print(f"cadnode db upgrade: {database_setting(settings)}: {exc}", file=sys.stderr)
        return 1
    finally:
        db.dispose()
    if before == after:
        print(f"cadnode db upgrade: the job database is at schema {after} already")
    else:
        print(f"cadnode db upgrade: the job database went from schema "
              f"{before or '(none: made)'} to {after}")
    return 0


def cmd_current(settings: Settings, args: argparse.Namespace) -> int:
    from cadnode.cli.common import open_existing_database

    db = open_existing_database(settings)  # exit 2 when none; 2 with the reason when stale
    try:
        from cadnode.jobs.schema import state

        st = state(db)
        print(f"schema {st.current} (this cadnode's: {st.head}): up to date")
        return 0
    finally:
        db.dispose()


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("db", parents=[common], help="the job database's schema (migrations)",
                       description="Schema migrations of the job database (Alembic, the same "
                       "on SQLite and PostgreSQL). Every node process checks the schema at "
                       "start and refuses one older or newer than its own.")
    db_sub = p.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    u = db_sub.add_parser("upgrade", parents=[common], help="migrate to this cadnode's schema",
                          description="Make the job database (when empty) or migrate it to "
                          "this cadnode's schema; one process at a time (a lock), safe to "
                          "run again. Stop the nodes of the older version first.")
    u.set_defaults(func=cmd_upgrade)
    c = db_sub.add_parser("current", parents=[common],
                          help="the database's schema and whether it is this cadnode's",
                          description="Exit status 0 when the schema is this cadnode's; 2, "
                          "with what to run, when it is older or newer or there is no job "
                          "database.")
    c.set_defaults(func=cmd_current)
