"""Runs one study through the stages: select views, pixels, text, model, results, outbox."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Protocol

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from cadnode.config import Settings, engine_options
from cadnode.dicom.pixels import (
    PixelDecodeError,
    PreparedImage,
    heatmap_to_original,
    peak_and_outline,
)
from cadnode.dicom.selection import Decision, Selection, candidate, select_views
from cadnode.dicom.spool import write_durably
from cadnode.dicom.views import MALFORMED_VALUE, ViewInfo
from cadnode.jobs.db import Database
from cadnode.jobs.decoding import DecodePool, default_processes
from cadnode.jobs.domain import outside_domain
from cadnode.jobs.inputs import encode_texts, stack_images
from cadnode.jobs.queue import (
    ClaimedJob,
    LeaseLost,
    ResultFile,
    claim_next_job,
    complete_job,
    fail_job,
    previous_objects,
    renew_lease,
    study_instances,
)
from cadnode.logs import log_context
from cadnode.results import BUILDERS
from cadnode.results.common import NotApplicable
from cadnode.results.findings import NotAnalysed, StudyFindings, ViewFinding
from cadnode.results.uids import DEFAULT_UID_ROOT, result_identity
from cadnode.runtime import DEFAULT_MODEL_PACKAGE, Engine, load_engine
from cadnode.runtime.scoring import aggregate
from cadnode.text.tokenizer import ClinicalTokenizer

log = logging.getLogger(__name__)


#: Longest wait between two failing worker iterations (seconds).
MAX_BACKOFF = 30.0


class PermanentError(RuntimeError):
    """Retrying cannot help (no usable view, for example)."""


@dataclass
class _View:
    key: str
    path: str
    header: Dataset
    info: ViewInfo
    selected_because: str
    prepared: PreparedImage | None = None
    error: str | None = None  # one line, for the result objects
    detail: str | None = None  # the whole exception, for the log and the job record


def load_model(settings: Settings) -> tuple[Engine, ClinicalTokenizer]:
    package = Path(settings.model) if settings.model else DEFAULT_MODEL_PACKAGE
    engine = load_engine(package, settings.backend, device=settings.device,
                         precision=settings.precision, **engine_options(settings))
    return engine, ClinicalTokenizer.from_file(package / "tokenizer.json")


class WorkerMetrics(Protocol):
    """What a worker reports as it goes, when given one (cadnode.web.metrics.NodeMetrics)."""

    def stage(self, name: str, seconds: float) -> None: ...
    def job_time(self, seconds: float) -> None: ...
    def inference(self, seconds: float, backend: str) -> None: ...
    def job_finished(self, state: str) -> None: ...


class _Stopwatch:
    """Seconds spent in each stage, for the job record and the benchmarks."""

    def __init__(self, on_lap: Callable[[str, float], None] | None = None) -> None:
        self.laps: dict[str, float] = {}
        self._on_lap = on_lap
        self._start = self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        if self._on_lap is not None:
            self._on_lap(name, now - self._last)
        self.laps[name] = round(now - self._last, 3)
        self.laps["total"] = round(now - self._start, 3)
        self._last = now


class Worker:
    """Claims jobs from the database and runs them; one model loaded per worker."""

    def __init__(self, settings: Settings, db: Database, owner: str | None = None,
                 metrics: WorkerMetrics | None = None) -> None:
        self.settings = settings
        self.db = db
        self.metrics = metrics
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"
        self.engine, self.tokenizer = load_model(settings)
        self.decoder = DecodePool(settings.decode_memory_mb,
                                  settings.decode_processes or default_processes(),
                                  settings.reduce_jpeg2000)
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by wake(): a job was queued in this process
        self.healthy = True  # False while iterations fail (database down, disk full)
        #: Called after each job this worker ran (``cadnode serve`` points it at the outbox, so
        #: that results leave at once rather than at the outbox's next poll).
        self.after_job: Callable[[], object] = _nothing

    def run_forever(self) -> None:
        """Run jobs until stopped. Nothing that goes wrong in one iteration ends the loop: a
        database that is down or a full disk is retried with backoff (the job in hand, if
        any, is taken back when its lease expires), so processing resumes by itself."""
        failures = 0
        try:
            while not self._stop.is_set():
                try:
                    busy = self.run_once()
                    failures = 0
                    if busy:
                        self.after_job()
                except Exception:
                    failures += 1
                    delay = min(MAX_BACKOFF,
                                self.settings.poll_seconds * 2 ** min(failures, 16))
                    log.exception("worker: an iteration failed (%d in a row); retrying in "
                                  "%.1f s", failures, delay)
                    self.healthy = False
                    self._stop.wait(delay)
                    continue
                self.healthy = True
                if not busy:  # until the next poll, or sooner when wake() says a job is queued
                    self._wake.wait(self.settings.poll_seconds)
                    self._wake.clear()
        finally:
            self.close()  # in this thread, after the last job: never under a running one

    def stop(self) -> None:
        """Ask ``run_forever`` to return after the job in progress."""
        self._stop.set()
        self._wake.set()

    def wake(self) -> None:
        """A job was queued: an idle ``run_forever`` claims it now, not at its next poll."""
        self._wake.set()

    def close(self) -> None:
        """Stop the decoding child (for a worker driven by ``run_once``)."""
        self.decoder.close()

    def run_once(self) -> bool:
        """Claim and run one job; False when the queue was empty. Database errors (while
        claiming or recording the outcome) propagate to the caller."""
        job = claim_next_job(self.db, self.owner, self.settings.lease_seconds)
        if job is None:
            return False
        with log_context(study_uid=job.study_uid, job_id=job.id):  # on every line meanwhile
            try:
                self.process(job)
            except LeaseLost as exc:
                log.warning("study %s: %s; its results are discarded", job.study_uid, exc)
            except PermanentError as exc:
                self._fail(job, str(exc), permanent=True)
            except Exception as exc:
                log.exception("study %s: job %d failed", job.study_uid, job.id)
                self._fail(job, f"{type(exc).__name__}: {exc}")
        return True

    def _fail(self, job: ClaimedJob, error: str, permanent: bool = False) -> None:
        try:
            state = fail_job(self.db, job, error, self.settings.max_attempts,
                             permanent=permanent)
            if self.metrics is not None:
                self.metrics.job_finished(state.value)
        except LeaseLost as exc:
            log.warning("study %s: %s", job.study_uid, exc)

    def _heartbeat(self, job: ClaimedJob, clock: _Stopwatch, stage: str) -> None:
        """End a stage: its time, and the lease renewed (LeaseLost stops the job)."""
        clock.lap(stage)
        renew_lease(self.db, job, self.settings.lease_seconds)

    def process(self, job: ClaimedJob) -> None:
        clock = _Stopwatch(None if self.metrics is None else self.metrics.stage)
        selection, headers, unreadable = self._select(job)
        views = sorted((_View(str(d.key), d.candidate.ref, headers[d.candidate.ref],
                              d.candidate.info, d.reason)
                        for d in selection.decisions if d.analysed), key=lambda v: v.key)
        if not views:
            raise PermanentError("no standard view (L/R CC/MLO) can be read: " + "; ".join(
                f"{k}: {why}" for k, why in selection.missing.items()))
        self._heartbeat(job, clock, "select")
        self._prepare(job, views)
        self._heartbeat(job, clock, "pixels")
        ok = [v for v in views if v.prepared is not None]
        if not ok:
            raise PermanentError("no selected view could be decoded: " + "; ".join(
                f"{v.key}: {v.detail}" for v in views))
        ids, mask = self._encode_text(ok)
        self._heartbeat(job, clock, "text")
        images = stack_images([v.prepared.array for v in ok])  # type: ignore[union-attr]
        started = time.perf_counter()
        out = self.engine.predict(images, ids, mask)
        if self.metrics is not None:
            self.metrics.inference(time.perf_counter() - started, self.engine.backend)
        self._heartbeat(job, clock, "model")
        findings_by_key: dict[str, ViewFinding] = {}
        view_scores: dict[str, dict[str, float]] = {}
        m = self.engine.manifest
        unlike: dict[str, list[str]] = {}  # view -> why it is outside the training domain
        for i, v in enumerate(ok):
            assert v.prepared is not None
            heat = np.asarray(out.heatmap[i], dtype=np.float32)
            centre, outline = peak_and_outline(heat, v.prepared)
            scores = {"cancer": float(out.cancer[i]), "calcification": float(out.calcification[i])}
            view_scores[v.key] = scores
            reasons = outside_domain(m.domain, v.header, v.prepared)
            if reasons:
                unlike[v.key] = reasons
            findings_by_key[v.key] = self._finding(v, scores, centre, outline,
                                                   heatmap_to_original(v.prepared, heat),
                                                   tuple(reasons))
        for v in views:
            if v.prepared is None:
                findings_by_key[v.key] = self._finding(v, None, None, [], None)
        if unlike:
            log.warning("study %s: %d of %d view(s) outside the model's validated domain: %s",
                        job.study_uid, len(unlike), len(ok), "; ".join(
                            f"{k}: {', '.join(r)}" for k, r in sorted(unlike.items())))
        breasts, exam = aggregate(view_scores)
        not_analysed = [_not_analysed(d, headers.get(d.candidate.ref))
                        for d in selection.not_analysed] + unreadable
        findings = StudyFindings(
            study_uid=job.study_uid,
            views=[findings_by_key[k] for k in sorted(findings_by_key)],
            breasts=breasts,
            exam=exam,
            model_name=m.name,
            model_version=m.version,
            demo_model=m.demo,
            thresholds=dict(m.thresholds),
            not_analysed=not_analysed,
            missing=dict(selection.missing),
            previous=previous_objects(self.db, job.study_id, job.id),
        )
        results = self._write_results(findings, [v.header for v in views])
        clock.lap("results")
        scores_doc = {
            "views": view_scores,
            "breasts": breasts,
            "exam": exam,
            "failed_views": {v.key: v.error for v in views if v.error},
            "outside_domain": unlike,
            "errors": {v.key: v.detail for v in views if v.detail},
            "selection": {
                "read": {v.key: {"sop_instance_uid": str(v.header.SOPInstanceUID),
                                 "reason": v.selected_because} for v in views},
                "not_analysed": [{"sop_instance_uid": n.sop_instance_uid, "label": n.label,
                                  "reason": n.reason} for n in not_analysed],
                "missing": dict(selection.missing),
            },
            "objects": {r.kind: r.version_doc() for r in results},
            "seconds": clock.laps,
        }
        # Fenced: if the lease was lost nothing is recorded and nothing enters the outbox. The
        # files just written stay: their names come from their content, so the worker that
        # holds the job now writes (and sends) the very same files.
        state = complete_job(self.db, job, scores_doc, sorted(selection.chosen), m.version,
                             results, partial=findings.incomplete)
        if self.metrics is not None:
            self.metrics.job_time(clock.laps.get("total", 0.0))
            self.metrics.job_finished(state.value)
        log.info("study %s %s: read %s%s%s; exam cancer %.1f %%; %.1f s", job.study_uid,
                 state.value, ",".join(sorted(selection.chosen)),
                 f"; missing {','.join(selection.missing)}" if selection.missing else "",
                 f"; {len(not_analysed)} image(s) not analysed" if not_analysed else "",
                 100 * exam.get("cancer", 0.0), clock.laps.get("total", 0.0))

    def _select(self, job: ClaimedJob) -> tuple[Selection[str], dict[str, Dataset],
                                                list[NotAnalysed]]:
        """Every received image of the study through the view selection, in arrival order."""
        rows = study_instances(self.db, job.study_id)
        headers: dict[str, Dataset] = {}
        unreadable: list[NotAnalysed] = []
        for stored, sop_uid, sop_class, series_uid in rows:
            path = str(self.db.file_path(stored))
            try:
                headers[path] = pydicom.dcmread(path, stop_before_pixels=True)
            except MALFORMED_VALUE as exc:  # a spool file that vanished or rotted
                log.warning("study %s: cannot read %s: %s", job.study_uid, path, exc)
                unreadable.append(NotAnalysed(sop_uid, sop_class, series_uid, "unknown view",
                                              None, "the received file could not be read"))
        candidates = [candidate(p, ds, n) for n, (p, ds) in enumerate(headers.items())]
        return select_views(candidates, self.settings.implant_policy), headers, unreadable

    def _prepare(self, job: ClaimedJob, views: list[_View]) -> None:
        """Decode and prepare each chosen view; a failure is one line in the report, the
        whole exception in the log and the job record."""
        h, w = self.engine.manifest.input_size
        outcomes = self.decoder.prepare_all([(v.path, v.info.laterality) for v in views],
                                            (h, w), self.engine.manifest.pixel_pipeline)
        for v, outcome in zip(views, outcomes, strict=True):
            if isinstance(outcome, PixelDecodeError):
                v.error, v.detail = outcome.summary, str(outcome)
            elif isinstance(outcome, MALFORMED_VALUE):  # what pydicom raises for a damaged file
                v.error = f"the image could not be read ({type(outcome).__name__})"
                v.detail = f"{type(outcome).__name__}: {outcome}"
            elif isinstance(outcome, Exception):
                raise outcome
            else:
                v.prepared = outcome
            if v.detail is not None:
                log.warning("study %s: %s not analysed: %s", job.study_uid, v.key, v.detail)

    def _encode_text(self, ok: list[_View]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask of each view's clinical text (from its header)."""
        return encode_texts(self.tokenizer, [(v.header, v.info) for v in ok],
                            self.engine.manifest.text_template_version)

    @staticmethod
    def _finding(
        v: _View,
        scores: dict[str, float] | None,
        centre: tuple[float, float] | None,
        outline: list[tuple[float, float]],
        heatmap: np.ndarray | None,
        unlike: tuple[str, ...] = (),
    ) -> ViewFinding:
        ds = v.header
        return ViewFinding(
            view_key=v.key,
            laterality=v.key[0],
            view=v.key[2:],
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            series_uid=str(ds.get("SeriesInstanceUID", "")),
            rows=v.prepared.original_shape[0] if v.prepared else _int(ds.get("Rows")),
            columns=v.prepared.original_shape[1] if v.prepared else _int(ds.get("Columns")),
            cancer=None if scores is None else scores["cancer"],
            calcification=None if scores is None else scores["calcification"],
            center=centre,
            outline=outline,
            heatmap=heatmap,
            display=None if v.prepared is None else v.prepared.display,
            error=v.error,
            selected_because=v.selected_because,
            outside_domain=unlike,
        )

    def _write_results(self, findings: StudyFindings, sources: list[Dataset]) -> list[ResultFile]:
        """Write each object under its own SOP Instance UID, so that a new version never
        overwrites a file the outbox may still be sending."""
        uid_root = self.settings.uid_root or DEFAULT_UID_ROOT
        out_dir = self.settings.results_dir / findings.study_uid
        results = []
        for kind, build in BUILDERS.items():
            try:
                ds = build(findings, sources, uid_root)
            except NotApplicable as exc:
                self.db.log("result_skipped", f"{kind}: {exc}", findings.study_uid)
                continue
            except Exception as exc:  # one object's failure must not lose the others
                log.exception("study %s: the %s object could not be built", findings.study_uid,
                              kind)
                self.db.log("result_failed", f"{kind}: {type(exc).__name__}: {exc}"[:1000],
                            findings.study_uid, "error")
                continue
            path = out_dir / f"{kind.value}.{ds.SOPInstanceUID}.dcm"
            write_durably(_encode(ds), path)
            dests = tuple(str(d) for d in self.settings.destinations if d.takes(kind))
            version = result_identity(uid_root, findings, kind).version(str(ds.SOPClassUID))
            results.append(ResultFile(kind, str(path), str(ds.SOPInstanceUID), dests, version))
        return results


def _nothing() -> None:
    """The default ``Worker.after_job``."""


def _not_analysed(d: Decision[str], header: Dataset | None) -> NotAnalysed:
    c = d.candidate
    hdr = header if header is not None else Dataset()
    return NotAnalysed(c.uid, str(hdr.get("SOPClassUID", "")),
                       str(hdr.get("SeriesInstanceUID", "")), c.label, c.info.laterality,
                       d.reason)


def _int(value: object) -> int:
    """A header number for a failed view, 0 when absent or not a number."""
    try:
        return max(0, int(value))  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return 0


def _encode(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
