"""The web app (dashboard, /metrics, /healthz, /readyz) over a job database that the real code
paths filled: the listener received a 4-view study over DICOM, a real Worker (ONNX Runtime,
packaged model) analysed it, the outbox delivered its results to a PACS and failed to reach a
second destination that is down; an association to the wrong AE title was refused."""

from __future__ import annotations

import base64
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from cadnode.cli.serve import _counted
from cadnode.config import Destination, Settings
from cadnode.demo import DemoPACS, free_port
from cadnode.dicom.listener import Listener
from cadnode.dicom.sender import DeliveryError, send_files
from cadnode.jobs import queue
from cadnode.jobs.db import Database
from cadnode.jobs.outbox import Outbox
from cadnode.jobs.worker import Worker
from cadnode.web.app import Node, create_app
from cadnode.web.metrics import ModelInfo, NodeMetrics, refusal_reason
from tests.robustness.corpus import synthetic_mg

STUDY_UID = "1.2.826.0.1.3680043.10.1234.77.1"
ACCESSION = "WEBACC77"
PARTIAL_UID = "1.2.826.0.1.3680043.10.1234.78.1"  # one view only: done-partial
TOKEN = "s3cret-token"


@dataclass
class Filled:
    settings: Settings
    db: Database
    metrics: NodeMetrics
    model: ModelInfo
    pacs: Destination
    down: Destination
    sizes: int


def write_study(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, (side, view) in enumerate([("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")]):
        ds = synthetic_mg(STUDY_UID, f"{STUDY_UID}.{n + 1}", side, view, rows=384, cols=192,
                          AccessionNumber=ACCESSION, PatientID="WEBPAT1",
                          PatientName="Secret^Name")
        path = folder / f"{n + 1}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    ds = synthetic_mg(PARTIAL_UID, f"{PARTIAL_UID}.1", "L", "CC", rows=384, cols=192,
                      AccessionNumber="WEBPART78", PatientID="WEBPAT2")
    path = folder / "partial.dcm"
    ds.save_as(path, enforce_file_format=True)
    paths.append(path)
    return paths


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Filled]:
    tmp = tmp_path_factory.mktemp("web")
    pacs_server = DemoPACS(tmp / "pacs")
    pacs = Destination(pacs_server.ae_title, "127.0.0.1", pacs_server.start())
    down = Destination("DOWN", "127.0.0.1", free_port())  # nothing listens there
    home = tmp / "home"
    home.mkdir()
    settings = Settings(home=home, destinations=(pacs, down))
    db = Database(settings.database_url, home=home)
    db.create_schema()
    metrics = NodeMetrics()
    worker = Worker(settings, db, metrics=metrics)
    on_stored, on_refused = _counted(
        lambda stored: queue.record_instance(db, stored),
        lambda msg, uid: db.log("refused", msg, uid or None, "warning"), metrics)
    listener = Listener(settings.spool_dir, on_stored, settings.ae_title, on_refused=on_refused)
    port = listener.start("127.0.0.1", 0)
    files = write_study(tmp / "study")
    try:
        assert all(r.ok for r in send_files(files, "127.0.0.1", port, settings.ae_title))
        with pytest.raises(DeliveryError):  # refused: the called AE is not this node
            send_files(files[:1], "127.0.0.1", port, "NOTTHISNODE")
        queued = queue.assemble_studies(db, 0, 0, now=time.time() + 1)
        assert sorted(queued) == [STUDY_UID, PARTIAL_UID]
        assert worker.run_once() and worker.run_once()
        outbox = Outbox(db, settings.ae_title, metrics=metrics)
        assert outbox.deliver_to(str(pacs)) == 8
        assert outbox.deliver_to(str(down)) == 0
        assert pacs_server.wait_for(8, 30)
    finally:
        listener.stop()
        worker.close()
        pacs_server.stop()
    m = worker.engine.manifest
    model = ModelInfo(m.name, m.version, str(worker.engine.backend),
                      tuple(worker.engine.providers), bool(m.demo))
    yield Filled(settings, db, metrics, model, pacs, down, sum(p.stat().st_size for p in files))
    db.dispose()


