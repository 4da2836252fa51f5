"""Helpers for tests that run real processes."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cadnode.demo import stop_process


def require(*commands: str) -> None:
    """Fail in CI, skip elsewhere, when a real peer is not installed."""
    missing = [c for c in commands if not shutil.which(c)]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"missing real peer(s): {', '.join(missing)}")
        pytest.skip(f"missing real peer(s): {', '.join(missing)}")


@contextmanager
def small_file_system(folder: Path, size: str) -> Iterator[Path]:
    """``folder`` as a tmpfs of ``size`` (e.g. "4m") for the block: a disk that really fills
    up. Mounting needs root (as here and in CI); elsewhere the test is skipped, saying why."""
    folder.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {r.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def port_answers(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``port`` now."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


class NodeProcess:
    """`cadnode serve` as a real process configured only through CADNODE_* variables.

    With ``port=0`` the node takes a port from the OS and :meth:`wait_ready` reads which from
    its start-up line (no port is handed on between a probe and the node); restarts then keep
    that port."""

    def __init__(self, home: Path, port: int, env: dict[str, str],
                 cwd: Path | None = None, command: tuple[str, ...] = ("serve",),
                 log: Path | None = None) -> None:
        self.home, self.port, self.cwd, self.command = home, port, cwd, command
        self.log = log or home.parent / f"{home.name}.log"
        full = dict(os.environ)
        full.update({"CADNODE_HOME": str(home), "CADNODE_PORT": str(port), **env})
        self.env = full
        self._fh = open(self.log, "ab")  # noqa: SIM115
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "cadnode", *self.command],
                                     env=self.env, stdout=self._fh, stderr=subprocess.STDOUT,
                                     cwd=self.cwd)

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind, as a power cut would leave it."""
        self.proc.kill()
        self.proc.wait()

    def rss_peak_kib(self) -> int:
        """The process's peak resident memory (VmHWM)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise RuntimeError("no VmHWM")

    def wait_ready(self, timeout: float = 120) -> None:
        """Until the node answers C-ECHO (``cadnode worker``: until its start-up line)."""
        from cadnode.demo import wait_for_echo

        try:
            if self.command[0] == "worker":
                self._wait_for_line(r"cadnode: \d+ worker\(s\), model", timeout)
                return
            if self.port == 0:
                self._read_bound_port(timeout)
            wait_for_echo(self.port, "CADNODE", timeout, self.proc)
        except Exception:
            print(self.log.read_text(errors="replace"))
            raise

    def _wait_for_line(self, pattern: str, timeout: float) -> None:
        def said() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"`cadnode {' '.join(self.command)}` exited with "
                                   f"{self.proc.returncode}")
            return re.search(pattern, self.log.read_text(errors="replace")) is not None

        if not wait_until(said, timeout, interval=0.05):
            raise RuntimeError(f"`cadnode {' '.join(self.command)}` did not start")

    def _read_bound_port(self, timeout: float) -> None:
        found: list[int] = []

        def bound() -> bool:
            text = self.log.read_text(errors="replace")
            m = re.search(r"listening as \S+ on [^:\s]+:(\d+)", text)
            if m:
                found.append(int(m.group(1)))
            return bool(m) or self.proc.poll() is not None

        if not wait_until(bound, timeout, interval=0.05) or not found:
            raise RuntimeError("the node did not say which port it is listening on")
        self.port = found[0]
        self.env["CADNODE_PORT"] = str(self.port)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cadnode", *args], env=self.env,
                              capture_output=True, text=True, timeout=120, cwd=self.cwd)

    def stop(self) -> None:
        stop_process(self.proc)
        self._fh.close()


def wait_until(predicate, timeout: float, interval: float = 0.25) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def write_small_study(folder: Path, study_uid: str, rows: int = 384, cols: int = 192) -> list[Path]:
    """A 4-view MG study with small synthetic images: cheap to push many times."""
    from tests.robustness.corpus import synthetic_mg

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, (side, view) in enumerate([("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")]):
        ds = synthetic_mg(study_uid, f"{study_uid}.{n + 1}", side, view, rows=rows, cols=cols)
        path = folder / f"{n + 1}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def empty_database(db) -> None:  # type: ignore[no-untyped-def]
    """Drop every table of ``db`` (cadnode's, Alembic's version table, anything else)."""
    from sqlalchemy import MetaData

    tables = MetaData()
    tables.reflect(db.engine)
    tables.drop_all(db.engine)
