"""Where a C-STORE's dataset goes while it arrives: a file the listener owns, in its spool.

pynetdicom can stream a dataset to a temporary file (``STORE_RECV_CHUNKED_DATASET``), but only
through process-wide settings (that flag, and ``tempfile.tempdir`` for the folder), and a write
error there (a full disk) escapes into its reactor and aborts the association, so the sender
never hears "out of resources". :class:`SpoolingDIMSEProvider` takes the dataset fragments of a
C-STORE request before pynetdicom's message decoder sees them and writes them itself, for this
association only:

- into the listener's own ``incoming`` folder (so that committing is a rename on one file
  system), with the same File Meta Information pynetdicom would write;
- through :class:`ReceivingFile`, which turns a failed write (``ENOSPC``, ``EDQUOT``, any
  ``OSError``) or a dataset over the size limit into a *refused* transfer: what was written is
  removed at once, the rest of the dataset is read and dropped, and the C-STORE handler answers
  0xA700 with the reason (:func:`refusal`) while the association goes on.

pynetdicom's decoder still sees every command fragment and an empty last dataset fragment, so
it completes the message as usual, with ``dataset_path`` naming this file.

Most of a large dataset does not even reach pynetdicom: a P-DATA-TF PDU that holds nothing but
middle fragments of the dataset being received is written by :func:`write_middle_fragments`
straight from the socket's buffer (``cadnode.dicom.transport`` reads it), skipping pynetdicom's
PDU decoding, event queue and state machine, which cost more than the bytes themselves.
"""

from __future__ import annotations

import logging
import os
import struct
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dsutils import create_file_meta
from pynetdicom.pdu_primitives import P_DATA

log = logging.getLogger(__name__)

_COMMAND = 0x01  # message control header bits (PS3.8 E.2)
_LAST = 0x02
_PDV_LENGTH = struct.Struct(">L")  # a PDV item: length, context ID, control header, fragment


class ReceivingFile:
    """A dataset file being received; after a failed write or past ``limit`` bytes it keeps
    nothing and records why (``refused``). Given a ``refused`` reason, it creates no file
    and drops everything from the start."""

    def __init__(self, folder: Path, limit: int, header: bytes = b"",
                 refused: str = "") -> None:
        self.limit = limit
        self.size = 0
        self.refused = ""
        self._fd: int | None = None
        self._close_fd: Callable[[], Any] = lambda: None
        name = str(folder / "(not created)")
        if refused:
            self._refuse(refused)
        else:
            try:
                try:
                    self._fd, name = tempfile.mkstemp(suffix=".dcm", dir=folder)
                except FileNotFoundError:  # the folder was removed (an admin, a clean-up)
                    folder.mkdir(parents=True, exist_ok=True)
                    self._fd, name = tempfile.mkstemp(suffix=".dcm", dir=folder)
                # closed even if the association's thread dies without telling anyone
                self._close_fd = weakref.finalize(self, os.close, self._fd)
            except OSError as exc:
                self._refuse(f"cannot create a file to receive into: {exc.strerror or exc}")
        self.path = Path(name)
        self.name = name  # pynetdicom unlinks ``name`` after the C-STORE handler
        self.write(header, counted=False)

    @property
    def open(self) -> bool:
        """Still taking fragments: neither complete nor refused."""
        return self._fd is not None

    def write(self, data: bytes | memoryview, counted: bool = True) -> None:
        if self.refused:
            return
        if counted:
            self.size += len(data)
            if self.size > self.limit:
                self.discard(f"the dataset exceeds the limit of {self.limit} bytes")
                return
        try:
            view = memoryview(data)
            while view:
                assert self._fd is not None
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            self.discard(f"the spool could not take the dataset: {exc.strerror or exc}")

    @property
    def file(self) -> ReceivingFile:
        """pynetdicom's decoder writes the (empty) last fragment as ``f.write``,
        ``f.file.flush()``: both are this object."""
        return self

    def flush(self) -> None:
        """Nothing is buffered (``os.write``)."""

    def close(self) -> None:
        self._close_fd()  # once: later calls do nothing
        self._fd = None

    def discard(self, why: str) -> None:
        """Keep nothing of this dataset (its space back now) and remember why."""
        self._refuse(why)
        self.path.unlink(missing_ok=True)

    def _refuse(self, why: str) -> None:
        if not self.refused:
            log.warning("dropping a dataset being received: %s", why)
        self.refused = why
        self.close()


