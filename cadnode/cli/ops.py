"""``cadnode purge``, ``cadnode config`` and ``cadnode doctor``: keeping a node healthy."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from typing import Any

from cadnode.config import Settings


def cmd_purge(settings: Settings, args: argparse.Namespace) -> int:
    from cadnode.cli.common import open_existing_database
    from cadnode.jobs.retention import parse_age, purge

    if args.older_than is not None:
        try:
            age = parse_age(args.older_than)
        except ValueError as exc:
            print(f"cadnode purge: --older-than: {exc}", file=sys.stderr)
            return 2
    elif settings.retention_days > 0:
        age = settings.retention_days * 86400
    else:
        print("cadnode purge: say how old, e.g. --older-than 30d (or set "
              "CADNODE_RETENTION_DAYS)", file=sys.stderr)
        return 2
    db = open_existing_database(settings, read_only=args.dry_run)
    try:
        report = purge(db, age, settings.spool_dir, settings.results_dir, dry_run=args.dry_run)
    finally:
        db.dispose()
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(f"cadnode purge: {report.summary()}")
        if args.verbose:
            for uid in report.studies:
                print(f"  {uid}")
        for failure in report.failed:
            print(f"cadnode purge: not removed: {failure}", file=sys.stderr)
    return 1 if report.failed else 0


def config_rows(settings: Settings, sources: dict[str, str]) -> list[dict[str, Any]]:
    """Each setting: its variable, its value as it may be shown (secrets masked), its source."""
    from cadnode.config import public_value

    return [{"setting": f.name, "variable": f"CADNODE_{f.name.upper()}",
             "value": public_value(f.name, getattr(settings, f.name)),
             "source": sources.get(f.name, "default")} for f in fields(Settings)]


def cmd_config(settings: Settings, args: argparse.Namespace) -> int:
    from cadnode.config import load_settings_with_sources, unknown_variables

    _, sources = load_settings_with_sources(getattr(args, "config", None))
    if getattr(args, "log_level", None):
        sources["log_level"] = "--log-level"
    rows = config_rows(settings, sources)  # ``settings`` has --log-level applied already
    warnings = unknown_variables()
    if args.json:
        print(json.dumps({"settings": rows, "warnings": warnings}, indent=2))
        return 0
    width = max(len(r["variable"]) for r in rows)
    for r in rows:
        value = r["value"]
        shown = ",".join(value) if isinstance(value, list) else str(value)
        print(f"{r['variable']:<{width}}  {shown or '(empty)'}  [{r['source']}]")
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def cmd_doctor(settings: Settings, args: argparse.Namespace) -> int:
    from cadnode.doctor import run_checks

    checks = run_checks(settings, timeout=args.timeout)
    if args.json:
        print(json.dumps([c.as_dict() for c in checks], indent=2))
    else:
        for c in checks:
            print(c.line())
    failed = sum(c.status == "FAIL" for c in checks)
    warned = sum(c.status == "WARN" for c in checks)
    if not args.json:
        print(f"{len(checks)} check(s): {failed} failed, {warned} warning(s)")
    return 1 if failed else 0


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("purge", parents=[common],
                       help="remove delivered studies older than an age, and old events",
                       description="Remove studies whose every result was delivered and whose "
                       "last activity is older than --older-than: their received images, "
                       "result objects and rows; prune older events. A study still being "
                       "received or processed, or with a pending or dead-lettered delivery, "
                       "is never removed. CADNODE_RETENTION_DAYS does the same hourly in "
                       "`cadnode serve`.")
    p.add_argument("--older-than", metavar="AGE",
                   help="e.g. 30d, 1w, 12h, 90m, 45s (default: CADNODE_RETENTION_DAYS)")
    p.add_argument("--dry-run", action="store_true", help="say what would go; remove nothing")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="list the studies")
    p.set_defaults(func=cmd_purge)

    c = sub.add_parser("config", parents=[common],
                       help="the effective settings and where each came from",
                       description="Every setting's value (secrets masked) and its source: "
                       "the TOML file, an environment variable, or the default. Unknown "
                       "CADNODE_* variables are warned about.")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_config)

    d = sub.add_parser("doctor", parents=[common],
                       help="check settings, ports, database, disk, model and destinations",
                       description="One line per check (OK, WARN or FAIL, and how to fix "
                       "it); exit status 1 when any check fails.")
    d.add_argument("--json", action="store_true")
    d.add_argument("--timeout", type=float, default=5.0, metavar="S",
                   help="seconds for each network check (default 5)")
    d.set_defaults(func=cmd_doctor)
