"""The storage SCP: receives mammograms, makes them durable, then acknowledges.

The listener knows no queue: once a file is fsync'd in the spool it calls ``on_stored`` (which
commits the database row) and answers Success only if that returned. Pixel data is never decoded
here; the dataset is streamed to a file in the spool's own folder and renamed into place.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pynetdicom import AE, evt
from pynetdicom.sop_class import _STORAGE_CLASSES as _STORAGE_BY_NAME
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from cadnode.config import Settings
from cadnode.dicom.receiving import SpoolingDIMSEProvider, receiving, refusal
from cadnode.dicom.selection import acquisition_datetime
from cadnode.dicom.spool import (
    MAX_NESTING,
    InstanceConflict,
    SpoolError,
    StoredInstance,
    StoreUnavailable,
    check_pixel_data_complete,
    commit_file,
    nesting_depth,
    spool_path,
    study_date,
)
from cadnode.dicom.transport import Guard, start_server
from cadnode.dicom.views import detect_view
from cadnode.uid import is_valid_uid

log = logging.getLogger(__name__)

MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
MG_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"
ACCEPTED_SOP_CLASSES = (MG_FOR_PRESENTATION, MG_FOR_PROCESSING)
#: Under the spool: one folder per listener process for the files being received.
INCOMING = ".incoming"
_STORAGE_CLASSES = frozenset(_STORAGE_BY_NAME.values())  # every storage SOP class UID

# pynetdicom, as acceptor, takes the first syntax of *its* list that the requestor offers: put the
# compressed ones and Explicit VR first so that senders never have to decompress or convert.
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.57",  # JPEG lossless
    "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "1.2.840.10008.1.2.4.51",  # JPEG extended (12 bit)
    "1.2.840.10008.1.2.5",  # RLE lossless
    "1.2.840.10008.1.2.1",  # Explicit VR little endian
    "1.2.840.10008.1.2.1.99",  # Deflated explicit VR little endian
    "1.2.840.10008.1.2.2",  # Explicit VR big endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2",  # Implicit VR little endian
]

# Storage status codes (PS3.4 B.2.3)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
UNABLE_TO_PROCESS = 0xC211  # what pynetdicom answers for a failing handler, too
DATASET_MISMATCH = 0xA900

OnStored = Callable[[StoredInstance], Any]
OnRefused = Callable[[str, str], Any]  # (message, study uid or "")


@dataclass(frozen=True)
class Policy:
    """Who may connect and how much they may send (see docs/conformance.md)."""

    allowed_aes: tuple[str, ...] = ()  # calling AE titles; empty: any
    require_called_ae: bool = True
    max_associations: int = 16
    max_pdu: int = 131072
    max_instance_bytes: int = 2048 * 2**20
    min_free_bytes: int = 200 * 2**20
    ssl_context: ssl.SSLContext | None = None
    max_associations_per_peer: int = 8
    network_timeout: float = 60.0  # a whole PDU, the TLS handshake, an idle association
    acse_timeout: float = 30.0  # association negotiation (ARTIM)
    dimse_timeout: float = 60.0  # waiting for the next DIMSE message

    @classmethod
    def from_settings(cls, s: Settings, ssl_context: ssl.SSLContext | None = None) -> Policy:
        """The listener's policy; ``ssl_context``: TLS, made from the listener's TLS files
        (cadnode.cli.common.tls_contexts)."""
        return cls(
            allowed_aes=s.allowed_aes,
            require_called_ae=s.require_called_ae,
            max_associations=s.max_associations,
            max_pdu=s.max_pdu,
            max_instance_bytes=int(s.max_instance_mb * 2**20),
            min_free_bytes=int(s.min_free_mb * 2**20),
            ssl_context=ssl_context,
            max_associations_per_peer=s.max_associations_per_peer,
            network_timeout=s.network_timeout,
            acse_timeout=s.acse_timeout,
            dimse_timeout=s.dimse_timeout,
        )


def server_ssl_context(cert: str, key: str, ca: str = "") -> ssl.SSLContext:
    """TLS for the listener; with ``ca`` the peer must present a certificate it signed."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if ca:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(ca)
    return ctx


