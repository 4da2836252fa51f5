"""``cadnode jobs`` and ``cadnode retry``: what the job database holds, and putting
dead-lettered deliveries back."""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from typing import Any

from cadnode.cli.common import open_existing_database
from cadnode.config import Settings
from cadnode.jobs.enum import StudyState

#: Without --since, the footer counts refusals of the last day.
REFUSED_WINDOW = 86400.0


def _local(iso_time: str | None, with_date: bool = True) -> str:
    """An ISO time of the database rows in local time, for people."""
    if not iso_time:
        return "-"
    when = datetime.fromisoformat(iso_time).astimezone()
    return when.strftime("%Y-%m-%d %H:%M:%S" if with_date else "%H:%M:%S")


def _fmt_scores(job: dict[str, Any] | None) -> str:
    if not job or not job.get("scores"):
        return "-"
    breasts = job["scores"].get("breasts", {})
    return " ".join(
        f"{side}:ca={b['cancer']:.2f},calc={b['calcification']:.2f}"
        for side, b in sorted(breasts.items())
    ) or "-"


def short_uid(uid: str, width: int = 28) -> str:
    """A UID cut in the middle to ``width`` characters: its root and its distinctive end
    (``cadnode jobs --study`` takes the end as well as the whole UID)."""
    if len(uid) <= width:
        return uid
    head = 8
    return uid[:head] + "…" + uid[-(width - head - 1):]


def _study_date(value: str) -> str:
    return f"{value[:4]}-{value[4:6]}-{value[6:]}" if len(value) == 8 else (value or "-")


def _deliveries(d: dict[str, int]) -> str:
    total = sum(d.values())
    if not total:
        return "-"
    text = f"{d.get('sent', 0)}/{total}"
    if d.get("dead"):
        text += f" ({d['dead']} dead)"
    return text


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ["STUDY", "ACCESSION", "PATIENT", "STUDY DATE", "STATE", "VIEWS", "SCORES",
              "DELIVERIES", "RECEIVED", "FINISHED"]
    lines = [header]
    for r in rows:
        job = r["job"] or {}
        lines.append([
            short_uid(r["study_uid"]),
            r["accession"] or "-",
            r["patient_id"] or "-",
            _study_date(r["study_date"]),
            r["state"] + (f" ({r['note']})" if r.get("note") else ""),
            ",".join(r["views"]) or "-",
            _fmt_scores(job),
            _deliveries(r["deliveries"]),
            _local(r["last_received"]),
            _local(job.get("finished_at")),
        ])
    return _columns(lines)


def _columns(lines: list[list[str]]) -> str:
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in lines)


def format_refused(events: list[dict[str, Any]]) -> str:
    lines = [["AT", "STUDY", "WHAT"]]
    for e in events:
        lines.append([_local(e["at"]), short_uid(e["study_uid"]) if e["study_uid"] else "-",
                      e["message"]])
    return _columns(lines)


