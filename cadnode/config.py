"""One settings object: an optional TOML file, overridden by CADNODE_* environment variables.

A bad setting stops start-up with one line naming it (``SettingsError``), so an administrator
never has to read a traceback to find a typo in a port number.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable, no backslash
UID_ROOT_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
BACKENDS = ("onnxruntime",)


class SettingsError(ValueError):
    """A setting has a value the node cannot use; the message names the setting."""


@dataclass(frozen=True)
class Destination:
    """A storage SCP that results are sent to."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class Settings:
    home: Path = Path("var")
    ae_title: str = "CADNODE"
    host: str = "0.0.0.0"
    port: int = 11112
    destinations: tuple[Destination, ...] = ()
    db_url: str = ""  # empty: a SQLite file under home
    backend: str = "onnxruntime"
    model: str = ""  # empty: the packaged demonstration model
    stable_seconds: float = 300.0  # quiet time after which a study runs with whatever arrived
    complete_seconds: float = 5.0  # quiet time after the four standard views are in
    poll_seconds: float = 1.0
    lease_seconds: float = 600.0
    max_attempts: int = 3
    uid_root: str = ""  # empty: the results package's default root
    log_level: str = "INFO"

    @property
    def spool_dir(self) -> Path:
        return self.home / "spool"

    @property
    def results_dir(self) -> Path:
        return self.home / "results"

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{(self.home / 'cadnode.db').resolve()}"


def parse_destinations(text: str, name: str = "CADNODE_DESTINATIONS") -> tuple[Destination, ...]:
    """Parse ``AE@host:port,AE2@host2:port2``."""
    out = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        m = re.fullmatch(r"([^@]+)@([^:@]+|\[[0-9a-fA-F:]+\]):(\d+)", item)
        if not m:
            raise SettingsError(f"{name}: {item!r} is not AE@host:port")
        ae, host, port = m.group(1), m.group(2).strip("[]"), int(m.group(3))
        _check_ae(ae, name)
        _check_port(port, name)
        out.append(Destination(ae, host, port))
    return tuple(out)


def _check_ae(value: str, name: str) -> str:
    if not AE_TITLE_RE.match(value) or not value.strip():
        raise SettingsError(f"{name}: {value!r} is not a valid AE title (1-16 characters)")
    return value


def _check_port(value: int, name: str) -> int:
    if not 0 <= value <= 65535:
        raise SettingsError(f"{name}: {value} is not a TCP port (0-65535)")
    return value


def _coerce(name: str, kind: type, raw: Any) -> Any:
    try:
        if kind is Path:
            return Path(str(raw))
        if kind is int:
            if isinstance(raw, bool):
                raise ValueError
            return int(str(raw).strip())
        if kind is float:
            value = float(str(raw).strip())
            if value < 0 or value != value:
                raise ValueError
            return value
        return str(raw)
    except ValueError:
        raise SettingsError(f"{name}: {raw!r} is not a valid {kind.__name__}") from None


_KINDS: dict[str, type] = {
    "home": Path,
    "ae_title": str,
    "host": str,
    "port": int,
    "db_url": str,
    "backend": str,
    "model": str,
    "stable_seconds": float,
    "complete_seconds": float,
    "poll_seconds": float,
    "lease_seconds": float,
    "max_attempts": int,
    "uid_root": str,
    "log_level": str,
}


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Read ``config_file`` (or ``./cadnode.toml`` when present), then the environment."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = Path(config_file) if config_file else Path("cadnode.toml")
    if config_file and not path.is_file():
        raise SettingsError(f"--config: {path} does not exist")
    if path.is_file():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise SettingsError(f"{path}: not valid TOML ({exc})") from None
        section = data.get("cadnode", data)
        for key, raw in section.items():
            if key == "destinations":
                text = ",".join(raw) if isinstance(raw, list) else str(raw)
                values["destinations"] = parse_destinations(text, f"{path}: destinations")
            elif key in _KINDS:
                values[key] = _coerce(f"{path}: {key}", _KINDS[key], raw)
            else:
                raise SettingsError(f"{path}: unknown setting {key!r}")
    for key, kind in _KINDS.items():
        name = f"CADNODE_{key.upper()}"
        if name in env:
            values[key] = _coerce(name, kind, env[name])
    if "CADNODE_DESTINATIONS" in env:
        values["destinations"] = parse_destinations(env["CADNODE_DESTINATIONS"])
    settings = replace(Settings(), **values)
    validate(settings)
    return settings


def validate(s: Settings) -> None:
    """Check values that parse but cannot work."""
    _check_ae(s.ae_title, "CADNODE_AE_TITLE")
    _check_port(s.port, "CADNODE_PORT")
    if s.backend not in BACKENDS:
        raise SettingsError(
            f"CADNODE_BACKEND: {s.backend!r} is not one of {', '.join(BACKENDS)}"
        )
    if s.db_url and not re.match(r"^(sqlite|postgresql)(\+\w+)?://", s.db_url):
        raise SettingsError("CADNODE_DB_URL: must start with sqlite:// or postgresql+psycopg://")
    if s.model and not Path(s.model).is_dir():
        raise SettingsError(f"CADNODE_MODEL: {s.model} is not a model package folder")
    if s.max_attempts < 1:
        raise SettingsError("CADNODE_MAX_ATTEMPTS: must be at least 1")
    if s.uid_root and (not UID_ROOT_RE.match(s.uid_root) or len(s.uid_root) > 40):
        raise SettingsError(f"CADNODE_UID_ROOT: {s.uid_root!r} is not a UID root (<= 40 chars)")
    if s.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise SettingsError(f"CADNODE_LOG_LEVEL: {s.log_level!r} is not DEBUG/INFO/WARNING/ERROR")

