"""The storage SCU: pushes DICOM files to a peer, streamed from disk in their own transfer syntax.

Used by the outbox (results to the PACS) and by ``cadnode send`` (test pushes, re-sends).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config, evt

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128


class DeliveryError(RuntimeError):
    """No association could be made, or it broke before the files were sent."""


@dataclass(frozen=True)
class SendResult:
    path: Path
    status: int | None  # DICOM status from the peer, None when not sent
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status is not None and (self.status == 0 or self.status & 0xF000 == 0xB000)


def iter_dicom_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Files under ``paths`` (recursively) that carry DICOM file meta information."""
    for path in paths:
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file() and _has_meta(child):
                    yield child
        elif path.is_file():
            yield path


def _has_meta(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def client_ssl_context(ca: str = "", cert: str = "", key: str = "") -> ssl.SSLContext:
    """TLS (1.2+) for sending: the peer's certificate is verified against ``ca`` (else the
    system's trust store) and its host name or IP address; ``cert``/``key`` are this node's own
    certificate, for peers that require mutual TLS."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert:
        ctx.load_cert_chain(cert, key or None)
    return ctx


def configure_pynetdicom() -> None:
    """pynetdicom's process-wide settings, set once at start-up (``cadnode.cli.main``; the
    tests' conftest does the same): files are sent streamed from disk in their own transfer
    syntax, never read whole and never converted."""
    _config.STORE_SEND_CHUNKED_DATASET = True


def send_files(
    paths: Sequence[Path],
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str = "CADNODE",
    timeout: float = 60.0,
    tls: ssl.SSLContext | None = None,
) -> list[SendResult]:
    """Send ``paths`` over one association (TLS when ``tls`` is given); raises DeliveryError
    when none can be made. Once it is, every path gets a result: the peer's status for each
    it answered (kept even if the association aborts later), "not sent" for the rest."""
    metas: list[tuple[Path, str, str]] = []
    results: list[SendResult] = []
    for path in paths:
        try:
            meta = read_file_meta_info(path)
            metas.append(
                (path, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
            )
        except (InvalidDicomError, AttributeError, OSError) as exc:
            results.append(SendResult(path, None, f"not a DICOM file: {exc}"))
    contexts = sorted({(sop, ts) for _, sop, ts in metas})
    if len(contexts) > MAX_CONTEXTS:
        raise DeliveryError(f"{len(contexts)} SOP class/transfer syntax pairs: send in batches")
    if not metas:
        return results
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop, ts in contexts:
        ae.add_requested_context(sop, [ts])
    assoc = _associate(ae, host, port, called_ae, timeout, tls)
    accepted = {(str(cx.abstract_syntax), str(ts)) for cx in assoc.accepted_contexts
                for ts in cx.transfer_syntax}
    try:
        for n, (path, sop, ts) in enumerate(metas):
            if not assoc.is_established:  # aborted by the peer after the last response
                results += [SendResult(p, None, f"not sent: the association with {called_ae} "
                                       f"ended") for p, _, _ in metas[n:]]
                break
            if (sop, ts) not in accepted:
                results.append(SendResult(path, None, f"not sent: {called_ae} accepted no "
                                          f"presentation context for {_context_name(sop, ts)}"))
                continue
            try:
                status = assoc.send_c_store(path)
            except (ValueError, AttributeError, RuntimeError, OSError) as exc:  # file gone, say
                results.append(SendResult(path, None, str(exc)))
                continue
            code = int(status.Status) if "Status" in status else None
            results.append(SendResult(path, code, "" if code is not None else
                                      "no response (timeout or association ended)"))
    finally:
        if assoc.is_established:
            assoc.release()
    return results


def _context_name(sop_class: str, transfer_syntax: str) -> str:
    from pydicom.uid import UID

    def named(uid: str) -> str:
        name = UID(uid).name
        return uid if name == uid else f"{name} ({uid})"

    return f"SOP class {named(sop_class)} in {named(transfer_syntax)}"


def _associate(ae: AE, host: str, port: int, called_ae: str, timeout: float,
               tls: ssl.SSLContext | None) -> Any:
    """An established association, or DeliveryError saying why there is none: no connection,
    rejected, no presentation context accepted (pynetdicom then aborts at once), or aborted or
    timed out."""
    connected: list[bool] = []
    answered: list[bool] = []
    assoc = ae.associate(host, port, ae_title=called_ae,
                         evt_handlers=[(evt.EVT_CONN_OPEN, lambda e: connected.append(True)),
                                       (evt.EVT_ACCEPTED, lambda e: answered.append(True))],
                         tls_args=(tls, host) if tls is not None else None)
    if assoc.is_established:
        return assoc
    peer = f"{called_ae}@{host}:{port}"
    if answered and not assoc.accepted_contexts:
        offered = sorted({(str(cx.abstract_syntax), str(ts)) for cx in ae.requested_contexts
                          for ts in cx.transfer_syntax})
        raise DeliveryError(f"{peer} accepted the association but no presentation context: it "
                            f"does not take {'; '.join(_context_name(*c) for c in offered)}")
    if not connected:
        why = "cannot connect (or the TLS handshake failed)" if tls else "cannot connect"
    elif assoc.is_rejected:
        why = "association rejected by"
    else:
        why = f"association aborted or timed out ({timeout:.0f} s) with"
    hint = " (over TLS: the peer may have refused this node's certificate)" if tls else ""
    raise DeliveryError(f"{why} {peer}{hint}")


VERIFICATION = "1.2.840.10008.1.1"


def echo(host: str, port: int, called_ae: str, calling_ae: str = "CADNODE",
         timeout: float = 10.0, tls: ssl.SSLContext | None = None) -> None:
    """C-ECHO (Verification) to a peer; DeliveryError says why it did not answer Success."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(VERIFICATION)
    assoc = _associate(ae, host, port, called_ae, timeout, tls)
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    code = int(status.Status) if status is not None and "Status" in status else None
    if code != 0:
        raise DeliveryError(f"C-ECHO to {called_ae}@{host}:{port}: "
                            + ("no answer" if code is None else f"status 0x{code:04X}"))
