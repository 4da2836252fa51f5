"""`cadnode config` (each setting's value and source, secrets masked), unknown CADNODE_*
variables, and the log: text or JSON lines, study and job ids on each line, rotation."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cadnode.config import (
    SettingsError,
    known_variables,
    load_settings,
    load_settings_with_sources,
    unknown_variables,
)


def test_each_setting_says_where_it_came_from(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text('[cadnode]\nport = 2000\nae_title = "FROMFILE"\n')
    secret = tmp_path / "token"
    secret.write_text("t0ken\n")
    s, sources = load_settings_with_sources(cfg, environ={
        "CADNODE_PORT": "3000", "CADNODE_HTTP_TOKEN_FILE": str(secret)})
    assert (s.port, s.ae_title, s.http_token) == (3000, "FROMFILE", "t0ken")
    assert sources["port"] == "CADNODE_PORT"
    assert sources["ae_title"] == str(cfg.absolute())
    assert sources["http_token"] == "CADNODE_HTTP_TOKEN_FILE"
    assert sources["backend"] == "default"
    assert load_settings(cfg, environ={"CADNODE_PORT": "3000"}).port == 3000  # one loader


def test_a_negative_number_says_so() -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(environ={"CADNODE_STABLE_SECONDS": "-5"})
    assert str(err.value) == "CADNODE_STABLE_SECONDS: -5 must be zero or more"
    with pytest.raises(SettingsError, match="CADNODE_RETENTION_DAYS: 'nan' is not a finite"):
        load_settings(environ={"CADNODE_RETENTION_DAYS": "nan"})
    with pytest.raises(SettingsError, match="CADNODE_LOG_FORMAT: 'xml' is not one of text"):
        load_settings(environ={"CADNODE_LOG_FORMAT": "xml"})


def test_unknown_variables_are_named_with_the_closest_setting() -> None:
    env = {"CADNODE_DESTINATION": "PACS@h:104", "CADNODE_PORT": "1", "CADNODE_XYZZY": "1",
           "CADNODE_DB_URL_FILE": "/x", "CADNODE_TEST_PG": "x", "CADNODE_FUZZ_SEED": "1",
           "OTHER": "1"}
    assert unknown_variables(env) == [
        "unknown environment variable CADNODE_DESTINATION is ignored; did you mean "
        "CADNODE_DESTINATIONS?",
        "unknown environment variable CADNODE_XYZZY is ignored"]


def test_every_cadnode_variable_the_code_reads_is_known() -> None:
    """Each CADNODE_* name written in the code base is a setting, a *_FILE secret, one of
    OTHER_VARIABLES, or not an environment variable at all (AE titles, prefixes)."""
    import re

    root = Path(__file__).resolve().parents[2]
    names: set[str] = set()
    for folder in ("cadnode", "train", "trt_engines", "tests"):
        for path in (root / folder).rglob("*.py"):
            names |= set(re.findall(r"CADNODE_[A-Z0-9_]*[A-Z0-9]", path.read_text()))
    not_variables = {"CADNODE_SCU", "CADNODE_DEMO", "CADNODE_SEND_TLS", "CADNODE_XYZZY",
                     "CADNODE_DESTINATION", "CADNODE_DESTINATIONZ"}
    assert names - known_variables() - not_variables == set()


def test_cadnode_config_masks_secrets(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "CADNODE_HOME": str(tmp_path),
           "CADNODE_DB_URL": "postgresql+psycopg://cad:s3cret-pw@db.example/cad",
           "CADNODE_HTTP_TOKEN": "t0ken-value", "CADNODE_DESTINATION": "PACS@h:104"}
    r = subprocess.run([sys.executable, "-m", "cadnode", "config", "--json"], env=env,
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    rows = {row["variable"]: row for row in doc["settings"]}
    assert rows["CADNODE_DB_URL"]["value"] == "postgresql+psycopg://cad:********@db.example/cad"
    assert rows["CADNODE_DB_URL"]["source"] == "CADNODE_DB_URL"
    assert rows["CADNODE_HTTP_TOKEN"]["value"] == "********"
    assert rows["CADNODE_PORT"] == {"setting": "port", "variable": "CADNODE_PORT",
                                    "value": 11112, "source": "default"}
    assert "s3cret-pw" not in r.stdout and "t0ken-value" not in r.stdout
    assert "did you mean CADNODE_DESTINATIONS" in doc["warnings"][0]
    r = subprocess.run([sys.executable, "-m", "cadnode", "config", "--log-level", "DEBUG"],
                       env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0 and "s3cret-pw" not in r.stdout + r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("CADNODE_LOG_LEVEL "))
    assert line.split()[1:] == ["DEBUG", "[--log-level]"]
    assert r.stderr.strip().splitlines() == [
        "warning: unknown environment variable CADNODE_DESTINATION is ignored; did you mean "
        "CADNODE_DESTINATIONS?"]


@pytest.fixture
def restore_logging():  # type: ignore[no-untyped-def]
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    cadnode_level = logging.getLogger("cadnode").level
    yield
    for h in root.handlers:
        h.close()
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("cadnode").setLevel(cadnode_level)


def test_json_lines_carry_the_study_and_job(tmp_path: Path, restore_logging) -> None:  # type: ignore[no-untyped-def]
    from cadnode.cli.common import setup_logging
    from cadnode.logs import log_context

    s = load_settings(environ={"CADNODE_HOME": str(tmp_path), "CADNODE_LOG_FORMAT": "json"})
    setup_logging(s)
    log = logging.getLogger("cadnode.test")
    with log_context(study_uid="1.2.3", job_id=7):
        log.info("inside %s", "a job")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("it failed")
    log.warning("outside", extra={"study_uid": "9.9"})
    logging.getLogger("pynetdicom").info("quiet")  # third parties: warnings and up only
    for h in logging.getLogger().handlers:
        h.flush()
    lines = [json.loads(x) for x in (tmp_path / "logs" / "cadnode.log").read_text().splitlines()]
    assert [(x["level"], x["message"], x.get("study_uid"), x.get("job_id")) for x in lines] == [
        ("INFO", "inside a job", "1.2.3", 7), ("ERROR", "it failed", "1.2.3", 7),
        ("WARNING", "outside", "9.9", None)]
    assert lines[0]["logger"] == "cadnode.test" and lines[0]["time"].endswith("+00:00")
    assert "RuntimeError: boom" in lines[1]["exception"]


def test_the_log_file_rotates(tmp_path: Path, restore_logging,  # type: ignore[no-untyped-def]
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from cadnode.cli import common

    monkeypatch.setattr(common, "LOG_FILE_BYTES", 2000)
    log_file = tmp_path / "elsewhere" / "node.log"
    s = load_settings(environ={"CADNODE_HOME": str(tmp_path / "home"),
                               "CADNODE_LOG_FILE": str(log_file)})
    common.setup_logging(s)
    log = logging.getLogger("cadnode.test")
    for n in range(300):
        log.info("line %d %s", n, "x" * 40)
    for h in logging.getLogger().handlers:
        h.flush()
    files = sorted(p.name for p in log_file.parent.iterdir())
    assert files == ["node.log", "node.log.1", "node.log.2", "node.log.3", "node.log.4",
                     "node.log.5"]
    assert all(p.stat().st_size <= 2100 for p in log_file.parent.iterdir())
    assert not (tmp_path / "home" / "logs").exists()
    assert log_file.read_text().splitlines()[-1].endswith("line 299 " + "x" * 40)


def test_text_format_names_ids_the_message_does_not() -> None:
    from cadnode.logs import TextFormatter

    def line(msg: str, **ids: object) -> str:
        record = logging.LogRecord("cadnode.x", logging.INFO, __file__, 1, msg, (), None)
        for k, v in ids.items():
            setattr(record, k, v)
        return TextFormatter().format(record)

    assert line("study 1.2.3: read", study_uid="1.2.3", job_id=7).endswith(
        "cadnode.x: study 1.2.3: read [job=7]")
    assert line("decoding", study_uid="1.2.3", job_id=7).endswith(
        "decoding [study=1.2.3 job=7]")
    assert line("plain").endswith("cadnode.x: plain")


def test_log_file_empty_means_stderr_only(tmp_path: Path, restore_logging) -> None:  # type: ignore[no-untyped-def]
    from logging.handlers import RotatingFileHandler

    from cadnode.cli.common import setup_logging

    s = load_settings(environ={"CADNODE_HOME": str(tmp_path), "CADNODE_LOG_FILE": ""})
    setup_logging(s)
    assert not any(isinstance(h, RotatingFileHandler) for h in logging.getLogger().handlers)
    assert not (tmp_path / "logs").exists()


def test_database_urls_never_show_a_password() -> None:
    from cadnode.config import mask_url

    assert mask_url("postgresql+psycopg://u:p@ss@db:5432/cadnode") == \
        "postgresql+psycopg://u:********@db:5432/cadnode"  # an "@" in the password: all hidden
    assert mask_url("postgresql:///cadnode?user=u&password=s3cret&sslmode=require") == \
        "postgresql:///cadnode?user=u&password=********&sslmode=require"
    assert mask_url("postgresql://u@db/cadnode") == "postgresql://u@db/cadnode"
    assert mask_url("sqlite:////var/lib/cadnode/cadnode.db") == \
        "sqlite:////var/lib/cadnode/cadnode.db"
