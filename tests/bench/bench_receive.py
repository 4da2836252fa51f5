"""Receive throughput: cadnode's listener against DCMTK storescp and bare pynetdicom.

    python -m tests.bench.bench_receive [--images 40] [--rounds 3] [--senders 1,4]

The same DCMTK ``storescu`` processes push the same files to each receiver in turn: ``--images``
uncompressed 3328 x 2560 16-bit mammograms (17 MB each, the size of a Hologic image; pixels
from the real demo exam) and the same images as JPEG 2000 lossless, with 1 and 4 concurrent
senders (the images split between them); and the 4-view demo exam as it is (RLE lossless, the
same files each push). Receivers:

- DCMTK ``storescp +B`` (TCP_NODELAY=1: bit-preserving, written straight to disk, no fsync): the
  reference of the ratio;
- pynetdicom alone: its chunked receive (``STORE_RECV_CHUNKED_DATASET``) and a handler that
  renames the file into a folder, no fsync and no database: what pynetdicom itself costs;
- the cadnode listener as the node runs it: its own writer, fsync of the file and its folder,
  the committed SQLite row, then Success.

The figure is MB/s of acknowledged data (median of ``--rounds`` pushes); the ratio is each
receiver over storescp in the same run.
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

import numpy as np
import pydicom
from pydicom.uid import JPEG2000Lossless, generate_uid

from cadnode.demo import free_port, stop_process, write_demo_study
from tests.bench import report
from tests.bench.report import Table
from tests.helpers import wait_until

ROWS, COLUMNS = 3328, 2560
REFERENCE = "DCMTK storescp +B +xa"

_NODE = """
import sys, threading
from pathlib import Path
from cadnode.dicom.listener import Listener
from cadnode.jobs.db import Database
from cadnode.jobs.queue import record_instance
root = Path(sys.argv[1])
db = Database(f"sqlite:///{root}/bench.db"); db.create_schema()
Listener(root / "spool", lambda s: record_instance(db, s)).start("127.0.0.1", int(sys.argv[2]))
threading.Event().wait()
"""

_PYNETDICOM = """
import os, sys, threading
from pathlib import Path
from pynetdicom import AE, evt, _config
from pynetdicom.sop_class import DigitalMammographyXRayImageStorageForPresentation as MG
from pynetdicom.sop_class import Verification
from cadnode.dicom.listener import TRANSFER_SYNTAXES
_config.STORE_RECV_CHUNKED_DATASET = True
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
def store(event):
    os.replace(event.dataset_path, out / event.request.AffectedSOPInstanceUID)
    return 0
ae = AE("ANY-SCP"); ae.maximum_pdu_size = 131072
ae.add_supported_context(MG, TRANSFER_SYNTAXES); ae.add_supported_context(Verification)
ae.start_server(("127.0.0.1", int(sys.argv[2])), block=True,
                evt_handlers=[(evt.EVT_C_STORE, store)])
"""


def write_images(out: Path, count: int, syntax: str | None = None) -> list[Path]:
    """``count`` MG images of ROWS x COLUMNS from the demo exam's pixels, each with its own
    UIDs, uncompressed or encoded once in ``syntax`` (the copies share the codestream)."""
    demo = write_demo_study(out / "demo")
    src = pydicom.dcmread(demo[0])
    pixels = np.zeros((ROWS, COLUMNS), np.uint16)
    a = src.pixel_array[:ROWS, :COLUMNS]
    pixels[: a.shape[0], : a.shape[1]] = a
    src.Rows, src.Columns = ROWS, COLUMNS
    src.PixelData = pixels.tobytes()
    src.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    if syntax is not None:
        src.compress(syntax)
    study = generate_uid()
    paths = []
    for n in range(count):
        src.StudyInstanceUID = study
        src.SOPInstanceUID = generate_uid()
        src.file_meta.MediaStorageSOPInstanceUID = src.SOPInstanceUID
        src.InstanceNumber = n + 1
        path = out / f"{n:03d}.dcm"
        src.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def push(port: int, files: list[Path], called: str, senders: int,
         propose: str = "-xe") -> float:
    """Seconds for ``senders`` storescu processes to have every file acknowledged."""
    start = time.perf_counter()
    procs = [subprocess.Popen(["storescu", propose, "-aec", called, "127.0.0.1", str(port),
                               *map(str, files[k::senders])],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for k in range(senders)]
    errors = [p.communicate()[1] for p in procs]
    elapsed = time.perf_counter() - start
    for p, err in zip(procs, errors, strict=True):
        if p.returncode != 0 or b"E: " in err:
            raise RuntimeError(err.decode(errors="replace")[-2000:])
    return elapsed


def wait_port(port: int, called: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Until the receiver answers C-ECHO (DCMTK echoscu); its exit fails at once."""
    def answers() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"the receiver exited with {proc.returncode}")
        return subprocess.run(["echoscu", "-aec", called, "127.0.0.1", str(port)],
                              capture_output=True).returncode == 0

    if not wait_until(answers, timeout, 0.1):
        raise TimeoutError(port)


def receivers(root: Path, port: int) -> dict[str, tuple[list[str], str, dict[str, str]]]:
    env = dict(os.environ, TCP_NODELAY="1")
    (root / "dcmtk").mkdir(parents=True, exist_ok=True)
    return {
        REFERENCE: (["storescp", "+B", "+xa", "-od", str(root / "dcmtk"), str(port)],
                    "ANY-SCP", env),
        "pynetdicom alone": ([sys.executable, "-c", _PYNETDICOM, str(root / "pynetdicom"),
                              str(port)], "ANY-SCP", dict(os.environ)),
        "cadnode listener": ([sys.executable, "-c", _NODE, str(root / "node"), str(port)],
                             "CADNODE", dict(os.environ)),
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--senders", default="1,4", help="comma-separated sender counts")


def run(args: argparse.Namespace) -> Table:
    counts = [int(n) for n in str(args.senders).split(",")]
    table = Table("receive", "Receive throughput", "python -m tests.bench.bench_receive",
                  ["images", "senders", "receiver", "MB/s", "x storescp"])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sets = {"uncompressed": ("-xe", write_images(root / "raw", args.images)),
                "JPEG 2000 lossless": ("-xv", write_images(root / "j2k", args.images,
                                                           JPEG2000Lossless)),
                "RLE lossless (the 4-view demo exam)": ("-xr", write_demo_study(root / "rle"))}
        for label, (propose, files) in sets.items():
            mb = sum(f.stat().st_size for f in files) / 1e6
            for senders in counts:
                rates: dict[str, float] = {}
                peers = receivers(root / f"rx-{label}-{senders}", free_port())
                for name, (cmd, called, env) in peers.items():
                    port = int(cmd[-1])
                    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL)
                    try:
                        wait_port(port, called, proc)
                        rates[name] = statistics.median(
                            mb / push(port, files, called, senders, propose)
                            for _ in range(args.rounds))
                    finally:
                        stop_process(proc)
                ref = rates[REFERENCE]
                for name, rate in rates.items():
                    table.add(f"{len(files)} {label}, {mb:.0f} MB", senders, name, rate,
                              f"{rate / ref:.2f}")
    table.notes.append(f"Median of {args.rounds} pushes per row; DCMTK storescu sends to each "
                       "receiver in PDUs of that receiver's maximum: storescp's default 16 KiB, "
                       "the 128 KiB of pynetdicom and the node.")
    return table


if __name__ == "__main__":
    report.main(__doc__, add_arguments, run)
