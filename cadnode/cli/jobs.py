"""``cadnode jobs`` and ``cadnode retry``: what the job database holds, and putting
dead-lettered deliveries back."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from cadnode.cli.common import open_database
from cadnode.config import Settings


def _fmt_time(t: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) if t else "-"


def _fmt_scores(job: dict[str, Any] | None) -> str:
    if not job or not job.get("scores"):
        return "-"
    breasts = job["scores"].get("breasts", {})
    return " ".join(
        f"{side}:ca={b['cancer']:.2f},calc={b['calcification']:.2f}"
        for side, b in sorted(breasts.items())
    )


def _state_note(job: dict[str, Any]) -> str:
    """Why a study is failed or done-partial, in a few words."""
    if job.get("error"):
        return f" ({job['error'][:40]})"
    scores = job.get("scores") or {}
    notes = []
    missing = (scores.get("selection") or {}).get("missing") or {}
    if missing:
        notes.append("missing " + ",".join(missing))
    failed = scores.get("failed_views") or {}
    if failed:
        notes.append("unreadable " + ",".join(failed))
    return f" ({'; '.join(notes)})" if notes else ""


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ["STUDY", "STATE", "VIEWS", "SCORES", "SENT", "RECEIVED", "FINISHED"]
    lines = [header]
    for r in rows:
        job = r["job"] or {}
        d = r["deliveries"]
        total = sum(d.values())
        lines.append([
            "…" + r["study_uid"][-20:] if len(r["study_uid"]) > 21 else r["study_uid"],
            r["state"] + _state_note(job),
            ",".join(r["views"]) or "-",
            _fmt_scores(job),
            (f"{d.get('sent', 0)}/{total}" + (f" ({d['dead']} dead)" if d.get("dead") else ""))
            if total else "-",
            _fmt_time(r["last_received"]),
            _fmt_time(job.get("finished_at")),
        ])
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in lines)


def cmd_jobs(settings: Settings, args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from cadnode.jobs.db import Event
    from cadnode.jobs.queue import study_rows

    db = open_database(settings)
    rows = study_rows(db, args.limit)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows))
    if not args.follow:
        return 0
    with db.session() as s:
        last = s.scalar(select(Event.id).order_by(Event.id.desc()).limit(1)) or 0
    try:
        while True:
            time.sleep(1.0)
            with db.session() as s:
                events = s.scalars(select(Event).where(Event.id > last).order_by(Event.id)).all()
            for e in events:
                last = e.id
                if args.json:
                    print(json.dumps({"at": e.at, "level": e.level, "kind": e.kind,
                                      "study_uid": e.study_uid, "message": e.message}), flush=True)
                else:
                    print(f"{_fmt_time(e.at)} {e.level:<7} {e.kind:<14} "
                          f"{(e.study_uid or '-')[-24:]:<24} {e.message}", flush=True)
    except KeyboardInterrupt:
        return 0


def cmd_retry(settings: Settings, args: argparse.Namespace) -> int:
    from cadnode.jobs.queue import retry_dead_deliveries

    db = open_database(settings)
    n = retry_dead_deliveries(db, args.study)
    print(f"{n} dead-lettered delivery(ies) put back in the outbox")
    return 0



def register(sub: Any, common: argparse.ArgumentParser) -> None:
    j = sub.add_parser("jobs", parents=[common], help="recent studies and their jobs")
    j.add_argument("--json", action="store_true", help="print a JSON list")
    j.add_argument("--follow", action="store_true", help="keep printing events as they happen")
    j.add_argument("--limit", type=int, default=50)
    j.set_defaults(func=cmd_jobs)
    r = sub.add_parser("retry", parents=[common],
                       help="put dead-lettered deliveries back in the outbox")
    r.add_argument("--study", help="only this Study Instance UID")
    r.set_defaults(func=cmd_retry)
