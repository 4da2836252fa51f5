"""One settings object: an optional TOML file, overridden by CADNODE_* environment variables.

A bad setting stops start-up with one line naming it (``SettingsError``), so an administrator
never has to read a traceback to find a typo in a port number.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from cadnode.dicom.selection import ImplantPolicy
from cadnode.results.enum import ResultKind
from cadnode.runtime.enum import DEVICES, PRECISIONS, Backend, Precision
from cadnode.uid import is_valid_uid

AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable, no backslash
BACKENDS: tuple[str, ...] = tuple(b.value for b in Backend)  # CADNODE_BACKEND values
LOG_FORMATS = ("text", "json")  # CADNODE_LOG_FORMAT values


class SettingsError(ValueError):
    """A setting has a value the node cannot use; the message names the setting."""


@dataclass(frozen=True)
class Destination:
    """A storage SCP that results are sent to."""

    ae_title: str
    host: str
    port: int
    kinds: tuple[ResultKind, ...] = ()  # result kinds this destination takes; empty: all
    tls: bool = False  # send over TLS (CADNODE_SEND_TLS_* say how)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}" + (";tls" if self.tls else "")

    def takes(self, kind: ResultKind | str) -> bool:
        return not self.kinds or kind in self.kinds


@dataclass(frozen=True)
class Settings:
    home: Path = Path("/var/lib/cadnode")  # made absolute at load time (see load_settings)
    ae_title: str = "CADNODE"
    host: str = "0.0.0.0"
    port: int = 11112
    destinations: tuple[Destination, ...] = ()
    db_url: str = field(default="", repr=False)  # empty: a SQLite file under home; a secret
    backend: str = "onnxruntime"
    device: str = "auto"  # auto | cpu | gpu (gpu: refuse to start without one)
    precision: str = ""  # fp32 | fp16 | bf16 | int8; empty: the backend's default
    max_views: int = 8  # views in one engine call: the TensorRT profile's largest batch
    triton_url: str = ""  # backend triton: http://host:8000 or grpc://host:8001
    triton_model: str = ""  # empty: the package's name, as `cadnode engine triton-repo` writes
    triton_timeout: float = 30.0  # seconds for one inference request to the server
    model: str = ""  # empty: the packaged demonstration model
    stable_seconds: float = 300.0  # quiet time after which a study runs with whatever arrived
    complete_seconds: float = 5.0  # quiet time after the four standard views are in
    poll_seconds: float = 1.0
    lease_seconds: float = 600.0
    max_attempts: int = 3
    decode_memory_mb: int = 4096  # a decoding child's data limit; 0: decode in-process
    decode_processes: int = 0  # decoding children (views decoded in parallel); 0: a core each, <= 4
    #: decode JPEG 2000 at a reduced resolution level when the model input is much smaller
    #: (several times faster; the model input is close to, not the same as, the full decode's)
    reduce_jpeg2000: bool = False
    implant_views: str = ImplantPolicy.FALLBACK.value  # which view is read when ID views exist
    uid_root: str = ""  # empty: the results package's default root
    log_level: str = "INFO"
    log_format: str = "text"  # text | json (one JSON object a line)
    #: also written here (relative: under home), rotated at 10 MB, 5 kept; "": stderr only
    #: (systemd's journal, containers)
    log_file: str = "logs/cadnode.log"
    # who may connect
    allowed_aes: tuple[str, ...] = ()  # calling AE titles allowed in; empty: any
    require_called_ae: bool = True  # refuse associations addressed to another AE title
    tls_cert: str = ""  # PEM certificate and key: TLS on the listener when both are set
    tls_key: str = ""
    tls_ca: str = ""  # PEM CA bundle: peers must present a certificate it signed (mutual TLS)
    # sending to ";tls" destinations
    send_tls_ca: str = ""  # PEM CA bundle that destinations' certificates must chain to
    send_tls_cert: str = ""  # this node's certificate and key, for destinations that want them
    send_tls_key: str = ""
    # limits
    max_associations: int = 16
    max_associations_per_peer: int = 8  # so that one host cannot take every slot
    network_timeout: float = 60.0  # seconds: a whole PDU, a TLS handshake, an idle association
    acse_timeout: float = 30.0  # seconds to negotiate an association
    dimse_timeout: float = 60.0  # seconds to wait for the next DIMSE message
    max_pdu: int = 131072
    max_instance_mb: float = 2048.0
    min_free_mb: float = 200.0  # refuse stores (0xA700) below this much free spool space
    # delivery
    delivery_max_attempts: int = 20  # then the delivery is dead-lettered until an admin retries
    retry_base_seconds: float = 5.0
    retry_cap_seconds: float = 300.0
    # operations
    http_port: int = 0  # the dashboard, /metrics, /healthz, /readyz; 0: off
    http_host: str = "127.0.0.1"  # anything but loopback needs http_token
    http_token: str = field(default="", repr=False)  # bearer token (or basic password); secret
    retention_days: float = 0.0  # purge delivered studies older than this, hourly; 0: keep all

    @property
    def implant_policy(self) -> ImplantPolicy:
        return ImplantPolicy(self.implant_views)

    @property
    def spool_dir(self) -> Path:
        return self.home / "spool"

    @property
    def results_dir(self) -> Path:
        return self.home / "results"

    @property
    def log_path(self) -> Path | None:
        """The log file, or None when the log goes to stderr only."""
        return self.home / self.log_file if self.log_file else None

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{self.home.absolute() / 'cadnode.db'}"


def parse_destinations(text: str, name: str = "CADNODE_DESTINATIONS") -> tuple[Destination, ...]:
    """Parse ``AE@host:port[/kind+kind][;tls],...``, e.g.
    ``PACS@pacs:104,OHIF@viewer:4242/tid1500,VNA@vna:2762;tls``."""
    out = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        m = re.fullmatch(r"([^@]+)@([^:@/;]+|\[[0-9a-fA-F:]+\]):(\d+)(?:/([\w+]+))?(;tls)?",
                         item)
        if not m:
            raise SettingsError(f"{name}: {item!r} is not AE@host:port[/kind+kind][;tls]")
        ae, host, port = m.group(1), m.group(2).strip("[]"), int(m.group(3))
        names = tuple(m.group(4).split("+")) if m.group(4) else ()
        known = [k.value for k in ResultKind]
        unknown = [k for k in names if k not in known]
        if unknown:
            raise SettingsError(f"{name}: unknown result kind(s) {', '.join(unknown)} in "
                                f"{item!r}; known: {'+'.join(known)}")
        kinds = tuple(ResultKind(k) for k in names)
        _check_ae(ae, name)
        _check_port(port, name)
        out.append(Destination(ae, host, port, kinds, bool(m.group(5))))
    return tuple(out)


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_ae(value: str, name: str) -> str:
    if not AE_TITLE_RE.match(value) or not value.strip():
        raise SettingsError(f"{name}: {value!r} is not a valid AE title (1-16 characters)")
    return value


def _check_port(value: int, name: str) -> int:
    if not 0 <= value <= 65535:
        raise SettingsError(f"{name}: {value} is not a TCP port (0-65535)")
    return value


def _coerce(name: str, kind: str, raw: Any) -> Any:
    """Turn a TOML or environment value into the field's type (given as its annotation)."""
    if kind == "tuple[Destination, ...]":
        text = ",".join(raw) if isinstance(raw, list) else str(raw)
        return parse_destinations(text, name)
    if kind == "tuple[str, ...]":
        items = raw if isinstance(raw, list) else str(raw).split(",")
        return tuple(_check_ae(str(x).strip(), name) for x in items if str(x).strip())
    try:
        if kind == "Path":
            return Path(str(raw))
        if kind == "bool":
            text = str(raw).strip().lower()
            if text not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError
            return text in ("1", "true", "yes", "on")
        if kind == "int":
            if isinstance(raw, bool):
                raise ValueError
            return int(str(raw).strip())
        if kind == "float":
            if isinstance(raw, bool):
                raise ValueError
            value = float(str(raw).strip())
        else:
            return str(raw)
    except ValueError:
        raise SettingsError(f"{name}: {raw!r} is not a valid {kind}") from None
    if not math.isfinite(value):
        raise SettingsError(f"{name}: {raw!r} is not a finite number")
    if value < 0:
        raise SettingsError(f"{name}: {str(raw).strip()} must be zero or more")
    return value


