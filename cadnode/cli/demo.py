"""``cadnode demo``: the node, a demo PACS and a real 4-view exam, end to end."""

from __future__ import annotations

import argparse
from typing import Any

from cadnode.config import Settings


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    from cadnode.demo import run_demo

    return run_demo(keep=args.keep, timeout=args.timeout)



def register(sub: Any, common: argparse.ArgumentParser) -> None:
    d = sub.add_parser("demo", parents=[common],
                       help="node + demo PACS + a real 4-view exam, end to end")
    d.add_argument("--keep", action="store_true", help="keep the temporary home")
    d.add_argument("--timeout", type=float, default=300.0)
    d.set_defaults(func=cmd_demo)