def make_client(f: Filled, token: str = "") -> TestClient:
    s = f.settings
    node = Node(db=f.db, home=s.home, spool_dir=s.spool_dir, results_dir=s.results_dir,
                ae_title=s.ae_title, model=f.model, metrics=f.metrics, token=token)
    return TestClient(create_app(node))


@pytest.fixture(scope="module")
def client(filled: Filled) -> TestClient:
    return make_client(filled)


def families(text: str) -> dict[str, object]:
    return {fam.name: fam for fam in text_string_to_metric_families(text)}


def sample(fams: dict, family: str, sample_name: str | None = None, **labels: str) -> float:  # type: ignore[type-arg]
    fam = fams[family]
    want = sample_name or family
    found = [s.value for s in fam.samples
             if s.name == want and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (want, labels, fam.samples)
    return float(found[0])


def test_metrics_parse_and_count_what_happened(client: TestClient, filled: Filled) -> None:
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    fams = families(r.text)
    expected = {
        "cadnode_database_up", "cadnode_studies", "cadnode_queue_depth",
        "cadnode_queue_oldest_age_seconds", "cadnode_jobs_running", "cadnode_outbox_deliveries",
        "cadnode_stored_instances", "cadnode_stored_bytes", "cadnode_refused_recorded",
        "cadnode_spool_free_bytes", "cadnode_start_time_seconds", "cadnode_model_info",
        "cadnode_stage_seconds", "cadnode_job_seconds", "cadnode_inference_seconds",
        "cadnode_jobs_finished",
        "cadnode_received_instances", "cadnode_received_bytes", "cadnode_refusals",
        "cadnode_deliveries", "cadnode_delivery_failures",
    }
    assert expected <= set(fams), expected - set(fams)
    assert fams["cadnode_stage_seconds"].type == "histogram"  # type: ignore[attr-defined]
    assert fams["cadnode_deliveries"].type == "counter"  # type: ignore[attr-defined]
    assert sample(fams, "cadnode_database_up") == 1
    assert sample(fams, "cadnode_studies", state="done") == 1
    assert sample(fams, "cadnode_studies", state="done-partial") == 1
    assert sample(fams, "cadnode_studies", state="failed") == 0
    assert sample(fams, "cadnode_queue_depth") == 0
    assert sample(fams, "cadnode_queue_oldest_age_seconds") == 0
    pacs, down = str(filled.pacs), str(filled.down)
    assert sample(fams, "cadnode_outbox_deliveries", destination=pacs, state="sent") == 8
    assert sample(fams, "cadnode_outbox_deliveries", destination=down, state="pending") == 8
    assert sample(fams, "cadnode_stored_instances") == 5
    assert sample(fams, "cadnode_stored_bytes") > 0
    assert sample(fams, "cadnode_refused_recorded", scope="association",
                  reason="called_ae_mismatch") == 1
    assert sample(fams, "cadnode_spool_free_bytes") > 0
    info = sample(fams, "cadnode_model_info", name=filled.model.name,
                  version=filled.model.version, backend="onnxruntime")
    assert info == 1
    for stage in ("select", "pixels", "text", "model", "results"):
        assert sample(fams, "cadnode_stage_seconds", "cadnode_stage_seconds_count",
                      stage=stage) == 2
    stages = {s.labels["stage"] for s in fams["cadnode_stage_seconds"].samples}  # type: ignore[attr-defined]
    assert "total" not in stages  # a sum over stages counts each job once
    assert sample(fams, "cadnode_job_seconds", "cadnode_job_seconds_count") == 2
    assert sample(fams, "cadnode_job_seconds", "cadnode_job_seconds_sum") > 0
    assert sample(fams, "cadnode_inference_seconds", "cadnode_inference_seconds_count",
                  backend="onnxruntime") == 2
    assert sample(fams, "cadnode_jobs_finished", "cadnode_jobs_finished_total",
                  state="done") == 1
    assert sample(fams, "cadnode_jobs_finished", "cadnode_jobs_finished_total",
                  state="done-partial") == 1
    assert sample(fams, "cadnode_received_instances", "cadnode_received_instances_total") == 5
    received = sample(fams, "cadnode_received_bytes", "cadnode_received_bytes_total")
    assert received == sample(fams, "cadnode_stored_bytes")
    assert sample(fams, "cadnode_refusals", "cadnode_refusals_total", scope="association",
                  reason="called_ae_mismatch") == 1
    delivered = [s for s in fams["cadnode_deliveries"].samples  # type: ignore[attr-defined]
                 if s.name == "cadnode_deliveries_total"]
    assert {s.labels["destination"] for s in delivered} == {pacs}
    assert sum(s.value for s in delivered) == 8
    assert {s.labels["kind"] for s in delivered} == {"cad_sr", "tid1500", "sc", "gsps"}
    failed = [s for s in fams["cadnode_delivery_failures"].samples  # type: ignore[attr-defined]
              if s.name == "cadnode_delivery_failures_total"]
    assert {s.labels["destination"] for s in failed} == {down}
    assert sum(s.value for s in failed) == 8


def test_dashboard_shows_the_study_and_no_patient_name(client: TestClient,
                                                       filled: Filled) -> None:
    r = client.get("/")
    assert r.status_code == 200
    page = r.text
    assert ACCESSION in page and "WEBPAT1" in page and "2024-01-02" in page
    assert 'class="state state-done"' in page and 'class="state state-done-partial"' in page
    assert "missing L-MLO,R-CC,R-MLO" in page and "WEBPART78" in page
    assert "Secret" not in page and "Name" not in page.replace("name=", "")
    assert "called AE" in page and "association: called_ae_mismatch" in page
    assert 'id="queue-depth">0<' in page
    assert filled.model.name in page
    assert "database ok" in page and "spool ok" in page
    assert client.get("/", params={"state": "failed"}).text.count('class="study"') == 0
    assert client.get("/", params={"state": "done"}).text.count('class="study"') == 1
    assert client.get("/", params={"accession": "WEBPART78"}).text.count('class="study"') == 1
    assert client.get("/", params={"state": "bogus"}).status_code == 400


def test_study_page_scores_images_deliveries_and_thumbnail(client: TestClient) -> None:
    for key in (STUDY_UID, ACCESSION):
        r = client.get(f"/study/{key}")
        assert r.status_code == 200, r.text
    page = r.text
    assert f'id="accession">{ACCESSION}<' in page
    assert "Left breast" in page and "Right breast" in page
    assert page.count('<td class="analysed">yes</td>') == 4
    assert page.count('class="delivery"') == 8
    assert "state state-sent" in page and "state state-pending" in page
    assert "Secret" not in page
    assert 'id="sc-thumbnail"' in page
    png = client.get(f"/study/{STUDY_UID}/sc.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    image = Image.open(BytesIO(png.content))
    assert image.format == "PNG" and 0 < max(image.size) <= 1200
    assert image.getextrema() != ((0, 0), (0, 0), (0, 0))  # not a blank picture
    partial = client.get("/study/WEBPART78")
    assert partial.status_code == 200
    assert 'id="study-state">done-partial<' in partial.text
    assert "missing L-MLO,R-CC,R-MLO" in partial.text
    assert partial.text.count('<td class="analysed">yes</td>') == 1
    assert client.get("/study/1.2.3.4").status_code == 404
    assert client.get("/study/1.2.3.4/sc.png").status_code == 404


def test_health_and_readiness(client: TestClient) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "alive"
    r = client.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json() == {"ready": True, "failed": [],
                        "checks": {"database": "ok", "spool": "ok"}}


def test_token_guards_every_path_but_the_probes(filled: Filled) -> None:
    c = make_client(filled, TOKEN)
    for path in ("/", "/metrics", f"/study/{STUDY_UID}", f"/study/{STUDY_UID}/sc.png"):
        r = c.get(path)
        assert r.status_code == 401, path
        assert r.headers["www-authenticate"].startswith("Basic")
        assert c.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert c.get("/healthz").status_code == 200
    assert c.get("/readyz").status_code == 200  # a probe carries no secret (check names only)
    basic = base64.b64encode(f"admin:{TOKEN}".encode()).decode()
    assert c.get("/", headers={"Authorization": f"Basic {basic}"}).status_code == 200
    assert c.get("/", auth=("anyone", TOKEN)).status_code == 200
    assert c.get("/", auth=("admin", "nope")).status_code == 401
    assert c.get("/", headers={"Authorization": "Basic !!!"}).status_code == 401


def test_readyz_says_which_check_failed(tmp_path: Path, filled: Filled) -> None:
    """A removed database file, a spool that cannot take files, no model: 503 naming each."""
    home = tmp_path / "home"
    home.mkdir()
    db = Database(f"sqlite:///{home / 'gone.db'}", home=home)
    db.create_schema()
    spool = home / "spool"
    node = Node(db=db, home=home, spool_dir=spool, results_dir=home / "results",
                model=filled.model)
    c = TestClient(create_app(node))
    assert c.get("/readyz").status_code == 200
    assert c.get("/").status_code == 200  # an empty database is a fine dashboard
    for suffix in ("", "-wal", "-shm"):
        Path(f"{home / 'gone.db'}{suffix}").unlink(missing_ok=True)
    r = c.get("/readyz")
    assert r.status_code == 503
    body = r.json()
    assert body["ready"] is False and body["failed"] == ["database"]
    assert "gone" in body["checks"]["database"]
    assert c.get("/healthz").status_code == 200  # alive all the same
    spool.rmdir()  # the first /readyz made it
    spool.write_text("not a folder")  # the spool cannot be created nor written into
    node.checks["worker"] = lambda: "a worker is not running jobs (see the log)"
    body = c.get("/readyz").json()
    assert body["failed"] == ["database", "spool", "worker"]
    assert body["checks"]["worker"] == "a worker is not running jobs (see the log)"
    db.dispose()


@pytest.mark.parametrize(("message", "expected"), [
    ("C-STORE refused (0xA700): spool has 10 MiB free", ("store", "out_of_resources")),
    ("C-STORE refused (0xC000): unreadable dataset from X", ("store", "cannot_understand")),
    ("C-STORE refused (0xA900): dataset UIDs differ", ("store", "dataset_mismatch")),
    ("association from 1.2.3.4:5 rejected: calling AE 'X' is not allowed",
     ("association", "calling_ae_not_allowed")),
    ("association from 1.2.3.4:5 rejected: called AE 'X' is not this node (CADNODE)",
     ("association", "called_ae_mismatch")),
    ("association from 1.2.3.4:5 rejected: more than 16 associations at once",
     ("association", "too_many_associations")),
    ("association from X@1.2.3.4 sent nothing we accept; storage SOP class(es) refused: CT",
     ("association", "sop_class_not_accepted")),
    ("TLS handshake from 1.2.3.4:5 failed: bad cert", ("connection", "tls_handshake_failed")),
    ("connection from 1.2.3.4:5 refused: it already holds 8 connections",
     ("connection", "too_many_connections_per_peer")),
    ("connection from 1.2.3.4:5 closed: a PDU not complete within 60 s (network timeout)",
     ("connection", "network_timeout")),
    ("connection from 1.2.3.4:5 closed: unknown PDU type 0x09",
     ("connection", "protocol_violation")),
    ("something new", ("other", "other")),
])
def test_refusal_reasons(message: str, expected: tuple[str, str]) -> None:
    assert refusal_reason(message) == expected


def test_http_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {"PATH": "/usr/bin:/bin", "CADNODE_HOME": str(tmp_path / "home"),
               "CADNODE_PORT": "0", "CADNODE_HTTP_PORT": str(port), "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-m", "cadnode", "serve"], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"cadnode: bad setting: CADNODE_HTTP_PORT: 127.0.0.1:{port} is already in use; stop "
        "what listens there or choose another port")