#: Every setting and its type, read off the dataclass so there is one list of settings.
_KINDS: dict[str, str] = {f.name: str(f.type) for f in fields(Settings)}
#: Settings that are secrets may also be given as a path in ``<NAME>_FILE``.
SECRETS = ("db_url", "http_token")
#: CADNODE_* variables that are not settings but are read all the same (by the test suite).
OTHER_VARIABLES = frozenset({"CADNODE_TEST_PG", "CADNODE_FUZZ_EXAMPLES", "CADNODE_FUZZ_SEED"})
#: Where a setting's value came from when it was not given: ``Settings()``'s default.
DEFAULT_SOURCE = "default"


def known_variables() -> frozenset[str]:
    """Every CADNODE_* environment variable cadnode reads."""
    names = {f"CADNODE_{key.upper()}" for key in _KINDS}
    names |= {f"CADNODE_{key.upper()}_FILE" for key in SECRETS}
    return frozenset(names) | OTHER_VARIABLES


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """One warning per CADNODE_* variable that nothing reads (a misspelt setting is otherwise
    silently ignored), with the closest known name."""
    env = os.environ if environ is None else environ
    known = known_variables()
    warnings = []
    for name in sorted(n for n in env if n.startswith("CADNODE_") and n not in known):
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.7)
        hint = f"; did you mean {close[0]}?" if close else ""
        warnings.append(f"unknown environment variable {name} is ignored{hint}")
    return warnings


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Read ``config_file`` (or ``./cadnode.toml`` when present), then the environment."""
    return load_settings_with_sources(config_file, environ)[0]


def load_settings_with_sources(
    config_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[Settings, dict[str, str]]:
    """:func:`load_settings`, and where each setting came from: the TOML file's path, the
    environment variable's name (``CADNODE_DB_URL_FILE`` for a secret read from a file), or
    :data:`DEFAULT_SOURCE`."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources = dict.fromkeys(_KINDS, DEFAULT_SOURCE)
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
            if key not in _KINDS:
                raise SettingsError(f"{path}: unknown setting {key!r}")
            values[key] = _coerce(f"{path}: {key}", _KINDS[key], raw)
            sources[key] = str(path.absolute())
    for key, kind in _KINDS.items():
        name = f"CADNODE_{key.upper()}"
        if name in env:
            values[key] = _coerce(name, kind, env[name])
            sources[key] = name
        if key in SECRETS and f"{name}_FILE" in env:
            secret = Path(env[f"{name}_FILE"])
            try:
                values[key] = secret.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise SettingsError(f"{name}_FILE: cannot read {secret}: {exc.strerror}") from None
            sources[key] = f"{name}_FILE"
    settings = replace(Settings(), **values)
    # Absolute once, here: every path under the home (and in the database) then means the same
    # whatever the working directory of a later command or a restarted service is.
    settings = replace(settings, home=settings.home.expanduser().absolute())
    validate(settings)
    return settings, sources


