"""What every command shares: logging set-up and opening the job database."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, NoReturn

from cadnode.config import Settings, SettingsError

#: The log file rotates at this size, keeping this many old files (cadnode.log.1 ... .5).
LOG_FILE_BYTES = 10 * 1024 * 1024
LOG_FILE_BACKUPS = 5


def setup_logging(settings: Settings | None, level: str = "INFO") -> None:
    """stderr, and the rotated ``CADNODE_LOG_FILE`` unless it is empty, in
    ``CADNODE_LOG_FORMAT``; every record carries the study and job it is about (cadnode.logs)."""
    from logging.handlers import RotatingFileHandler

    from cadnode.logs import ContextFilter, formatter

    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    path = settings.log_path if settings is not None else None
    if settings is not None and path is not None:
        name = "CADNODE_LOG_FILE" if Path(settings.log_file).is_absolute() else "CADNODE_HOME"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handlers.append(RotatingFileHandler(path, maxBytes=LOG_FILE_BYTES,
                                                backupCount=LOG_FILE_BACKUPS, encoding="utf-8"))
        except OSError as exc:
            raise SettingsError(f"{name}: cannot write the log file {path}: "
                                f"{exc.strerror or exc}") from None
    fmt = formatter(settings.log_format if settings is not None else "text")
    for handler in handlers:
        handler.setFormatter(fmt)
        handler.addFilter(ContextFilter())
    # Third-party libraries (pynetdicom's PDUs, highdicom's template chatter, APScheduler's
    # runs) log at WARNING and above; cadnode's own loggers at the configured level.
    logging.basicConfig(level=logging.WARNING, handlers=handlers, force=True)
    logging.getLogger("cadnode").setLevel((settings.log_level if settings else level).upper())
    # A poll that finds the previous one still running is skipped by design (coalescing);
    # APScheduler warns about each skip, which tells an admin nothing.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    from cadnode.config import unknown_variables

    for warning in unknown_variables():  # a misspelt setting would otherwise pass unnoticed
        logging.getLogger("cadnode.config").warning("%s", warning)


def prepare_home(settings: Settings) -> None:
    """Make the home and its spool and results folders, and check that each takes a file:
    SettingsError naming CADNODE_HOME otherwise."""
    import tempfile

    for folder in (settings.home, settings.spool_dir, settings.results_dir):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".writable-"):
                pass
        except OSError as exc:
            raise SettingsError(f"CADNODE_HOME: cannot write in {folder}: "
                                f"{exc.strerror or exc}") from None


def port_error(settings: Settings, exc: OSError) -> str:
    """The one line for a listener that cannot bind."""
    import errno

    where = f"{settings.host}:{settings.port}"
    if exc.errno == errno.EADDRINUSE:
        return (f"CADNODE_PORT: {where} is already in use (another cadnode or DICOM server "
                "is listening there); stop it or choose another port")
    if exc.errno == errno.EACCES:
        return f"CADNODE_PORT: no permission to listen on {where} (ports below 1024 need it)"
    return f"CADNODE_HOST / CADNODE_PORT: cannot listen on {where}: {exc.strerror or exc}"


def model_error(settings: Settings, exc: Exception) -> str:
    """The one line for a model package that does not load."""
    from cadnode.runtime import DEFAULT_MODEL_PACKAGE

    package = settings.model or str(DEFAULT_MODEL_PACKAGE)
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    if isinstance(exc, ValueError) and text.startswith("model package"):
        return f"CADNODE_MODEL: {text}"  # the manifest's own words name the package
    return f"CADNODE_MODEL: model package {package} does not load: {text}"


def open_database(settings: Settings) -> Any:
    from cadnode.jobs.db import Database

    try:
        settings.home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SettingsError(f"CADNODE_HOME: cannot create {settings.home}: "
                            f"{exc.strerror or exc}") from None
    db = Database(settings.database_url, home=settings.home)
    db.create_schema()
    return db


def open_existing_database(settings: Settings, read_only: bool = True) -> Any:
    """The node's job database for an admin command: it must exist already (nothing is
    created, not even the home folder), and with ``read_only`` it is opened read-only (SQLite
    ``mode=ro``, PostgreSQL read-only transactions). A missing or foreign database is one line
    on stderr and exit status 2."""
    from sqlalchemy import inspect, make_url, select
    from sqlalchemy.exc import SQLAlchemyError

    from cadnode.jobs.db import SCHEMA_VERSION, Database, Meta, sqlite_file

    url = settings.database_url
    where = (f"CADNODE_DB_URL={make_url(url).render_as_string(hide_password=True)}"
             if settings.db_url else f"CADNODE_HOME={settings.home}")
    hint = "run this where the node runs, or pass --config / set CADNODE_HOME"
    path = sqlite_file(url) if url.startswith("sqlite") else None
    if url.startswith("sqlite") and (path is None or not path.is_file()):
        _fail(f"no job database at {path or url} ({where}); {hint}")
    shown = str(path) if path else make_url(url).render_as_string(hide_password=True)

    def open_checked(ro: bool) -> tuple[Any, int]:
        db = Database(url, home=settings.home, read_only=ro)
        try:
            if not inspect(db.engine).has_table(Meta.__tablename__):
                db.dispose()
                _fail(f"{shown} is not a cadnode job database ({where}); {hint}")
            with db.session() as s:
                version = s.scalar(select(Meta.value).where(Meta.key == "schema_version"))
        except SQLAlchemyError as exc:
            db.dispose()
            orig = getattr(exc, "orig", None) or exc
            _fail(f"cannot open the job database {shown}: {str(orig).splitlines()[0]}")
        return db, int(version or 0)

    db, version = open_checked(read_only)
    if version < SCHEMA_VERSION:  # the node has not run since cadnode was upgraded
        db.dispose()
        upgrade, _ = open_checked(False)
        upgrade.create_schema()
        upgrade.dispose()
        print(f"cadnode: job database {shown} upgraded from schema version {version} to "
              f"{SCHEMA_VERSION}", file=sys.stderr)
        db, version = open_checked(read_only)
    return db


def _fail(message: str) -> NoReturn:
    print(f"cadnode: {message}", file=sys.stderr)
    raise SystemExit(2)
