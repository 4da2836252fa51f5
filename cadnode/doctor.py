"""``cadnode doctor``: is this node set up to work? One result per check, with how to fix it.

Nothing is changed: the database is opened read-only (and not created), the listener port is
only test-bound, the spool gets one temporary file, the model is loaded and released.
"""

from __future__ import annotations

import errno
import os
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cadnode.config import Settings, is_loopback, mask_url, unknown_variables
from cadnode.dicom.spool import free_bytes, nearest_existing

OK, WARN, FAIL = "OK", "WARN", "FAIL"


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # OK | WARN | FAIL
    detail: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.status:<4} {self.name}: {self.detail}" + (f" -> {self.fix}" if self.fix
                                                                   else "")

    def as_dict(self) -> dict[str, str]:
        return {"check": self.name, "status": self.status, "detail": self.detail,
                "fix": self.fix}


def run_checks(settings: Settings, timeout: float = 5.0) -> list[Check]:
    """Every check, in order; a check that raises is a FAIL naming the exception."""
    steps: list[tuple[str, Callable[[], list[Check]]]] = [
        ("settings", lambda: check_settings(settings)),
        ("listener port", lambda: check_port(settings, timeout)),
        ("http port", lambda: check_http_port(settings)),
        ("database", lambda: check_database(settings)),
        ("storage", lambda: check_storage(settings)),
        ("model package", lambda: check_model(settings)),
        ("destinations", lambda: check_destinations(settings, timeout)),
    ]
    out: list[Check] = []
    for name, step in steps:
        try:
            out += step()
        except Exception as exc:  # a doctor reports, it does not crash
            out.append(Check(name, FAIL, f"{type(exc).__name__}: {exc}"))
    return out


def check_settings(settings: Settings) -> list[Check]:
    out = [Check("settings", OK, "loaded and valid")]
    for warning in unknown_variables():
        out.append(Check("settings", WARN, warning, "rename or remove the variable"))
    if not settings.destinations:
        out.append(Check("settings", WARN, "no destinations: results stay in "
                         f"{settings.results_dir}", "set CADNODE_DESTINATIONS=AE@host:port"))
    return out


def _bind(host: str, port: int) -> OSError | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the listener does
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc
    return None


def check_port(settings: Settings, timeout: float) -> list[Check]:
    if settings.port == 0:
        return [Check("listener port", OK, "CADNODE_PORT=0: any free port, printed at start")]
    where = f"{settings.host}:{settings.port}"
    problem = _bind(settings.host, settings.port)
    if problem is None:
        return [Check("listener port", OK, f"{where} is free to bind")]
    if problem.errno == errno.EADDRINUSE:
        from cadnode.dicom.sender import DeliveryError, echo

        target = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
        try:
            echo(target, settings.port, settings.ae_title, settings.ae_title, timeout)
        except DeliveryError:
            return [Check("listener port", FAIL, f"{where} is in use by another program",
                          "stop it, or set CADNODE_PORT to a free port")]
        return [Check("listener port", OK, f"{where}: a node answers C-ECHO as "
                      f"{settings.ae_title} (this node is running)")]
    return [Check("listener port", FAIL, f"cannot bind {where}: {problem.strerror}",
                  "set CADNODE_HOST to an address of this machine (or 0.0.0.0), and "
                  "CADNODE_PORT to 1024 or more unless running with the privilege to bind it")]


def check_http_port(settings: Settings) -> list[Check]:
    if not settings.http_port:
        return []
    where = f"{settings.http_host}:{settings.http_port}"
    problem = _bind(settings.http_host, settings.http_port)
    if problem is None:
        status, detail = OK, f"{where} is free to bind"
    elif problem.errno == errno.EADDRINUSE:
        status, detail = WARN, f"{where} is in use (by this node if it is running)"
    else:
        return [Check("http port", FAIL, f"cannot bind {where}: {problem.strerror}",
                      "set CADNODE_HTTP_HOST / CADNODE_HTTP_PORT")]
    if not is_loopback(settings.http_host):
        detail += "; reachable from other machines, token required"
    return [Check("http port", status, detail)]


def check_database(settings: Settings) -> list[Check]:
    from sqlalchemy.exc import SQLAlchemyError

    from cadnode.jobs.db import Database
    from cadnode.jobs.schema import known, state

    url = settings.database_url
    shown = mask_url(url)
    if url.startswith("sqlite"):
        from cadnode.jobs.db import sqlite_file

        path = sqlite_file(url)
        if path is not None and not path.is_file():
            return [Check("database", WARN, f"no job database yet at {path}",
                          "`cadnode serve` (or `cadnode db upgrade`) makes it")]
    db = Database(url, home=settings.home, read_only=True)
    try:
        st = state(db)
    except SQLAlchemyError as exc:
        first = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        return [Check("database", FAIL, f"cannot reach {shown}: {first}",
                      "check CADNODE_DB_URL (host, port, user, password) and that the "
                      "server runs")]
    finally:
        db.dispose()
    if st.empty:
        return [Check("database", FAIL if url.startswith("sqlite") else WARN,
                      f"{shown} holds no cadnode schema",
                      "`cadnode db upgrade` makes it (point CADNODE_DB_URL at the node's "
                      "database)")]
    if st.up_to_date:
        return [Check("database", OK, f"{shown}: reachable, schema {st.current}")]
    if st.current is not None and not known(st.current):
        return [Check("database", FAIL, f"{shown}: schema {st.current} is newer than this "
                      f"cadnode's ({st.head})", "upgrade cadnode on this machine")]
    was = st.current or f"version {st.legacy_version} (before migrations)"
    return [Check("database", FAIL, f"{shown}: schema {was}, this cadnode needs {st.head}; "
                  "the node will not start", "run `cadnode db upgrade`")]


