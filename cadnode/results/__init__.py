"""Result objects: the DICOM the node sends back for a processed study.

One subpackage per object, each shaped like highdicom's (``__init__`` exporting the builder,
``sop`` for the IOD and its header modules, ``content`` for what the object says or shows);
``common`` holds what several share, ``findings`` is the input contract, ``uids`` the
deterministic UIDs and ``enum`` the result kinds. Every builder has the signature
``(findings, sources, uid_root=DEFAULT_UID_ROOT) -> Dataset``; :data:`BUILDERS` names them by
:class:`~cadnode.results.enum.ResultKind`, in the order the objects are written and sent. The
builders (and highdicom) are imported on first use of ``BUILDERS``, so that reading the kinds
(settings, the command line) stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from cadnode.results.enum import ResultKind

if TYPE_CHECKING:
    from pydicom import Dataset

    from cadnode.results.findings import StudyFindings

Builder = Callable[["StudyFindings", "Sequence[Dataset]", str], "Dataset"]


def _builders() -> dict[ResultKind, Builder]:
    from cadnode.results.cad_sr import build_cad_sr
    from cadnode.results.gsps import build_gsps
    from cadnode.results.sc import build_secondary_capture
    from cadnode.results.tid1500 import build_tid1500_sr

    return {
        ResultKind.CAD_SR: build_cad_sr,
        ResultKind.TID1500: build_tid1500_sr,
        ResultKind.SC: build_secondary_capture,
        ResultKind.GSPS: build_gsps,
    }


def __getattr__(name: str) -> Any:
    if name == "BUILDERS":
        builders = _builders()
        globals()["BUILDERS"] = builders
        return builders
    raise AttributeError(name)


__all__ = ["BUILDERS", "Builder", "ResultKind"]
