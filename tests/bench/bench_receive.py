"""Receive throughput: cadnode's listener against DCMTK storescp, same files, same sender.

    python -m tests.bench.bench_receive [--rounds 5]

storescu pushes the 4-view demo exam (about 40 MB, RLE) to each receiver in turn; the figure is
MB/s of acknowledged data, and the ratio is cadnode / storescp measured in the same run.
storescp runs with TCP_NODELAY=1 (Nagle otherwise stalls each response) and writes to disk
without fsync, so the ratio also prices cadnode's durability (fsync + committed row per image).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cadnode.demo import free_port, stop_process, write_demo_study


def push(port: int, files: list[Path], called: str) -> float:
    start = time.perf_counter()
    r = subprocess.run(["storescu", "-xr", "-aec", called, "127.0.0.1", str(port),
                        *map(str, files)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    return time.perf_counter() - start


def wait_port(port: int, called: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if subprocess.run(["echoscu", "-aec", called, "127.0.0.1", str(port)],
                          capture_output=True).returncode == 0:
            return
        time.sleep(0.2)
    raise TimeoutError(port)


def bench(rounds: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = write_demo_study(root / "exam")
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        out = {}
        port = free_port()

        def measure(cmd: list[str], called: str, env: dict[str, str] | None = None) -> float:
            receiver = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
            try:
                wait_port(port, called)
                return statistics.median(
                    megabytes / push(port, files, called) for _ in range(rounds))
            finally:
                stop_process(receiver)

        (root / "dcmtk").mkdir()
        out["storescp"] = measure(
            ["storescp", "+xa", "-od", str(root / "dcmtk"), str(port)], "ANY-SCP",
            dict(os.environ, TCP_NODELAY="1"))
        code = (
            "import sys, time; from pathlib import Path; "
            "from cadnode.dicom.listener import Listener; from cadnode.jobs.db import Database; "
            "from cadnode.jobs.queue import record_instance; "
            f"db = Database('sqlite:///{root}/bench.db'); db.create_schema(); "
            f"l = Listener(Path('{root}/spool'), lambda s: record_instance(db, s)); "
            f"l.start('127.0.0.1', {port}); time.sleep(3600)"
        )
        out["cadnode"] = measure([sys.executable, "-c", code], "CADNODE")
        out["megabytes"] = megabytes
        return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    r = bench(args.rounds)
    print(f"4-view exam, {r['megabytes']:.1f} MB, RLE, storescu -> receiver, median of "
          f"{args.rounds}")
    print(f"  DCMTK storescp : {r['storescp']:7.1f} MB/s")
    ratio = r["cadnode"] / r["storescp"]
    print(f"  cadnode        : {r['cadnode']:7.1f} MB/s  (ratio {ratio:.2f})")


if __name__ == "__main__":
    main()
