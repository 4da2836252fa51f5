"""The read-only dashboard, ``/metrics``, ``/healthz`` and ``/readyz`` as one Starlette app.

Pages are rendered on the server (Jinja2, no front-end build, no script); the dashboard reloads
itself every few seconds. What it shows comes from the same read queries as ``cadnode jobs`` and
``cadnode study`` (cadnode.jobs.admin). Patient ID and accession are shown (the admin's PACS
shows them too), never a patient's name.

With a token every path except ``/healthz`` and ``/readyz`` needs ``Authorization: Bearer
<token>`` or HTTP basic auth with the token as password (any user name).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Receive, Scope, Send

from cadnode.dicom.spool import free_bytes
from cadnode.jobs import admin
from cadnode.jobs.db import Database
from cadnode.jobs.enum import StudyState
from cadnode.jobs.queue import queue_state
from cadnode.web.health import Check, database_check, run_checks, spool_check
from cadnode.web.metrics import DatabaseCollector, ModelInfo, NodeMetrics, refusal_reason
from cadnode.web.thumbnail import sc_png

TEMPLATES = Path(__file__).with_name("templates")
#: Seconds between two reloads of the dashboard.
REFRESH_SECONDS = 10
#: Paths that answer without the token: Kubernetes' and Docker's probes carry no secrets, and
#: these say nothing about patients (readiness: which check failed, and why).
OPEN_PATHS = frozenset({"/healthz", "/readyz"})


@dataclass
class Node:
    """What the app reads: the database, where files are, the model, the metrics."""

    db: Database
    home: Path
    spool_dir: Path
    results_dir: Path
    ae_title: str = "CADNODE"
    model: ModelInfo | None = None
    metrics: NodeMetrics = field(default_factory=NodeMetrics)
    token: str = ""
    started_at: float = field(default_factory=time.time)
    #: extra readiness checks (name -> check): the workers' and the listener's
    checks: dict[str, Check] = field(default_factory=dict)

    def readiness(self) -> dict[str, str]:
        """The database and the spool; the workers and the listener where this process runs
        them (``checks``). A process without a model (``cadnode listen``) is ready without."""
        return run_checks({"database": database_check(self.db),
                           "spool": spool_check(self.spool_dir),
                           **self.checks})


def create_app(node: Node) -> Starlette:
    """The ASGI app for ``node``; its metrics read ``node.db`` at each scrape."""
    node.metrics.read_database(DatabaseCollector(node.db, node.spool_dir, node.model,
                                                 node.started_at))
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True)
    env.filters.update(when=_when, pct=_pct, age=_age, size=_size, short=_short,
                       date=_dicom_date)
    templates = Jinja2Templates(env=env)

    def page(request: Request, name: str, **context: Any) -> HTMLResponse:
        context.update(node=node, health=node.readiness(), now=time.time(),
                       refresh=REFRESH_SECONDS, spool_free=free_bytes(node.spool_dir))
        return templates.TemplateResponse(request, name, context)

    def dashboard(request: Request) -> Response:
        q = request.query_params
        state = q.get("state") or None
        if state is not None and state not in {s.value for s in StudyState}:
            raise HTTPException(400, f"unknown state {state!r}")
        flt = admin.StudyFilter(state=state, accession=q.get("accession") or None,
                                patient=q.get("patient") or None, limit=100)
        refused = admin.refused_associations(node.db, limit=20)
        for r in refused:
            r["scope"], r["reason"] = refusal_reason(r["message"])
        return page(request, "index.html", studies=admin.list_studies(node.db, flt),
                    queue=queue_state(node.db), refused=refused, flt=flt,
                    states=[s.value for s in StudyState])

    def study(request: Request) -> Response:
        detail = _detail(node, request.path_params["uid"])
        sc = next((r for r in detail["results"] if r["kind"] == "sc" and r["exists"]), None)
        return page(request, "study.html", s=detail, sc=sc)

    def study_sc(request: Request) -> Response:
        detail = _detail(node, request.path_params["uid"])
        sc = next((r for r in detail["results"] if r["kind"] == "sc" and r["exists"]), None)
        if sc is None:
            raise HTTPException(404, "this study has no Secondary Capture result")
        path = Path(sc["path"]).resolve()
        if not path.is_relative_to(node.results_dir.resolve()):
            raise HTTPException(404, "the Secondary Capture is not under the results folder")
        return Response(sc_png(path), media_type="image/png",
                        headers={"Cache-Control": "private, max-age=3600"})

    def metrics(_: Request) -> Response:
        return Response(generate_latest(node.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def healthz(_: Request) -> Response:
        return JSONResponse({"status": "alive",
                             "uptime_seconds": round(time.time() - node.started_at, 1)})

    def readyz(_: Request) -> Response:
        checks = node.readiness()
        failed = {k: v for k, v in checks.items() if v != "ok"}
        return JSONResponse({"ready": not failed, "checks": checks, "failed": sorted(failed)},
                            status_code=503 if failed else 200)

    async def not_found(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return PlainTextResponse(f"{exc.status_code}: {exc.detail}\n",
                                 status_code=exc.status_code)

    app = Starlette(routes=[
        Route("/", dashboard),
        Route("/study/{uid:str}", study),
        Route("/study/{uid:str}/sc.png", study_sc),
        Route("/metrics", metrics),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
    ], exception_handlers={HTTPException: not_found})
    if node.token:
        app.add_middleware(TokenAuth, token=node.token)  # type: ignore[arg-type]
    return app


class TokenAuth:
    """401 for any request without the token, except on :data:`OPEN_PATHS`."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app, self.token = app, token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        response = PlainTextResponse(
            "401: this node's dashboard needs its token (CADNODE_HTTP_TOKEN): "
            "Authorization: Bearer <token>, or basic auth with the token as password\n",
            status_code=401,
            headers={"WWW-Authenticate": 'Basic realm="cadnode", charset="UTF-8"'})
        await response(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        header = next((v for k, v in scope.get("headers", []) if k == b"authorization"), b"")
        scheme, _, value = header.partition(b" ")
        value = value.strip()
        if scheme.lower() == b"bearer":
            return hmac.compare_digest(value, self.token)
        if scheme.lower() == b"basic":
            try:
                decoded = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                return False
            return hmac.compare_digest(decoded.partition(b":")[2], self.token)
        return False


def _detail(node: Node, key: str) -> dict[str, Any]:
    try:
        detail = admin.study_detail(node.db, key, node.results_dir)
    except admin.AmbiguousStudy as exc:
        raise HTTPException(409, str(exc)) from None
    if detail is None:
        raise HTTPException(404, f"no study {key}")
    return detail


# --- template filters -----------------------------------------------------------------------


def _when(iso: str | None) -> str:
    """An ISO 8601 time as ``2026-12-02 08:00:01 UTC`` ("" when none)."""
    if not iso:
        return ""
    try:
        t = datetime.fromisoformat(iso)
    except ValueError:
        return iso
    return t.strftime("%Y-%m-%d %H:%M:%S ") + (t.tzname() or "")


def _pct(value: Any) -> str:
    return "" if value is None else f"{100 * float(value):.1f} %"


def _age(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _size(n: float | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _short(uid: str | None, keep: int = 12) -> str:
    """A long UID's last digits, with an ellipsis in front."""
    if not uid:
        return ""
    return uid if len(uid) <= keep + 1 else "…" + uid[-keep:]


def _dicom_date(da: str | None) -> str:
    """DICOM DA ``20261202`` as ``2026-12-02``."""
    if not da or len(da) != 8 or not da.isdigit():
        return da or ""
    return f"{da[:4]}-{da[4:6]}-{da[6:]}"