class Listener:
    """A pynetdicom storage SCP bound to ``on_stored``."""

    def __init__(
        self,
        spool_root: Path,
        on_stored: OnStored,
        ae_title: str = "CADNODE",
        sop_classes: Sequence[str] = ACCEPTED_SOP_CLASSES,
        on_refused: OnRefused | None = None,
        policy: Policy | None = None,
    ) -> None:
        self.spool_root = spool_root
        # this process's own folder: listeners sharing a spool never touch each other's
        # partial files (cleanup_incoming and sweep remove others' only when long stale)
        self.incoming = spool_root / INCOMING / f"{socket.gethostname()}-{os.getpid()}"
        self.on_stored = on_stored
        self.on_refused = on_refused
        self.policy = policy or Policy()
        self.ae = AE(ae_title=ae_title)
        self.ae.maximum_pdu_size = self.policy.max_pdu
        self.ae.maximum_associations = self.policy.max_associations
        self.ae.require_called_aet = self.policy.require_called_ae
        self.ae.require_calling_aet = list(self.policy.allowed_aes)
        self.ae.network_timeout = self.policy.network_timeout
        self.ae.acse_timeout = self.policy.acse_timeout
        self.ae.dimse_timeout = self.policy.dimse_timeout
        self.ae.add_supported_context(Verification)
        for uid in sop_classes:
            self.ae.add_supported_context(uid, TRANSFER_SYNTAXES)
        self._server: Any = None

    def start(self, host: str, port: int) -> int:
        """Start serving in background threads; returns the bound port (useful with port 0)."""
        self.incoming.mkdir(parents=True, exist_ok=True)
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._spool_datasets),
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_C_ECHO, self._handle_echo),
            (evt.EVT_REJECTED, self._handle_rejected),
            (evt.EVT_RELEASED, self._handle_ended),
            (evt.EVT_ABORTED, self._handle_ended),
            (evt.EVT_CONN_CLOSE, self._drop_partial),
        ]
        p = self.policy
        guard = Guard(max_pdu=p.max_pdu, timeout=p.network_timeout,
                      max_per_peer=p.max_associations_per_peer, report=self._report,
                      tls=p.ssl_context)
        self._server = start_server(self.ae, (host, port), guard, handlers)
        bound = int(self._server.server_address[1])
        log.info("listening as %s on %s:%d%s", self.ae.ae_title, host, bound,
                 " (TLS)" if self.policy.ssl_context else "")
        return bound

    def _handle_ended(self, event: Any) -> None:
        """Record an association whose C-STOREs never reached us because we refused its classes.

        The sender gives up locally on a refused presentation context, so this is the only trace
        a PACS admin gets. Senders such as storescu propose dozens of classes they never use,
        and PACS such as Orthanc propose query/retrieve classes beside Verification for a plain
        C-ECHO, so only an association that asked nothing at all and was refused a storage
        class is reported.
        """
        assoc = event.assoc
        if getattr(assoc, "cadnode_requests", 0) or not assoc.is_acceptor:
            return
        refused = sorted({pydicom.uid.UID(str(cx.abstract_syntax)).name
                          for cx in assoc.rejected_contexts
                          if str(cx.abstract_syntax) in _STORAGE_CLASSES})
        if refused:
            rq = assoc.requestor
            self._report(f"association from {str(rq.ae_title).strip()}@{rq.address} sent "
                         f"nothing we accept; storage SOP class(es) refused: "
                         f"{', '.join(refused)}")

    def _handle_rejected(self, event: Any) -> None:
        """Say who was turned away and why; pynetdicom has already answered A-ASSOCIATE-RJ."""
        rq = event.assoc.requestor
        calling = str(rq.primitive.calling_ae_title).strip()
        called = str(rq.primitive.called_ae_title).strip()
        p = self.policy
        if p.allowed_aes and calling not in p.allowed_aes:
            why = f"calling AE {calling!r} is not allowed"
        elif p.require_called_ae and called != str(self.ae.ae_title).strip():
            why = f"called AE {called!r} is not this node ({self.ae.ae_title})"
        else:
            why = f"more than {p.max_associations} associations at once"
        self._report(f"association from {rq.address}:{rq.port} rejected: {why}")

    def _spool_datasets(self, event: Any) -> None:
        """Receive this association's datasets into files in ``incoming`` (see receiving.py)."""
        SpoolingDIMSEProvider.adopt(event.assoc.dimse, self.incoming,
                                    self.policy.max_instance_bytes)

    def _drop_partial(self, event: Any) -> None:
        """Remove the file of a dataset whose transfer the association's end cut off (abort,
        reset, close); it was never acknowledged."""
        target = receiving(event.assoc)
        if target is not None and target.path.exists():
            target.discard("the association ended before the dataset did")

    def sweep(self, older_than: float | None = None) -> int:
        """Remove files in ``.incoming`` that nothing has written to for ``older_than``
        seconds (default: four network timeouts), except those a live association of this
        listener is still receiving into, however slowly; other processes' folders are swept
        by age alone (a live association writes more often than its network timeout). Returns
        how many were removed."""
        server = self._server
        live = {t.path for a in (server.active_associations if server is not None else [])
                if (t := receiving(a)) is not None}
        limit = 4 * self.policy.network_timeout if older_than is None else older_than
        removed = _remove_files(self.incoming, older_than=limit, keep=live)
        removed += cleanup_incoming(self.spool_root, older_than=limit, keep=self.incoming)
        if removed:
            log.info("removed %d stale partial file(s) from the spool", removed)
        return removed

    @property
    def associations(self) -> int:
        """Associations whose threads are still alive (pynetdicom counts these against
        ``max_associations`` until they have wound down, just after a release)."""
        return 0 if self._server is None else len(self._server.active_associations)

    @property
    def serving(self) -> bool:
        """Whether the accept loop is running."""
        thread = None if self._server is None else self._server.serving_thread
        return thread is not None and thread.is_alive()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _report(self, message: str, study_uid: str = "") -> None:
        log.warning("%s", message, extra={"study_uid": study_uid or None})
        if self.on_refused is not None:
            try:
                self.on_refused(message, study_uid)
            except Exception:  # the refusal must still be answered
                log.exception("could not record the refusal")

    def _refuse(self, status: int, message: str, study_uid: str = "") -> int:
        self._report(f"C-STORE refused (0x{status:04X}): {message}", study_uid)
        return status

    @staticmethod
    def _count_request(event: Any) -> None:
        event.assoc.cadnode_requests = getattr(event.assoc, "cadnode_requests", 0) + 1

    def _handle_echo(self, event: Any) -> int:
        self._count_request(event)
        return SUCCESS

    def _handle_store(self, event: Any) -> int:
        tmp = Path(event.dataset_path)
        self._count_request(event)
        calling_ae = str(event.assoc.requestor.ae_title).strip()
        dropped = refusal(event)
        if dropped:  # a full disk, a dataset over the size limit: try again later, or elsewhere
            return self._refuse(OUT_OF_RESOURCES, f"instance from {calling_ae} not kept: "
                                f"{dropped}")
        size = tmp.stat().st_size
        free = shutil.disk_usage(self.spool_root).free
        if free < self.policy.min_free_bytes:
            return self._refuse(OUT_OF_RESOURCES, f"spool has {free // 2**20} MiB free, below "
                                f"the threshold of {self.policy.min_free_bytes // 2**20} MiB")
        try:
            ds = pydicom.dcmread(tmp, stop_before_pixels=True)
            sop_uid = str(ds.SOPInstanceUID)
            study_uid = str(ds.StudyInstanceUID)
            sop_class = str(ds.SOPClassUID)
            series_uid = str(ds.get("SeriesInstanceUID", "") or "")
            if series_uid and not is_valid_uid(series_uid):
                raise SpoolError(f"Series Instance UID {series_uid[:80]!r} is not a valid UID")
            if nesting_depth(ds) > MAX_NESTING:
                raise SpoolError(f"sequences nested deeper than {MAX_NESTING} levels")
            check_pixel_data_complete(tmp)
        except Exception as exc:  # whatever pydicom raises on a malformed dataset
            why = f"{type(exc).__name__}: {exc}" if not isinstance(exc, SpoolError) else str(exc)
            return self._refuse(CANNOT_UNDERSTAND, f"unreadable dataset from {calling_ae}: {why}")
        if sop_class != str(event.request.AffectedSOPClassUID) or sop_uid != str(
            event.request.AffectedSOPInstanceUID
        ):
            return self._refuse(
                DATASET_MISMATCH, "dataset UIDs differ from the C-STORE request", study_uid
            )
        try:
            final = spool_path(self.spool_root, study_uid, sop_uid)
        except SpoolError as exc:
            return self._refuse(CANNOT_UNDERSTAND, str(exc))
        replaces = final.exists()  # a repeat of an instance acknowledged before
        try:
            commit_file(tmp, final)
            stored = StoredInstance(
                path=final,
                size=size,
                sop_instance_uid=sop_uid,
                sop_class_uid=sop_class,
                transfer_syntax=str(event.context.transfer_syntax),
                study_uid=study_uid,
                series_uid=series_uid,
                patient_id=str(ds.get("PatientID", "")),
                accession=str(ds.get("AccessionNumber", "")),
                calling_ae=calling_ae,
                view=detect_view(ds),
                acquired=acquisition_datetime(ds),
                study_date=study_date(ds),
            )
            self.on_stored(stored)
        except InstanceConflict as exc:
            final.unlink(missing_ok=True)  # the earlier copy (another study's) stays as it was
            return self._refuse(DATASET_MISMATCH, str(exc), study_uid)
        except SpoolError as exc:  # a permanent fault of this request: not "try again later"
            return self._refuse(CANNOT_UNDERSTAND, str(exc), study_uid)
        except (OSError, StoreUnavailable) as exc:  # disk full, database down: retry later
            log.warning("could not persist %s: %s", sop_uid, exc,
                        extra={"study_uid": study_uid})
            return self._refuse(OUT_OF_RESOURCES, f"could not persist instance: {exc}", study_uid)
        except Exception as exc:  # a bug: not "try again later", which a sender does forever
            if not replaces:  # never acknowledged: no file without a row; a repeat's stays
                final.unlink(missing_ok=True)
            log.exception("internal error storing %s", sop_uid, extra={"study_uid": study_uid})
            return self._refuse(UNABLE_TO_PROCESS, f"internal error storing the instance "
                                f"({type(exc).__name__}: {exc}); see the node's log", study_uid)
        return SUCCESS


