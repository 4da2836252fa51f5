"""The Comprehensive 3D SR document around the TID 1500 Measurement Report (highdicom)."""

from __future__ import annotations

from collections.abc import Sequence
from copy import deepcopy

import highdicom as hd
from pydicom import Dataset

from cadnode import __version__
from cadnode.dicom.views import orientation_directions
from cadnode.results.common import (
    MANUFACTURER,
    contributing_equipment,
    copy_patient_study,
    file_meta,
    predecessor_documents,
    reference_stub,
)
from cadnode.results.enum import ResultKind
from cadnode.results.findings import StudyFindings
from cadnode.results.tid1500.content import measurement_report
from cadnode.results.uids import DEFAULT_UID_ROOT, result_identity

KIND = ResultKind.TID1500
SERIES_NUMBER = 9003
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def evidence_stubs(findings: StudyFindings, sources: Sequence[Dataset]) -> list[Dataset]:
    """One header stub per source image and per analysed view (a view without a header too)."""
    first = sources[0]
    views = {v.sop_instance_uid: v for v in findings.views}
    stubs: dict[str, Dataset] = {}
    for src in sources:
        uid = str(src.SOPInstanceUID)
        stubs.setdefault(uid, reference_stub(src, views.get(uid), findings.study_uid, first))
    for uid, v in views.items():
        stubs.setdefault(uid, reference_stub(None, v, findings.study_uid, first))
    return list(stubs.values())


def library_stub(stub: Dataset) -> Dataset:
    """A copy of ``stub`` that highdicom's Image Library entry (TID 1601/1603) can describe.

    For projection modalities highdicom reads a two-valued Patient Orientation and Imager
    Pixel Spacing; scanned film (CBIS-DDSM: orientation "CC", no spacing) has neither. Such an
    entry is then described like any image (modality from the SOP class, rows, columns): the
    Modality below is only what selects highdicom's descriptor set, it is not written out.
    """
    lib = deepcopy(stub)
    orientation_ok = orientation_directions(lib) is not None
    if "ImagerPixelSpacing" not in lib and "PixelSpacing" in lib:
        lib.ImagerPixelSpacing = lib.PixelSpacing
    if not orientation_ok or "ImagerPixelSpacing" not in lib:
        lib.Modality = "OT"
    lib.setdefault("Modality", "OT")
    return lib


def _root_shell(root: Dataset) -> Dataset:
    """The root CONTAINER without its children, for highdicom's SR constructor.

    The constructor deep-copies the whole content tree (for its typed ``content`` view) and
    searches it for IMAGE/COMPOSITE references, which cost more than building the tree. Given
    the root's own attributes only, it does neither at any cost; the tree is attached by
    :func:`_attach_content`, exactly as the constructor does it (``sr[tag] = value`` for every
    element of the root). The evidence sequences are unchanged: highdicom lists every
    ``evidence`` dataset whether referenced or not (the content search only checks that each
    reference is evidence), and ``evidence_stubs`` has a stub for every view the tree names.
    """
    shell = Dataset()
    for elem in root:
        if elem.keyword != "ContentSequence":
            shell.add(elem)  # shared, not copied: highdicom copies the shell, never edits it
    shell.ContentSequence = []  # highdicom's reference search needs the attribute
    return shell


def _attach_content(sr: hd.sr.Comprehensive3DSR, root: Dataset) -> None:
    """Put the full content tree on ``sr`` as highdicom's constructor would have.

    The elements are the built tree itself (the constructor assigns the original, not its
    copy); ``sr.content`` becomes the typed view of that tree (``_content`` is where
    highdicom keeps it; it held the shell's copy until here).
    """
    assert isinstance(root, hd.sr.ContainerContentItem), type(root)
    for elem in root:
        sr[elem.tag] = elem
    sr._content = hd.sr.ContentSequence([root], is_root=True)


def build_tid1500_sr(
    findings: StudyFindings, sources: Sequence[Dataset], uid_root: str = DEFAULT_UID_ROOT
) -> Dataset:
    """Build the TID 1500 Comprehensive 3D SR in a new series of the source study.

    Comprehensive 3D SR (not plain Comprehensive SR) because that is the class OHIF-style
    viewers read and write for TID 1500; only 2D SCOORDs are used.
    """
    if not sources:
        raise ValueError("build_tid1500_sr needs at least one source header (patient/study)")
    evidence = evidence_stubs(findings, sources)
    analysed = {v.sop_instance_uid for v in findings.views}
    report = measurement_report(
        findings, uid_root,
        [library_stub(s) for s in evidence if str(s.SOPInstanceUID) in analysed],
    )
    identity = result_identity(uid_root, findings, KIND)
    series_uid, sop_uid = identity.series_uid, identity.sop_instance_uid
    root = report[0]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=_root_shell(root),
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=identity.instance_number,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,  # unverified machine output, a radiologist decides
        is_verified=False,
        series_description=(
            "CAD measurements TID 1500 " + ("(DEMO MODEL)" if findings.demo_model else "cadnode")
        ),
        manufacturer_model_name=MANUFACTURER,
        software_versions=__version__,
    )
    _attach_content(sr, root)
    copy_patient_study(sr, sources[0], findings.study_uid)
    sr.ContributingEquipmentSequence = [
        contributing_equipment(findings)  # type: ignore[list-item]
    ]
    if identity.predecessor is not None:
        sr.PredecessorDocumentsSequence = predecessor_documents(identity.predecessor,
                                                                findings.study_uid)
    sr.file_meta = file_meta(COMPREHENSIVE_3D_SR, sop_uid)
    return sr