class SpoolingDIMSEProvider(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, with C-STORE datasets written by :class:`ReceivingFile`."""

    _incoming: Path
    _limit: int

    @classmethod
    def adopt(cls, provider: DIMSEServiceProvider, incoming: Path,
              limit: int) -> SpoolingDIMSEProvider:
        """Turn an association's DIMSE provider into a spooling one, in place (the
        association and its state machine hold references to it)."""
        provider.__class__ = cls
        spooling: SpoolingDIMSEProvider = provider  # type: ignore[assignment]
        spooling._incoming, spooling._limit = incoming, limit
        return spooling

    def receive_primitive(self, primitive: P_DATA) -> None:
        for context_id, data in primitive.presentation_data_value_list:
            self._receive_fragment(context_id, data)

    def _receive_fragment(self, context_id: int, data: bytes) -> None:
        target = getattr(self.message, "_data_set_file", None)
        if isinstance(target, ReceivingFile) and not data[0] & _COMMAND:
            target.write(memoryview(data)[1:])
            if not data[0] & _LAST:
                return
            target.close()
            data = bytes([data[0]])  # the decoder only needs to see that the dataset ended
        super().receive_primitive(_single(context_id, data))
        message = self.message
        if isinstance(message, C_STORE_RQ) and message._data_set_file is None:
            self._open_dataset_file(message)

    def _open_dataset_file(self, message: C_STORE_RQ) -> None:
        """Start the file a C-STORE's dataset goes to, with pynetdicom's File Meta header; a
        request that names no accepted context or no SOP instance gets no file at all."""
        cs = message.command_set
        try:
            cx = self.assoc._accepted_cx[cast(int, message.context_id)]
            meta = create_file_meta(sop_class_uid=cs.AffectedSOPClassUID,
                                    sop_instance_uid=cs.AffectedSOPInstanceUID,
                                    transfer_syntax=cx.transfer_syntax[0])
            header = b"\x00" * 128 + b"DICM" + _encoded_meta(meta)
        except (KeyError, AttributeError, ValueError, TypeError) as exc:
            target = ReceivingFile(self._incoming, self._limit, refused=(
                f"the C-STORE request cannot be stored ({type(exc).__name__}: {exc}): no "
                "accepted presentation context or no SOP instance UID"))
        else:
            target = ReceivingFile(self._incoming, self._limit, header)
        message._data_set_file = target  # type: ignore[assignment]
        message._data_set_path = target.path


def write_middle_fragments(body: bytearray, target: ReceivingFile) -> bool:
    """Write the fragments of a P-DATA-TF PDU body to ``target`` if each one is a dataset
    fragment that is not the last; otherwise (a command, the end of the dataset, an item that
    does not parse) write nothing and return False, leaving the whole PDU to pynetdicom."""
    spans = []
    offset, end = 0, len(body)
    while offset < end:
        if offset + 6 > end:
            return False
        (length,) = _PDV_LENGTH.unpack_from(body, offset)
        stop = offset + 4 + length
        if length < 2 or stop > end or body[offset + 5] & (_COMMAND | _LAST):
            return False
        spans.append((offset + 6, stop))
        offset = stop
    if not spans:
        return False
    view = memoryview(body)
    for start, stop in spans:
        target.write(view[start:stop])
    return True


def refusal(event: Any) -> str:
    """Why the dataset of this C-STORE event was not kept, or "" if it was."""
    target = getattr(event.request, "_dataset_file", None)
    return target.refused if isinstance(target, ReceivingFile) else ""


def receiving(assoc: Any) -> ReceivingFile | None:
    """The file the association is receiving a dataset into right now, if any."""
    target = getattr(getattr(getattr(assoc, "dimse", None), "message", None),
                     "_data_set_file", None)
    return target if isinstance(target, ReceivingFile) else None


def _single(context_id: int, data: bytes) -> P_DATA:
    primitive = P_DATA()
    primitive.presentation_data_value_list = [[context_id, data]]  # type: ignore[list-item]
    return primitive


def _encoded_meta(meta: Any) -> bytes:
    buffer = DicomBytesIO()
    write_file_meta_info(buffer, meta)
    return buffer.getvalue()
