"""``SpoolingDIMSEProvider`` fed the P-DATA a real pynetdicom requestor would send.

The C-STORE's dataset must land, byte for byte, in a file of the listener's own folder with
pynetdicom's File Meta header; a request on a presentation context that was never accepted
must leave no file and no open descriptor behind (a peer could otherwise exhaust them).
"""

from __future__ import annotations

import os
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace

import pydicom
from pydicom.dataset import Dataset
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.presentation import PresentationContext

from cadnode.dicom.receiving import ReceivingFile, SpoolingDIMSEProvider

MG = "1.2.840.10008.5.1.4.1.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


def _provider(tmp_path: Path) -> SpoolingDIMSEProvider:
    cx = PresentationContext()
    cx.context_id, cx.abstract_syntax, cx.transfer_syntax = 1, MG, [EXPLICIT]
    assoc = SimpleNamespace(_accepted_cx={1: cx}, get_handlers=lambda event: [],
                            is_acceptor=True)
    provider = DIMSEServiceProvider(assoc)  # type: ignore[arg-type]
    return SpoolingDIMSEProvider.adopt(provider, tmp_path, limit=2**30)


def _pdata(context_id: int, max_pdu: int = 1024) -> tuple[list, Dataset]:  # type: ignore[type-arg]
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = MG, "1.2.826.0.1.3680043.10.1.5.1"
    ds.PatientID, ds.StudyInstanceUID = "P1", "1.2.826.0.1.3680043.10.1.5"
    ds.PixelData = bytes(range(256)) * 40  # several fragments at this PDU size
    ds["PixelData"].VR = "OB"
    rq = C_STORE()
    rq.MessageID, rq.Priority = 1, 2
    rq.AffectedSOPClassUID, rq.AffectedSOPInstanceUID = MG, ds.SOPInstanceUID
    rq.DataSet = BytesIO(encode(ds, False, True))
    message = C_STORE_RQ()
    message.primitive_to_message(rq)
    return list(message.encode_msg(context_id, max_pdu)), ds


def _open_under(folder: Path) -> list[str]:
    """Files under ``folder`` this process holds open (other tests' sockets come and go, so
    counting every descriptor would not say anything)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(folder)):
            found.append(target)
    return found


def test_a_dataset_arrives_whole_in_the_listeners_folder(tmp_path: Path) -> None:
    provider = _provider(tmp_path)
    pdata, ds = _pdata(1)
    assert len(pdata) > 5
    for p in pdata:
        provider.receive_primitive(p)
    _, request = provider.msg_queue.get_nowait()
    path = Path(request._dataset_path)
    assert path.parent == tmp_path
    assert isinstance(request._dataset_file, ReceivingFile)
    assert request._dataset_file.refused == ""
    assert _open_under(tmp_path) == []  # closed once the dataset ended
    got = pydicom.dcmread(path)
    assert got.file_meta.TransferSyntaxUID == EXPLICIT
    assert got.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert got.PixelData == ds.PixelData and got.PatientID == "P1"


def test_a_request_on_an_unaccepted_context_leaves_nothing_behind(tmp_path: Path) -> None:
    provider = _provider(tmp_path)
    pdata, _ = _pdata(3)  # context 3 was never accepted
    for p in pdata:
        provider.receive_primitive(p)
    _, request = provider.msg_queue.get_nowait()
    assert "presentation context" in request._dataset_file.refused
    assert list(tmp_path.iterdir()) == []
    assert _open_under(tmp_path) == []
