"""Helpers for tests that run real processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest


def require(*commands: str) -> None:
    """Fail in CI, skip elsewhere, when a real peer is not installed."""
    missing = [c for c in commands if not shutil.which(c)]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"missing real peer(s): {', '.join(missing)}")
        pytest.skip(f"missing real peer(s): {', '.join(missing)}")


class NodeProcess:
    """`cadnode serve` as a real process configured only through CADNODE_* variables."""

    def __init__(self, home: Path, port: int, env: dict[str, str]) -> None:
        self.home, self.port = home, port
        self.log = home.parent / f"{home.name}.log"
        full = dict(os.environ)
        full.update({"CADNODE_HOME": str(home), "CADNODE_PORT": str(port), **env})
        self.env = full
        self._fh = open(self.log, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "cadnode", "serve"], env=full,
                                     stdout=self._fh, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120) -> None:
        from cadnode.demo import wait_for_echo

        try:
            wait_for_echo(self.port, "CADNODE", timeout, self.proc)
        except Exception:
            print(self.log.read_text(errors="replace"))
            raise

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cadnode", *args], env=self.env,
                              capture_output=True, text=True, timeout=120)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._fh.close()


def wait_until(predicate, timeout: float, interval: float = 0.25) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
