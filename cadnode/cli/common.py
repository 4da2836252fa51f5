"""What every command shares: logging set-up and opening the job database."""

from __future__ import annotations

import logging
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from cadnode.config import Settings, SettingsError

#: The log file rotates at this size, keeping this many old files (cadnode.log.1 ... .5).
LOG_FILE_BYTES = 10 * 1024 * 1024
LOG_FILE_BACKUPS = 5


def setup_logging(settings: Settings, to_file: bool = True, level: str | None = None,
                  libraries: int = logging.WARNING, warn_unknown: bool = True) -> None:
    """stderr, and (``to_file``: the node's own processes) the rotated ``CADNODE_LOG_FILE``
    unless it is empty, in ``CADNODE_LOG_FORMAT``; every record carries the study and job it is
    about (cadnode.logs). cadnode's loggers at ``level`` (default CADNODE_LOG_LEVEL), other
    libraries' at ``libraries``; ``warn_unknown``: a warning for each unknown CADNODE_*
    variable (the node's processes; ``cadnode config`` lists them itself). Admin commands log to
    stderr only, never into the node's file."""
    from logging.handlers import RotatingFileHandler

    from cadnode.logs import ContextFilter, formatter

    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    path = settings.log_path if to_file else None
    if path is not None:
        name = "CADNODE_LOG_FILE" if Path(settings.log_file).is_absolute() else "CADNODE_HOME"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handlers.append(RotatingFileHandler(path, maxBytes=LOG_FILE_BYTES,
                                                backupCount=LOG_FILE_BACKUPS, encoding="utf-8"))
        except OSError as exc:
            raise SettingsError(f"{name}: cannot write the log file {path}: "
                                f"{exc.strerror or exc}") from None
    fmt = formatter(settings.log_format)
    for handler in handlers:
        handler.setFormatter(fmt)
        handler.addFilter(ContextFilter())
    # Third-party libraries (pynetdicom's PDUs, highdicom's template chatter, APScheduler's
    # runs) log at WARNING and above; cadnode's own loggers at the configured level.
    logging.basicConfig(level=libraries, handlers=handlers, force=True)
    logging.getLogger("cadnode").setLevel((level or settings.log_level).upper())
    # A poll that finds the previous one still running is skipped by design (coalescing);
    # APScheduler warns about each skip, which tells an admin nothing.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    from cadnode.config import unknown_variables

    # a misspelt setting would otherwise pass unnoticed
    for warning in unknown_variables() if warn_unknown else ():
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


@dataclass(frozen=True)
class TlsContexts:
    server: ssl.SSLContext | None  # the listener's, when it speaks TLS
    client: ssl.SSLContext | None  # for ";tls" destinations and `send --tls`


def tls_contexts(settings: Settings, client: bool | None = None) -> TlsContexts:
    """The TLS contexts, made at start-up so that a certificate or key that does not load is
    one line naming its setting (``client``: make the sending one even without a ";tls"
    destination; default: only when one needs it)."""
    from cadnode.dicom.listener import server_ssl_context
    from cadnode.dicom.sender import client_ssl_context

    def made(names: str, build: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        try:
            return build()
        except (ssl.SSLError, OSError, ValueError) as exc:
            why = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
            raise SettingsError(f"{names}: the certificate, key or CA file does not load "
                                f"({why})") from None

    server = None
    if settings.tls_cert:
        server = made("CADNODE_TLS_CERT / CADNODE_TLS_KEY / CADNODE_TLS_CA",
                      lambda: server_ssl_context(settings.tls_cert, settings.tls_key,
                                                 settings.tls_ca))
    wanted = any(d.tls for d in settings.destinations) if client is None else client
    sending = None
    if wanted:
        sending = made("CADNODE_SEND_TLS_CA / CADNODE_SEND_TLS_CERT / CADNODE_SEND_TLS_KEY",
                       lambda: client_ssl_context(settings.send_tls_ca, settings.send_tls_cert,
                                                  settings.send_tls_key))
    return TlsContexts(server, sending)


def database_setting(settings: Settings) -> str:
    """The setting that names the job database, as an admin would write it."""
    from cadnode.config import mask_url

    return (f"CADNODE_DB_URL={mask_url(settings.database_url)}" if settings.db_url
            else f"CADNODE_HOME={settings.home}")


def open_database(settings: Settings) -> Any:
    """The job database for a node process: made when empty, refused (one line naming the
    setting and what to run) when its schema is older or newer than this cadnode's."""
    from cadnode.jobs.db import Database
    from cadnode.jobs.schema import SchemaMismatch, check

    try:
        settings.home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SettingsError(f"CADNODE_HOME: cannot create {settings.home}: "
                            f"{exc.strerror or exc}") from None
    db = Database(settings.database_url, home=settings.home)
    try:
        check(db, create=True)
    except SchemaMismatch as exc:
        db.dispose()
        raise SettingsError(f"{database_setting(settings)}: {exc}") from None
    except Exception as exc:  # unreachable server, wrong password, not a database
        db.dispose()
        raise SettingsError(f"{database_setting(settings)}: cannot open the job database: "
                            f"{_first_line(exc)}") from None
    return db


def open_existing_database(settings: Settings, read_only: bool = True) -> Any:
    """The node's job database for an admin command: it must exist already (nothing is
    created, not even the home folder), and with ``read_only`` it is opened read-only (SQLite
    ``mode=ro``, PostgreSQL read-only transactions). A missing or foreign database, or one
    whose schema is not this cadnode's, is one line on stderr and exit status 2."""
    from sqlalchemy.exc import SQLAlchemyError

    from cadnode.config import mask_url
    from cadnode.jobs.db import Database, sqlite_file
    from cadnode.jobs.schema import SchemaMismatch, check, state

    url = settings.database_url
    where = database_setting(settings)
    hint = "run this where the node runs, or pass --config / set CADNODE_HOME"
    path = sqlite_file(url) if url.startswith("sqlite") else None
    if url.startswith("sqlite") and (path is None or not path.is_file()):
        _fail(f"no job database at {path or url} ({where}); {hint}")
    shown = str(path) if path else mask_url(url)
    db = Database(url, home=settings.home, read_only=read_only)
    try:
        if state(db).empty:
            db.dispose()
            _fail(f"{shown} is not a cadnode job database ({where}); {hint}")
        check(db, create=False)
    except SchemaMismatch as exc:
        db.dispose()
        _fail(f"{shown}: {exc}")
    except SQLAlchemyError as exc:
        db.dispose()
        _fail(f"cannot open the job database {shown}: {_first_line(exc)}")
    return db


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    lines = str(orig).strip().splitlines()
    return lines[0] if lines else type(orig).__name__


def _fail(message: str) -> NoReturn:
    print(f"cadnode: {message}", file=sys.stderr)
    raise SystemExit(2)