def cleanup_incoming(spool_root: Path, older_than: float | None = None,
                     keep: Path | None = None) -> int:
    """Remove partial files a crash left in the incoming folders (they were never
    acknowledged): those not written to for ``older_than`` seconds (None: all, for a spool no
    other listener shares), in every process's folder but ``keep``; then the empty folders."""
    root = spool_root / INCOMING
    removed = _remove_files(root, older_than=older_than)  # before per-process folders
    now = time.time()
    for folder in sorted(root.iterdir()) if root.is_dir() else ():
        if folder.is_dir() and folder != keep:
            removed += _remove_files(folder, older_than=older_than)
            # an idle listener's empty folder stays a while (it would make it again anyway)
            with contextlib.suppress(OSError):
                if older_than is None or now - folder.stat().st_mtime > older_than:
                    folder.rmdir()  # fails when not empty
    return removed


def _remove_files(folder: Path, older_than: float | None = None,
                  keep: set[Path] | None = None) -> int:
    """Remove the files of ``folder`` (only those not modified for ``older_than`` seconds,
    when given), but ``keep``."""
    now = time.time()
    removed = 0
    for entry in folder.iterdir() if folder.is_dir() else ():
        try:
            if (entry.is_file() and entry not in (keep or set())
                    and (older_than is None or now - entry.stat().st_mtime > older_than)):
                entry.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    return removed
