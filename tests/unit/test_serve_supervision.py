"""``cadnode serve`` exits when a part of the node has stopped by itself (so systemd or
Kubernetes restart it) instead of keeping a live listener over a dead worker. These are the
real parts, stopped the ways they can stop."""

from __future__ import annotations

import threading
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler

from cadnode.cli.serve import _dead_part
from cadnode.dicom.listener import Listener


def alive_one() -> threading.Thread:
    t = threading.Thread(target=threading.Event().wait, daemon=True)
    t.start()
    return t


def test_each_stopped_part_is_named(tmp_path: Path) -> None:
    listener = Listener(tmp_path / "spool", on_stored=lambda _: None)
    listener.start("127.0.0.1", 0)
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait, daemon=True)
    worker.start()
    sched = BackgroundScheduler()
    sched.start()
    try:
        assert _dead_part(listener, [worker], sched) == ""
        assert _dead_part(None, [worker], sched) == ""  # `cadnode worker`: no listener
        assert _dead_part(listener, [], sched) == ""  # `cadnode listen`: no worker
        stop.set()
        worker.join()
        assert _dead_part(listener, [alive_one(), worker], sched) == "a worker"
        alive = threading.Thread(target=threading.Event().wait, daemon=True)
        alive.start()
        sched.shutdown()
        assert _dead_part(listener, [alive], sched) == "the scheduler"
        sched = BackgroundScheduler()
        sched.start()
        listener.stop()
        assert _dead_part(listener, [alive], sched) == "the listener"
    finally:
        listener.stop()
        if sched.running:
            sched.shutdown()