def check_storage(settings: Settings) -> list[Check]:
    out = []
    for name, folder in (("home", settings.home), ("spool", settings.spool_dir),
                         ("results", settings.results_dir)):
        existing = nearest_existing(folder)
        if not existing.is_dir():
            out.append(Check(f"{name} folder", FAIL, f"{existing} is not a folder, so "
                             f"{folder} cannot be made", "set CADNODE_HOME to a folder path"))
            continue
        try:
            with tempfile.NamedTemporaryFile(dir=existing, prefix=".doctor-"):
                pass
        except OSError as exc:
            out.append(Check(f"{name} folder", FAIL, f"cannot write in {existing}: "
                             f"{exc.strerror}", f"make {existing} writable by this user, or "
                             "set CADNODE_HOME"))
            continue
        made = "" if existing == folder else f" ({folder} will be created)"
        out.append(Check(f"{name} folder", OK, f"{existing} is writable{made}"))
    existing = nearest_existing(settings.spool_dir)
    free = free_bytes(existing) if existing.is_dir() else None
    if free is not None:
        free_mb = free / 2**20
        detail = (f"{free_mb:.0f} MB free for the spool, stores are refused below "
                  f"{settings.min_free_mb:.0f} MB (CADNODE_MIN_FREE_MB)")
        if free_mb < settings.min_free_mb:
            out.append(Check("free space", FAIL, detail, "free disk space, or run "
                             "`cadnode purge --older-than 30d`"))
        elif free_mb < 5 * settings.min_free_mb:
            out.append(Check("free space", WARN, detail, "free disk space soon (cadnode purge, "
                             "CADNODE_RETENTION_DAYS)"))
        else:
            out.append(Check("free space", OK, detail))
    if settings.log_path is not None:
        log_dir = nearest_existing(settings.log_path.parent)
        if not os.access(log_dir, os.W_OK):
            out.append(Check("log file", FAIL, f"cannot write {settings.log_path}",
                             "set CADNODE_LOG_FILE (empty: stderr only)"))
    return out


def check_model(settings: Settings) -> list[Check]:
    from cadnode.runtime import DEFAULT_MODEL_PACKAGE, BackendUnavailable, read_manifest

    package = Path(settings.model) if settings.model else DEFAULT_MODEL_PACKAGE
    try:
        m = read_manifest(package)  # checksums included
    except ValueError as exc:
        return [Check("model package", FAIL, str(exc), "point CADNODE_MODEL at an intact "
                      "package (python -m train export writes one)")]
    out = [Check("model package", OK if not m.demo else WARN,
                 f"{m.name} {m.version} at {package}, checksums match"
                 + ("; a demonstration model, not for clinical use" if m.demo else ""))]
    from cadnode.jobs.worker import load_model

    try:
        engine, _ = load_model(settings)
    except BackendUnavailable as exc:
        out.append(Check("backend", FAIL, f"{settings.backend}: {exc}",
                         "install what is named, or set CADNODE_BACKEND / CADNODE_DEVICE"))
        return out
    except Exception as exc:  # a package that reads but does not load
        out.append(Check("backend", FAIL, f"{settings.backend} cannot load {package}: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                         "rebuild or re-export the model package"))
        return out
    providers: Any = getattr(engine, "providers", ())
    out.append(Check("backend", OK, f"{engine.backend} ({', '.join(providers)})"))
    close = getattr(engine, "close", None)
    if callable(close):
        close()
    return out


def check_destinations(settings: Settings, timeout: float) -> list[Check]:
    from cadnode.dicom.sender import DeliveryError, client_ssl_context, echo

    out = []
    for dest in settings.destinations:
        try:
            tls = (client_ssl_context(settings.send_tls_ca, settings.send_tls_cert,
                                      settings.send_tls_key) if dest.tls else None)
            echo(dest.host, dest.port, dest.ae_title, settings.ae_title, timeout, tls)
        except (DeliveryError, OSError) as exc:
            out.append(Check(f"destination {dest}", FAIL, str(exc),
                             "start the peer or fix CADNODE_DESTINATIONS; the peer must know "
                             f"this node's AE title {settings.ae_title}"))
            continue
        out.append(Check(f"destination {dest}", OK, "answers C-ECHO"))
    return out