def _since(args: argparse.Namespace) -> float | None:
    from cadnode.jobs.admin import parse_since

    if args.since is None:
        return None
    try:
        return parse_since(args.since)
    except ValueError as exc:
        print(f"cadnode jobs: --since: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_jobs(settings: Settings, args: argparse.Namespace) -> int:
    from cadnode.jobs import admin

    since = _since(args)
    db = open_existing_database(settings)
    try:
        last_event = _last_event(db) if args.follow else 0  # the tail starts below the table
        if args.refused:
            events = admin.refused_associations(db, since, args.limit)
            if args.json:
                print(json.dumps(events, indent=2))
            elif events:
                print(format_refused(events))
            else:
                print("no refused associations or images" +
                      (f" since {_local(admin.iso(since))}" if since else ""))
            return 0
        flt = admin.StudyFilter(state=args.state, since=since, patient=args.patient,
                                accession=args.accession, study=args.study, limit=args.limit)
        rows = admin.list_studies(db, flt)
        if args.json:
            print(json.dumps(rows, indent=2))
        elif rows:
            print(format_table(rows))
        else:
            filtered = any(v is not None for v in (args.state, since, args.patient,
                                                   args.accession, args.study))
            print("no study matches" if filtered else "no studies in the job database")
        if not args.json:
            window = since if since is not None else time.time() - REFUSED_WINDOW
            refused = admin.count_refused(db, window)
            if refused:
                print(f"\n{refused} association(s) or image(s) refused since "
                      f"{_local(admin.iso(window))}; see `cadnode jobs --refused`")
        if args.follow:
            return _follow(db, args.json, last_event)
        return 0
    finally:
        db.dispose()


def _last_event(db: Any) -> int:
    from sqlalchemy import select

    from cadnode.jobs.db import Event

    with db.session() as s:
        return int(s.scalar(select(Event.id).order_by(Event.id.desc()).limit(1)) or 0)


def _follow(db: Any, as_json: bool, last: int) -> int:
    from sqlalchemy import select

    from cadnode.jobs.admin import iso
    from cadnode.jobs.db import Event

    sys.stdout.flush()
    try:
        while True:
            time.sleep(1.0)
            with db.session() as s:
                events = s.scalars(select(Event).where(Event.id > last).order_by(Event.id)).all()
            for e in events:
                last = e.id
                if as_json:
                    print(json.dumps({"at": iso(e.at), "level": e.level, "kind": e.kind,
                                      "study_uid": e.study_uid, "message": e.message}), flush=True)
                else:
                    print(f"{_local(iso(e.at), with_date=False)} {e.level:<7} {e.kind:<14} "
                          f"{(e.study_uid or '-')[-24:]:<24} {e.message}", flush=True)
    except KeyboardInterrupt:
        return 0


def resolve_or_explain(db: Any, key: str, command: str) -> str | None:
    """The study ``key`` (UID or accession) names, or None after saying why on stderr (no
    such study, or an accession of several: they are listed)."""
    from cadnode.jobs import admin

    try:
        uid = admin.resolve_study(db, key)
    except admin.AmbiguousStudy as exc:
        print(f"cadnode {command}: accession {key} matches {len(exc.study_uids)} studies; "
              "name one by its Study Instance UID:", file=sys.stderr)
        for row in admin.list_studies(db, admin.StudyFilter(accession=key, limit=1000)):
            print(f"  {row['study_uid']}  patient {row['patient_id'] or '-'}  "
                  f"date {_study_date(row['study_date'])}  {row['state']}", file=sys.stderr)
        return None
    if uid is None:
        print(f"cadnode {command}: no study {key} (Study Instance UID or accession) in the "
              "job database", file=sys.stderr)
    return uid


def cmd_retry(settings: Settings, args: argparse.Namespace) -> int:
    from cadnode.jobs.queue import retry_dead_deliveries

    key = args.study or args.study_key
    db = open_existing_database(settings, read_only=False)
    try:
        uid = None
        if key:
            uid = resolve_or_explain(db, key, "retry")
            if uid is None:
                return 1
        n = retry_dead_deliveries(db, uid)
    finally:
        db.dispose()
    of = f" of study {uid}" if uid else ""
    if n:
        print(f"put back {n} dead-lettered deliver{'y' if n == 1 else 'ies'}{of} in the "
              "outbox; the running node sends them")
    else:
        print(f"no dead-lettered deliveries{of}: nothing to put back")
    return 0


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    j = sub.add_parser(
        "jobs", parents=[common], help="recent studies and their jobs",
        description="Recent studies, newest first, with their latest job, scores and "
        "deliveries; refused associations are counted below the table.")
    j.add_argument("--state", choices=[s.value for s in StudyState],
                   help="only studies in this state")
    j.add_argument("--since", metavar="WHEN",
                   help="only studies received since: an ISO date/time (2026-12-01, "
                   "2026-12-01T08:00) or a duration back from now (30m, 2h, 3d)")
    j.add_argument("--patient", metavar="ID", help="only this Patient ID")
    j.add_argument("--accession", metavar="NUMBER", help="only this Accession Number")
    j.add_argument("--study", metavar="UID",
                   help="only this Study Instance UID (or its trailing digits)")
    j.add_argument("--refused", action="store_true",
                   help="list refused associations and images instead")
    j.add_argument("--json", action="store_true", help="print a JSON list (ISO 8601 times)")
    j.add_argument("--follow", action="store_true", help="keep printing events as they happen")
    j.add_argument("--limit", type=int, default=50, help="at most this many rows (default 50)")
    j.set_defaults(func=cmd_jobs)
    r = sub.add_parser("retry", parents=[common],
                       help="put dead-lettered deliveries back in the outbox",
                       description="Put dead-lettered deliveries (of one study, or all) back "
                       "in the outbox; the running node sends them.")
    r.add_argument("study_key", nargs="?", metavar="STUDY",
                   help="Study Instance UID or accession (default: every study)")
    r.add_argument("--study", help="the same as STUDY")
    r.set_defaults(func=cmd_retry)
