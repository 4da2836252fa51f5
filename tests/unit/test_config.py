"""Settings: TOML file, environment overrides, and one clear line for a bad value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cadnode.config import Destination, SettingsError, load_settings


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = load_settings(environ={})
    assert (s.ae_title, s.port, s.backend, s.home) == ("CADNODE", 11112, "onnxruntime",
                                                       Path("/var/lib/cadnode"))
    assert s.database_url == "sqlite:////var/lib/cadnode/cadnode.db"


def test_environment_overrides_file(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text('[cadnode]\nport = 2000\nae_title = "FROMFILE"\n'
                   'destinations = ["PACS@10.0.0.1:104"]\n')
    s = load_settings(cfg, environ={"CADNODE_PORT": "3000", "CADNODE_STABLE_SECONDS": "12.5",
                                    "CADNODE_DESTINATIONS": "A@h1:1, B@h2:2"})
    assert s.port == 3000 and s.ae_title == "FROMFILE" and s.stable_seconds == 12.5
    assert s.destinations == (Destination("A", "h1", 1), Destination("B", "h2", 2))


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"CADNODE_PORT": "eleven"}, "CADNODE_PORT"),
        ({"CADNODE_PORT": "70000"}, "CADNODE_PORT"),
        ({"CADNODE_AE_TITLE": "A_TITLE_THAT_IS_TOO_LONG"}, "CADNODE_AE_TITLE"),
        ({"CADNODE_DESTINATIONS": "PACS@host"}, "CADNODE_DESTINATIONS"),
        ({"CADNODE_BACKEND": "tensorflow"}, "CADNODE_BACKEND"),
        ({"CADNODE_DB_URL": "mysql://x"}, "CADNODE_DB_URL"),
        ({"CADNODE_STABLE_SECONDS": "-1"}, "CADNODE_STABLE_SECONDS"),
        ({"CADNODE_MODEL": "/no/such/package"}, "CADNODE_MODEL"),
        ({"CADNODE_IMPLANT_VIEWS": "sometimes"}, "CADNODE_IMPLANT_VIEWS"),
        ({"CADNODE_NETWORK_TIMEOUT": "0"}, "CADNODE_NETWORK_TIMEOUT"),
        ({"CADNODE_ACSE_TIMEOUT": "99999"}, "CADNODE_ACSE_TIMEOUT"),
        ({"CADNODE_MAX_ASSOCIATIONS_PER_PEER": "0"}, "CADNODE_MAX_ASSOCIATIONS_PER_PEER"),
        ({"CADNODE_PRECISION": "fp8"}, "CADNODE_PRECISION"),
        ({"CADNODE_BACKEND": "torch", "CADNODE_PRECISION": "int8"}, "CADNODE_PRECISION"),
        ({"CADNODE_BACKEND": "onnxruntime", "CADNODE_PRECISION": "fp16"}, "CADNODE_PRECISION"),
        ({"CADNODE_MAX_VIEWS": "0"}, "CADNODE_MAX_VIEWS"),
        ({"CADNODE_BACKEND": "triton"}, "CADNODE_TRITON_URL"),
        ({"CADNODE_BACKEND": "triton", "CADNODE_TRITON_URL": "ftp://x:1"}, "CADNODE_TRITON_URL"),
    ],
)
def test_bad_setting_names_itself(env: dict[str, str], named: str, tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=named):
        load_settings(environ=env)


def test_bad_setting_stops_startup_with_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cadnode", "serve"], cwd=tmp_path, capture_output=True, text=True,
        env={"CADNODE_PORT": "eleven", "PATH": "/usr/bin:/bin"}, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "cadnode: bad setting: CADNODE_PORT: 'eleven' is not a valid int"
    ]


def test_engine_settings_reach_every_backend_that_takes_them(tmp_path: Path) -> None:
    from cadnode.config import engine_options
    from cadnode.runtime import OPTIONS

    s = load_settings(environ={"CADNODE_HOME": str(tmp_path), "CADNODE_BACKEND": "triton",
                               "CADNODE_TRITON_URL": "grpc://gpu:8001", "CADNODE_PRECISION": "",
                               "CADNODE_TRITON_MODEL": "m", "CADNODE_TRITON_TIMEOUT": "5",
                               "CADNODE_MAX_VIEWS": "4"})
    options = engine_options(s)
    assert options == {"home": tmp_path, "max_views": 4, "timeout_s": 5.0,
                       "url": "grpc://gpu:8001", "model": "m"}
    taken = {name for names in OPTIONS.values() for name in names}
    assert set(options) <= taken  # load_engine refuses options no backend takes
    assert load_settings(environ={"CADNODE_BACKEND": "tensorrt", "CADNODE_PRECISION": "int8",
                                  "CADNODE_HOME": str(tmp_path)}).precision == "int8"


def test_secret_from_file_is_never_echoed(tmp_path: Path) -> None:
    secret = tmp_path / "db_url"
    secret.write_text("postgresql+psycopg://cad:s3cret-pw@db.example/cad\n")
    s = load_settings(environ={"CADNODE_DB_URL_FILE": str(secret)})
    assert s.database_url == "postgresql+psycopg://cad:s3cret-pw@db.example/cad"
    assert "s3cret-pw" not in repr(s)
    with pytest.raises(SettingsError, match="CADNODE_DB_URL_FILE: cannot read"):
        load_settings(environ={"CADNODE_DB_URL_FILE": str(tmp_path / "missing")})


def test_access_and_limit_settings(tmp_path: Path) -> None:
    s = load_settings(environ={"CADNODE_ALLOWED_AES": "MOD1, MOD2", "CADNODE_REQUIRE_CALLED_AE":
                               "no", "CADNODE_MAX_ASSOCIATIONS": "4", "CADNODE_MIN_FREE_MB": "1"})
    assert s.allowed_aes == ("MOD1", "MOD2") and s.require_called_ae is False
    assert s.max_associations == 4 and s.min_free_mb == 1.0
    with pytest.raises(SettingsError, match="CADNODE_TLS_CERT and CADNODE_TLS_KEY"):
        load_settings(environ={"CADNODE_TLS_CERT": str(tmp_path)})
    with pytest.raises(SettingsError, match="CADNODE_REQUIRE_CALLED_AE"):
        load_settings(environ={"CADNODE_REQUIRE_CALLED_AE": "maybe"})


def test_destinations_choose_their_result_kinds() -> None:
    from cadnode.results import BUILDERS
    from cadnode.results.enum import ResultKind

    assert tuple(BUILDERS) == tuple(ResultKind)  # one builder per kind the settings know
    pacs, ohif = load_settings(
        environ={"CADNODE_DESTINATIONS": "PACS@pacs:104,OHIF@viewer:4242/tid1500+sc"}
    ).destinations
    assert pacs.kinds == () and all(pacs.takes(k) for k in ResultKind)
    assert ohif.kinds == ("tid1500", "sc") and ohif.takes("sc") and not ohif.takes("cad_sr")
    with pytest.raises(SettingsError, match="unknown result kind"):
        load_settings(environ={"CADNODE_DESTINATIONS": "A@h:1/pdf"})


def test_a_relative_home_is_made_absolute_at_load_time(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Under systemd the working directory is /: a relative home must not drift with it."""
    monkeypatch.chdir(tmp_path)
    s = load_settings(environ={"CADNODE_HOME": "node"})
    monkeypatch.chdir("/")
    assert s.home == tmp_path / "node"
    assert s.spool_dir == tmp_path / "node" / "spool"
    assert s.database_url == f"sqlite:///{tmp_path / 'node' / 'cadnode.db'}"


def test_a_home_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = subprocess.run(
        [sys.executable, "-m", "cadnode", "serve"], cwd=tmp_path, capture_output=True,
        text=True, env={"CADNODE_HOME": str(blocker / "home"), "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"cadnode: bad setting: CADNODE_HOME: cannot write in {blocker / 'home'}: "
        "Not a directory"]