def masked(value: str) -> str:
    """A secret as it may be shown: whether it is set, never what it is."""
    return "********" if value else ""


def mask_url(url: str) -> str:
    """A database URL with its password replaced (``user:********@host``): in the user part
    (up to the last ``@`` before the query, so a password holding ``@`` is hidden whole) and in
    a ``password=`` query parameter, which libpq accepts too."""
    base, question, query = url.partition("?")
    base = re.sub(r"^([\w+]+://[^:/@]*):.*@", r"\1:********@", base)
    query = re.sub(r"(^|&)(password=)[^&]*", r"\1\2********", query)
    return base + question + query


def public_value(key: str, value: Any) -> Any:
    """A setting's value as ``cadnode config`` and the logs may show it: secrets masked,
    paths and destinations as text."""
    if key == "db_url":
        return mask_url(str(value))
    if key in SECRETS:
        return masked(str(value))
    if isinstance(value, tuple):
        return [str(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _check_precision(s: Settings) -> None:
    if not s.precision:
        return
    if s.precision not in [p.value for p in Precision]:
        raise SettingsError(f"CADNODE_PRECISION: {s.precision!r} is not one of "
                            f"{', '.join(p.value for p in Precision)}")
    offered = ([p.value for ps in PRECISIONS.values() for p in ps] if s.backend == Backend.AUTO
               else [p.value for p in PRECISIONS[Backend(s.backend)]])
    if s.precision not in offered:
        raise SettingsError(f"CADNODE_PRECISION: backend {s.backend} computes in "
                            f"{', '.join(dict.fromkeys(offered))}, not {s.precision}")


def engine_options(s: Settings) -> dict[str, object]:
    """What ``cadnode.runtime.load_engine`` takes from the settings, whatever the backend."""
    options: dict[str, object] = {"home": s.home, "max_views": s.max_views,
                                  "timeout_s": s.triton_timeout}
    if s.triton_url:
        options["url"] = s.triton_url
    if s.triton_model:
        options["model"] = s.triton_model
    return options


def validate(s: Settings) -> None:
    """Check values that parse but cannot work."""
    _check_ae(s.ae_title, "CADNODE_AE_TITLE")
    _check_port(s.port, "CADNODE_PORT")
    if s.backend not in BACKENDS:
        raise SettingsError(
            f"CADNODE_BACKEND: {s.backend!r} is not one of {', '.join(BACKENDS)}"
        )
    if s.device not in DEVICES:
        raise SettingsError(f"CADNODE_DEVICE: {s.device!r} is not one of {', '.join(DEVICES)}")
    _check_precision(s)
    if not 1 <= s.max_views <= 64:
        raise SettingsError("CADNODE_MAX_VIEWS: must be between 1 and 64")
    if s.backend == Backend.TRITON and not re.match(r"^(http|grpc)://[^/\s]+$|^[^/\s:]+:\d+$",
                                                     s.triton_url):
        raise SettingsError(f"CADNODE_TRITON_URL: {s.triton_url!r} is not http://host:port or "
                            "grpc://host:port (backend triton needs it)")
    if s.db_url and not re.match(r"^(sqlite|postgresql)(\+\w+)?://", s.db_url):
        raise SettingsError("CADNODE_DB_URL: must start with sqlite:// or postgresql+psycopg://")
    if s.model and not Path(s.model).is_dir():
        raise SettingsError(f"CADNODE_MODEL: {s.model} is not a model package folder")
    if s.max_attempts < 1:
        raise SettingsError("CADNODE_MAX_ATTEMPTS: must be at least 1")
    if s.decode_memory_mb != 0 and s.decode_memory_mb < 256:
        raise SettingsError("CADNODE_DECODE_MEMORY_MB: 0 (decode in-process) or at least 256")
    if s.decode_processes < 0:
        raise SettingsError("CADNODE_DECODE_PROCESSES: 0 (one per core, at most 4) or more")
    policies = [p.value for p in ImplantPolicy]
    if s.implant_views not in policies:
        raise SettingsError(f"CADNODE_IMPLANT_VIEWS: {s.implant_views!r} is not one of "
                            f"{', '.join(policies)}")
    if s.uid_root and (not is_valid_uid(s.uid_root) or len(s.uid_root) > 40):
        raise SettingsError(f"CADNODE_UID_ROOT: {s.uid_root!r} is not a UID root (<= 40 chars)")
    if s.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise SettingsError(f"CADNODE_LOG_LEVEL: {s.log_level!r} is not DEBUG/INFO/WARNING/ERROR")
    if s.log_format not in LOG_FORMATS:
        raise SettingsError(f"CADNODE_LOG_FORMAT: {s.log_format!r} is not one of "
                            f"{', '.join(LOG_FORMATS)}")

    if bool(s.tls_cert) != bool(s.tls_key):
        raise SettingsError("CADNODE_TLS_CERT and CADNODE_TLS_KEY: set both or neither")
    if s.tls_ca and not s.tls_cert:
        raise SettingsError("CADNODE_TLS_CA: mutual TLS needs CADNODE_TLS_CERT and _KEY too")
    if bool(s.send_tls_cert) != bool(s.send_tls_key):
        raise SettingsError("CADNODE_SEND_TLS_CERT and CADNODE_SEND_TLS_KEY: set both or neither")
    for name, value in (("CADNODE_TLS_CERT", s.tls_cert), ("CADNODE_TLS_KEY", s.tls_key),
                        ("CADNODE_TLS_CA", s.tls_ca), ("CADNODE_SEND_TLS_CA", s.send_tls_ca),
                        ("CADNODE_SEND_TLS_CERT", s.send_tls_cert),
                        ("CADNODE_SEND_TLS_KEY", s.send_tls_key)):
        if value and not Path(value).is_file():
            raise SettingsError(f"{name}: {value} is not a file")
    if not 1 <= s.max_associations <= 1000:
        raise SettingsError("CADNODE_MAX_ASSOCIATIONS: must be between 1 and 1000")
    if s.max_associations_per_peer < 1:  # above CADNODE_MAX_ASSOCIATIONS it changes nothing
        raise SettingsError("CADNODE_MAX_ASSOCIATIONS_PER_PEER: must be at least 1")
    timeouts = (("CADNODE_NETWORK_TIMEOUT", s.network_timeout),
                ("CADNODE_ACSE_TIMEOUT", s.acse_timeout),
                ("CADNODE_DIMSE_TIMEOUT", s.dimse_timeout))
    for name, seconds in timeouts:
        if not 1 <= seconds <= 3600:
            raise SettingsError(f"{name}: must be between 1 and 3600 seconds")
    if not 4096 <= s.max_pdu <= 2**32 - 1:
        raise SettingsError("CADNODE_MAX_PDU: must be between 4096 and 4294967295 bytes")
    if s.delivery_max_attempts < 1:
        raise SettingsError("CADNODE_DELIVERY_MAX_ATTEMPTS: must be at least 1")
    _check_port(s.http_port, "CADNODE_HTTP_PORT")
    if s.http_port and not s.http_token and not is_loopback(s.http_host):
        raise SettingsError(f"CADNODE_HTTP_TOKEN: required when CADNODE_HTTP_HOST "
                            f"({s.http_host}) is not a loopback address")
