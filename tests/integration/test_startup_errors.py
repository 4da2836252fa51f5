"""`cadnode serve` that cannot start says why in one line naming the setting, never a
traceback: port in use, unwritable home, corrupt model package, bad numbers."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cadnode.runtime import DEFAULT_MODEL_PACKAGE


def serve(tmp_path: Path, **env: str) -> tuple[int, str]:
    full = {"PATH": "/usr/bin:/bin", "CADNODE_HOME": str(tmp_path / "home"),
            "CADNODE_PORT": "0", "OMP_NUM_THREADS": "1", **env}
    proc = subprocess.run([sys.executable, "-m", "cadnode", "serve"], cwd=tmp_path, env=full,
                          capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    return proc.returncode, proc.stderr


def last_line(stderr: str) -> str:
    """The error line (an INFO line about the model may come before it)."""
    lines = stderr.strip().splitlines()
    assert lines and all(" INFO " in line for line in lines[:-1]), stderr
    return lines[-1]


@pytest.fixture
def busy_port() -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("0.0.0.0", 0))
    sock.listen()
    yield sock.getsockname()[1]
    sock.close()


def test_port_in_use(tmp_path: Path, busy_port: int) -> None:
    rc, err = serve(tmp_path, CADNODE_PORT=str(busy_port))
    assert rc == 2
    assert last_line(err) == (f"cadnode: bad setting: CADNODE_PORT: 0.0.0.0:{busy_port} is "
                              "already in use (another cadnode or DICOM server is listening "
                              "there); stop it or choose another port")


def test_a_home_that_is_not_a_folder(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    rc, err = serve(tmp_path, CADNODE_HOME=str(tmp_path / "file" / "home"))
    assert rc == 2 and err.strip() == (f"cadnode: bad setting: CADNODE_HOME: cannot write in "
                                       f"{tmp_path / 'file' / 'home'}: Not a directory")
    home = tmp_path / "home2"
    home.mkdir()
    (home / "spool").write_text("a file where the spool should be")
    rc, err = serve(tmp_path, CADNODE_HOME=str(home))
    assert rc == 2 and err.strip() == (f"cadnode: bad setting: CADNODE_HOME: cannot write in "
                                       f"{home / 'spool'}: File exists")


def test_a_read_only_home(tmp_path: Path) -> None:
    """A home on a read-only file system (root ignores permission bits, not this)."""
    home = tmp_path / "ro"
    home.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(home)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a read-only file system here: {r.stderr.strip()}")
    try:
        rc, err = serve(tmp_path, CADNODE_HOME=str(home))
    finally:
        subprocess.run(["umount", "-l", str(home)], check=True)
    assert rc == 2 and err.strip() == (f"cadnode: bad setting: CADNODE_HOME: cannot write in "
                                       f"{home}: Read-only file system")


def _package(tmp_path: Path) -> Path:
    pkg = tmp_path / "pkg"
    shutil.copytree(DEFAULT_MODEL_PACKAGE, pkg)
    return pkg


def test_a_truncated_model(tmp_path: Path) -> None:
    pkg = _package(tmp_path)
    data = (pkg / "model.onnx").read_bytes()
    (pkg / "model.onnx").write_bytes(data[: len(data) // 3])
    rc, err = serve(tmp_path, CADNODE_MODEL=str(pkg))
    assert rc == 2
    assert last_line(err) == (f"cadnode: bad setting: CADNODE_MODEL: model package {pkg}: "
                              "checksum mismatch for model.onnx (file changed or corrupt)")


def test_a_garbage_model_whose_checksum_matches(tmp_path: Path) -> None:
    pkg = _package(tmp_path)
    garbage = bytes(range(256)) * 40
    (pkg / "model.onnx").write_bytes(garbage)
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["sha256"]["model.onnx"] = hashlib.sha256(garbage).hexdigest()
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    rc, err = serve(tmp_path, CADNODE_MODEL=str(pkg))
    assert rc == 2
    line = last_line(err)
    assert line.startswith(f"cadnode: bad setting: CADNODE_MODEL: model package {pkg} does "
                           "not load: "), line


def test_a_manifest_that_is_not_json(tmp_path: Path) -> None:
    pkg = _package(tmp_path)
    (pkg / "manifest.json").write_text('{"format_version": 1,')
    rc, err = serve(tmp_path, CADNODE_MODEL=str(pkg))
    assert rc == 2
    assert last_line(err).startswith(f"cadnode: bad setting: CADNODE_MODEL: model package "
                                     f"{pkg}: manifest.json is not readable JSON")


@pytest.mark.parametrize(("name", "value", "says"), [
    ("CADNODE_STABLE_SECONDS", "-5", "CADNODE_STABLE_SECONDS: -5 must be zero or more"),
    ("CADNODE_MIN_FREE_MB", "-1.5", "CADNODE_MIN_FREE_MB: -1.5 must be zero or more"),
    ("CADNODE_POLL_SECONDS", "soon", "CADNODE_POLL_SECONDS: 'soon' is not a valid float"),
    ("CADNODE_RETENTION_DAYS", "inf", "CADNODE_RETENTION_DAYS: 'inf' is not a finite number"),
])
def test_bad_numbers(tmp_path: Path, name: str, value: str, says: str) -> None:
    rc, err = serve(tmp_path, **{name: value})
    assert rc == 2 and err.strip() == f"cadnode: bad setting: {says}"


def test_a_misspelt_variable_is_warned_about_at_start_up(tmp_path: Path, busy_port: int) -> None:
    rc, err = serve(tmp_path, CADNODE_PORT=str(busy_port), CADNODE_DESTINATION="PACS@h:104")
    assert rc == 2
    (warning,) = [line for line in err.splitlines() if "CADNODE_DESTINATION " in line]
    assert warning.endswith("WARNING cadnode.config: unknown environment variable "
                            "CADNODE_DESTINATION is ignored; did you mean CADNODE_DESTINATIONS?")


def test_certificates_that_do_not_load(tmp_path: Path) -> None:
    """Files that exist but are not PEM: the listener's, and the sending side's."""
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    rc, err = serve(tmp_path, CADNODE_TLS_CERT=str(junk), CADNODE_TLS_KEY=str(junk))
    assert rc == 2 and err.strip().startswith(
        "cadnode: bad setting: CADNODE_TLS_CERT / CADNODE_TLS_KEY / CADNODE_TLS_CA: the "
        "certificate, key or CA file does not load ("), err
    rc, err = serve(tmp_path, CADNODE_DESTINATIONS="PACS@127.0.0.1:11112;tls",
                    CADNODE_SEND_TLS_CA=str(junk))
    assert rc == 2 and err.strip().startswith(
        "cadnode: bad setting: CADNODE_SEND_TLS_CA / CADNODE_SEND_TLS_CERT / "
        "CADNODE_SEND_TLS_KEY: the certificate, key or CA file does not load ("), err
