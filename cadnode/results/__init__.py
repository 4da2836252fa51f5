"""Result objects: the DICOM the node sends back for a processed study.

One subpackage per object, each shaped like highdicom's (``__init__`` exporting the builder,
``sop`` for the IOD and its header modules, ``content`` for what the object says or shows);
``common`` holds what several share, ``findings`` is the input contract and ``uids`` the
deterministic UIDs. Every builder has the signature
``(findings, sources, uid_root=DEFAULT_UID_ROOT) -> Dataset``; :data:`BUILDERS` names them by
the result kind the worker and the outbox use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pydicom import Dataset

from cadnode.results.cad_sr import build_cad_sr
from cadnode.results.findings import StudyFindings
from cadnode.results.gsps import build_gsps
from cadnode.results.sc import build_secondary_capture
from cadnode.results.tid1500 import build_tid1500_sr

Builder = Callable[[StudyFindings, Sequence[Dataset], str], Dataset]

#: Result kind -> builder, in the order the objects are written and sent.
BUILDERS: dict[str, Builder] = {
    "cad_sr": build_cad_sr,
    "tid1500": build_tid1500_sr,
    "sc": build_secondary_capture,
    "gsps": build_gsps,
}

__all__ = ["BUILDERS", "Builder"]
