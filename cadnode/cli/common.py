"""What every command shares: logging set-up and opening the job database."""

from __future__ import annotations

import logging
import sys
from typing import Any

from cadnode.config import Settings, SettingsError


def setup_logging(settings: Settings | None, level: str = "INFO") -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if settings is not None:
        logs = settings.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(logs / "cadnode.log"))
    # Third-party libraries (pynetdicom's PDUs, highdicom's template chatter, APScheduler's
    # runs) log at WARNING and above; cadnode's own loggers at the configured level.
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    logging.getLogger("cadnode").setLevel((settings.log_level if settings else level).upper())
    # A poll that finds the previous one still running is skipped by design (coalescing);
    # APScheduler warns about each skip, which tells an admin nothing.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)


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
