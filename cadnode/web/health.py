"""Readiness: the job database answers, the model is loaded, the spool takes files."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select

from cadnode.jobs.db import Database, Meta, sqlite_file

#: A check returns "" when all is well, else one line saying what is wrong.
Check = Callable[[], str]


def database_check(db: Database) -> Check:
    """The schema's own table answers a query. A SQLite file that was removed (or moved)
    under a running node fails too: its pooled connections would still read the old one."""
    sqlite_path = sqlite_file(db.url) if db.is_sqlite else None

    def check() -> str:
        if sqlite_path is not None and not sqlite_path.exists():
            return f"the database file {sqlite_path} is gone"
        try:
            with db.session() as s:
                if s.scalar(select(Meta.value).where(Meta.key == "schema_version")) is None:
                    return "the database has no cadnode schema"
        except Exception as exc:
            return f"the database does not answer: {type(exc).__name__}: {_first_line(exc)}"
        return ""

    return check


def spool_check(spool_dir: Path) -> Check:
    """A file can be created (and removed) in the spool folder."""

    def check() -> str:
        probe = spool_dir / f".readyz-{uuid.uuid4().hex}"
        try:
            spool_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, b"ok")
            finally:
                os.close(fd)
            probe.unlink()
        except OSError as exc:
            return f"the spool {spool_dir} is not writable: {exc.strerror or exc}"
        return ""

    return check


def run_checks(checks: dict[str, Check]) -> dict[str, str]:
    """Each check's outcome: "ok" or what is wrong (a check that raises has failed)."""
    out = {}
    for name, check in checks.items():
        try:
            problem = check()
        except Exception as exc:
            problem = f"{type(exc).__name__}: {_first_line(exc)}"
        out[name] = problem or "ok"
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""
