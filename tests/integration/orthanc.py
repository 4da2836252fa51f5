"""A real Orthanc (Debian package) on loopback with a throw-away storage, for the tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest

from cadnode.demo import free_port, stop_process

ORTHANC = "/usr/sbin/Orthanc"


class Orthanc:
    def __init__(self, http_port: int, dicom_port: int, proc: subprocess.Popen[bytes],
                 log: Path) -> None:
        self.http_port, self.dicom_port, self.proc, self.log = http_port, dicom_port, proc, log

    def request(self, path: str, body: bytes | None = None) -> Any:
        url = f"http://127.0.0.1:{self.http_port}{path}"
        req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - loopback only
            data = resp.read()
        return json.loads(data.decode("utf-8")) if data else None

    def get(self, path: str) -> Any:
        return self.request(path)

    def dataset(self, instance_id: str) -> pydicom.Dataset:
        """An instance as Orthanc stores it, read back with pydicom."""
        url = f"http://127.0.0.1:{self.http_port}/instances/{instance_id}/file"
        with urllib.request.urlopen(url, timeout=30) as resp:  # noqa: S310 - loopback only
            from io import BytesIO

            return pydicom.dcmread(BytesIO(resp.read()))

    def count_instances(self) -> int:
        return int(self.get("/statistics")["CountInstances"])


def _wait_for_rest(orthanc: Orthanc, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if orthanc.proc.poll() is not None:
            raise RuntimeError("Orthanc exited:\n" + orthanc.log.read_text(errors="replace"))
        try:
            orthanc.get("/system")
            return
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.2)
    raise TimeoutError("Orthanc REST API did not come up:\n" + orthanc.log.read_text(
        errors="replace"))


@contextmanager
def run_orthanc(folder: Path, modalities: dict[str, list[Any]] | None = None) -> Iterator[Orthanc]:
    """A fresh Orthanc with its default storage settings (OverwriteInstances false), stopped
    and its storage dropped afterwards. Skips only when the binary is absent; fails under CI."""
    if not os.path.exists(ORTHANC):
        if os.environ.get("CI"):
            pytest.fail(f"{ORTHANC} not installed (Debian package orthanc)")
        pytest.skip(f"{ORTHANC} not installed (Debian package orthanc)")
    http_port, dicom_port = free_port(), free_port()
    while dicom_port == http_port:
        dicom_port = free_port()
    config = {
        "Name": "cadnode-test",
        "StorageDirectory": str(folder / "orthanc-storage"),
        "IndexDirectory": str(folder / "orthanc-index"),
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomModalities": modalities or {},
        "Plugins": [],
    }
    cfg = folder / "orthanc.json"
    cfg.write_text(json.dumps(config, indent=2), encoding="utf-8")
    log = folder / "orthanc.log"
    fh = open(log, "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen([ORTHANC, str(cfg)], stdout=fh, stderr=subprocess.STDOUT, cwd=folder)
    server = Orthanc(http_port, dicom_port, proc, log)
    try:
        _wait_for_rest(server)
        yield server
    finally:
        stop_process(proc)
        fh.close()
        shutil.rmtree(folder / "orthanc-storage", ignore_errors=True)
