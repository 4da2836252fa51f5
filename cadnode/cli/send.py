"""``cadnode send``: push DICOM files or folders to a storage SCP (a C-STORE SCU)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cadnode.config import Settings


def cmd_send(settings: Settings, args: argparse.Namespace) -> int:
    port = settings.port if args.port is None else args.port
    called_aet = args.called_aet or settings.ae_title
    from cadnode.cli.common import tls_contexts
    from cadnode.dicom.sender import DeliveryError, iter_dicom_files, send_files

    tls = tls_contexts(settings, client=True).client if args.tls else None
    files = list(iter_dicom_files(Path(p) for p in args.paths))
    if not files:
        print("cadnode send: no DICOM files found", file=sys.stderr)
        return 2
    try:
        results = send_files(files, args.host, port, called_aet, calling_ae=args.aet,
                             tls=tls)
    except DeliveryError as exc:
        print(f"cadnode send: {exc}", file=sys.stderr)
        return 1
    bad = 0
    for r in results:
        status = "-" if r.status is None else f"0x{r.status:04X}"
        if not r.ok:
            bad += 1
        print(f"{status}  {r.path}" + (f"  {r.error}" if r.error else ""))
    print(f"sent {len(results) - bad} of {len(results)} file(s)")
    return 1 if bad else 0



def register(sub: Any, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("send", parents=[common],
                        help="push DICOM files or folders to a storage SCP")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=None, help="default: CADNODE_PORT")
    s.add_argument("--aet", default="CADNODE_SCU", help="calling AE title")
    s.add_argument("--called-aet", default=None, help="default: CADNODE_AE_TITLE")
    s.add_argument("--tls", action="store_true",
                   help="TLS, with CADNODE_SEND_TLS_CA / _CERT / _KEY")
    s.add_argument("paths", nargs="+")
    s.set_defaults(func=cmd_send)
