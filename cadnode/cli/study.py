"""``cadnode study``, ``cadnode resend`` and ``cadnode reprocess``: one study, for the admin a
radiologist asks about it."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from cadnode.cli.common import open_existing_database
from cadnode.cli.jobs import _columns, _deliveries, _local, _study_date, resolve_or_explain
from cadnode.config import Settings, SettingsError, parse_destinations
from cadnode.results.enum import ResultKind


def _scores_lines(job: dict[str, Any] | None) -> list[str]:
    scores = (job or {}).get("scores") or {}
    if not scores.get("breasts"):
        return []
    out = [f"Scores (job {job['id']}, model {job['model_version'] or '-'}):"]  # type: ignore[index]
    for side, name in (("R", "right"), ("L", "left")):
        b = scores["breasts"].get(side)
        if b:
            out.append(f"  {name:<5} breast  cancer {b['cancer']:.3f}  "
                       f"calcification {b['calcification']:.3f}")
    exam = scores.get("exam") or {}
    if exam:
        out.append(f"  exam          cancer {exam.get('cancer', 0.0):.3f}  "
                   f"calcification {exam.get('calcification', 0.0):.3f}")
    for key, view in sorted((scores.get("views") or {}).items()):
        note = ""
        if key in (scores.get("outside_domain") or {}):
            note = "  " + _cut("outside the model's validated domain: " + ", ".join(
                scores["outside_domain"][key]), 100)
        out.append(f"  {key:<6}        cancer {view['cancer']:.3f}  "
                   f"calcification {view['calcification']:.3f}{note}")
    return out


#: The worker's stages in the order they run (``total`` last).
STAGES = ("select", "pixels", "text", "model", "results", "total")


def _stages(seconds: dict[str, float]) -> str:
    order = [k for k in STAGES if k in seconds] + sorted(set(seconds) - set(STAGES))
    return " ".join(f"{k} {seconds[k]:.2f}s" for k in order) or "-"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def format_study(d: dict[str, Any]) -> str:
    job = d["job"]
    out = [
        f"Study {d['study_uid']}",
        f"  accession {d['accession'] or '-'}  patient {d['patient_id'] or '-'}  "
        f"study date {_study_date(d['study_date'])}  from {d['calling_ae'] or '-'}",
        f"  state {d['state']}" + (f" ({d['note']})" if d["note"] else "")
        + f"  deliveries {_deliveries(d['delivery_counts'])}",
        f"  received {_local(d['first_received'])} .. {_local(d['last_received'])}  "
        f"({d['instance_count']} instance(s); views {','.join(d['views']) or '-'})",
    ]
    out += _scores_lines(job)
    out.append("\nInstances:")
    rows = [["VIEW", "ANALYSED", "SOP INSTANCE UID", "WHY / WHY NOT"]]
    for i in d["instances"]:
        label = i["view_key"] or f"{i['laterality'] or '?'}-{i['view'] or '?'}"
        if i["modifiers"]:
            label += "+" + "+".join(i["modifiers"])
        if not i["for_presentation"]:
            label += " (processing)"
        rows.append([label, "yes" if i["analysed"] else "no", i["sop_instance_uid"],
                     i["selected_because"] if i["analysed"] else i["why_not"]])
    out.append(_indent(_columns(rows)))
    out.append("\nJobs:")
    rows = [["ID", "STATE", "REASON", "ATTEMPTS", "CREATED", "STARTED", "FINISHED", "STAGES",
             "ERROR"]]
    for j in d["jobs"]:
        rows.append([str(j["id"]), j["state"], j["reason"] or "-", str(j["attempts"]),
                     _local(j["created_at"]), _local(j["started_at"]), _local(j["finished_at"]),
                     _stages(j["stage_seconds"]),
                     (j["error"] or "-").splitlines()[0][:80] if j["error"] else "-"])
    out.append(_indent(_columns(rows)) if d["jobs"] else "  none yet")
    out.append("\nResult objects:")
    rows = [["KIND", "SOP INSTANCE UID", "JOB", "FILE"]]
    for r in d["results"]:
        rows.append([r["kind"], r["sop_instance_uid"], str(r["job_id"]),
                     r["path"] + ("" if r["exists"] else " (missing)")])
    out.append(_indent(_columns(rows)) if d["results"] else "  none")
    out.append("\nDeliveries:")
    rows = [["DESTINATION", "KIND", "JOB", "STATE", "ATTEMPTS", "SENT", "LAST ERROR"]]
    for x in d["deliveries"]:
        rows.append([x["destination"], x["kind"], str(x["job_id"]), x["state"],
                     str(x["attempts"]), _local(x["sent_at"]),
                     (x["last_error"] or "-").splitlines()[0][:80] if x["last_error"] else "-"])
    out.append(_indent(_columns(rows)) if d["deliveries"] else "  none")
    out.append("\nEvents:")
    rows = [["AT", "LEVEL", "KIND", "MESSAGE"]]
    for e in d["events"]:
        rows.append([_local(e["at"]), e["level"], e["kind"], e["message"].splitlines()[0][:160]
                     if e["message"] else ""])
    out.append(_indent(_columns(rows)) if d["events"] else "  none")
    return "\n".join(out)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def cmd_study(settings: Settings, args: argparse.Namespace) -> int:
    from cadnode.jobs.admin import study_detail

    db = open_existing_database(settings)
    try:
        uid = resolve_or_explain(db, args.study, "study")
        if uid is None:
            return 1
        detail = study_detail(db, uid, settings.results_dir)
    finally:
        db.dispose()
    assert detail is not None
    print(json.dumps(detail, indent=2) if args.json else format_study(detail))
    return 0


def cmd_resend(settings: Settings, args: argparse.Namespace) -> int:
    from cadnode.jobs.admin import resend

    if args.to:
        try:
            destinations = parse_destinations(args.to, "--to")
        except SettingsError as exc:
            print(f"cadnode resend: {exc}", file=sys.stderr)
            return 2
    else:
        destinations = settings.destinations
    if not destinations:
        print("cadnode resend: no destinations configured (CADNODE_DESTINATIONS); pass "
              "--to AE@host:port", file=sys.stderr)
        return 2
    db = open_existing_database(settings, read_only=False)
    try:
        uid = resolve_or_explain(db, args.study, "resend")
        if uid is None:
            return 1
        done = resend(db, uid, destinations, args.kind, settings.results_dir)
    finally:
        db.dispose()
    for m in done.missing:
        print(f"cadnode resend: {m['kind']} {m['sop_instance_uid']} not queued: {m['why']}",
              file=sys.stderr)
    if done.job_id is None:
        print(f"cadnode resend: study {uid} has no result objects to resend", file=sys.stderr)
        return 1
    if done.queued:
        by_dest: dict[str, list[str]] = {}
        for q in done.queued:
            by_dest.setdefault(q["destination"], []).append(q["kind"])
        for dest, kinds in by_dest.items():
            print(f"queued {len(kinds)} result object(s) of study {uid} (job {done.job_id}) "
                  f"for {dest}: {', '.join(sorted(kinds))}")
        print("the running node's outbox sends them (`cadnode study` shows their state)")
    if done.already_pending:
        print(f"{done.already_pending} delivery(ies) of these objects were still pending: "
              "left as they are")
    if not done.queued and not done.already_pending:
        wanted = f" of kind {', '.join(args.kind)}" if args.kind else ""
        print(f"cadnode resend: nothing queued: no result object{wanted} of study {uid} "
              "that these destinations take", file=sys.stderr)
        return 1
    return 0


def cmd_reprocess(settings: Settings, args: argparse.Namespace) -> int:
    from cadnode.jobs.admin import NotNow, reprocess

    db = open_existing_database(settings, read_only=False)
    try:
        uid = resolve_or_explain(db, args.study, "reprocess")
        if uid is None:
            return 1
        try:
            job_id = reprocess(db, uid)
        except NotNow as exc:
            print(f"cadnode reprocess: {exc}: nothing done", file=sys.stderr)
            return 1
    finally:
        db.dispose()
    print(f"queued job {job_id} for study {uid}: every image it holds is read again; the "
          "running node's worker takes it")
    return 0


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("study", parents=[common], help="everything about one study",
                       description="Instances (and whether each was analysed, and why not), "
                       "job attempts with stage times, scores, result objects, deliveries and "
                       "events of one study.")
    s.add_argument("study", metavar="STUDY", help="Study Instance UID or accession number")
    s.add_argument("--json", action="store_true", help="print JSON (ISO 8601 times)")
    s.set_defaults(func=cmd_study)
    r = sub.add_parser("resend", parents=[common],
                       help="queue a study's result objects for delivery again",
                       description="Queue the result objects of the study's latest job again "
                       "(new pending deliveries); the running node sends them.")
    r.add_argument("study", metavar="STUDY", help="Study Instance UID or accession number")
    r.add_argument("--to", metavar="AE@HOST:PORT",
                   help="send to this destination (AE@host:port[/kind+kind][;tls], several "
                   "comma-separated) instead of the configured ones")
    r.add_argument("--kind", nargs="+", choices=[k.value for k in ResultKind], metavar="KIND",
                   help="only these objects: " + ", ".join(k.value for k in ResultKind))
    r.set_defaults(func=cmd_resend)
    p = sub.add_parser("reprocess", parents=[common], help="queue a new job for a study",
                       description="Queue a new job for the study: every image it holds is "
                       "read again and new results are sent (the running node does it).")
    p.add_argument("study", metavar="STUDY", help="Study Instance UID or accession number")
    p.set_defaults(func=cmd_reprocess)
