"""Prometheus metrics: live counters and histograms fed by hooks, and a collector that reads
the job database at scrape time.

Everything lives in a :class:`~prometheus_client.CollectorRegistry` owned by the node (never the
process-wide default registry), so that two nodes in one process (tests) do not share series.

Live (since this process started): time per worker stage, inference latency, jobs finished,
instances and bytes received, refusals by reason, deliveries and failed tries by destination.
Read from the database at each scrape: studies by state, queue depth and the age of the oldest
queued job, deliveries by destination and state, instances and bytes held, refusals recorded
(the ``refused`` events) by reason, free spool space, model and backend.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from cadnode.dicom.spool import free_bytes
from cadnode.jobs.db import Database, Delivery, Event, Instance, Study
from cadnode.jobs.enum import DeliveryState, StudyState
from cadnode.jobs.queue import queue_state

log = logging.getLogger(__name__)

#: Worker stages are seconds long (decoding a 17-megapixel JPEG 2000 takes about one).
STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
INFERENCE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: What the listener's and the transport's refusal messages start with (cadnode.dicom), in
#: order: (pattern, scope, reason). The first match wins; anything else is ("other", "other").
_REFUSALS: tuple[tuple[re.Pattern[str], str, str], ...] = tuple(
    (re.compile(p), scope, reason) for p, scope, reason in (
        (r"^C-STORE refused \(0xA700\)", "store", "out_of_resources"),
        (r"^C-STORE refused \(0xC000\)", "store", "cannot_understand"),
        (r"^C-STORE refused \(0xA900\)", "store", "dataset_mismatch"),
        (r"^C-STORE refused \(0xC211\)", "store", "unable_to_process"),
        (r"^C-STORE refused", "store", "other"),
        (r"^association .* rejected: calling AE .* is not allowed", "association",
         "calling_ae_not_allowed"),
        (r"^association .* rejected: called AE", "association", "called_ae_mismatch"),
        (r"^association .* rejected: more than \d+ associations", "association",
         "too_many_associations"),
        (r"^association .* sent nothing we accept", "association", "sop_class_not_accepted"),
        (r"^association .* rejected", "association", "other"),
        (r"^TLS handshake from .* failed", "connection", "tls_handshake_failed"),
        (r"^connection from .* refused: it already holds", "connection",
         "too_many_connections_per_peer"),
        (r"^connection from .* closed: .*network timeout", "connection", "network_timeout"),
        (r"^connection from .* closed", "connection", "protocol_violation"),
    ))


def refusal_reason(message: str) -> tuple[str, str]:
    """``(scope, reason)`` of a refusal message: scope is store, association or connection."""
    for pattern, scope, reason in _REFUSALS:
        if pattern.search(message):
            return scope, reason
    return "other", "other"


@dataclass(frozen=True)
class ModelInfo:
    """What the worker loaded: shown on the dashboard and as ``cadnode_model_info``."""

    name: str
    version: str
    backend: str
    providers: tuple[str, ...] = ()
    demo: bool = False


class NodeMetrics:
    """The node's registry and the live series; the hooks the worker, the outbox and the
    listener's callbacks call (each a few microseconds, never raising)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.stage_seconds = Histogram(
            "cadnode_stage_seconds", "Seconds per worker stage of one job (select, pixels, "
            "text, model, results)", ["stage"], registry=r, buckets=STAGE_BUCKETS)
        self.job_seconds = Histogram(
            "cadnode_job_seconds", "Seconds per job, all stages (claimed to recorded)",
            registry=r, buckets=STAGE_BUCKETS)
        self.inference_seconds = Histogram(
            "cadnode_inference_seconds", "Seconds per model call (all views of one study)",
            ["backend"], registry=r, buckets=INFERENCE_BUCKETS)
        self.jobs_finished = Counter(
            "cadnode_jobs_finished", "Job runs that ended, by outcome (done, done-partial, "
            "failed, or queued again for a retry)", ["state"], registry=r)
        self.received_instances = Counter(
            "cadnode_received_instances", "Instances received and acknowledged", registry=r)
        self.received_bytes = Counter(
            "cadnode_received_bytes", "Bytes of the instances received and acknowledged",
            registry=r)
        self.refusals = Counter(
            "cadnode_refusals", "Stores, associations and connections refused, by reason",
            ["scope", "reason"], registry=r)
        self.deliveries = Counter(
            "cadnode_deliveries", "Result objects delivered, by destination and kind",
            ["destination", "kind"], registry=r)
        self.delivery_failures = Counter(
            "cadnode_delivery_failures", "Failed delivery tries, by destination and kind",
            ["destination", "kind"], registry=r)
        self._database: Collector | None = None

    def read_database(self, collector: Collector) -> None:
        """Collect ``collector`` at each scrape, in place of the one given before."""
        if self._database is not None:
            self.registry.unregister(self._database)
        self.registry.register(collector)
        self._database = collector

    # worker hooks (cadnode.jobs.worker.WorkerMetrics)
    def stage(self, name: str, seconds: float) -> None:
        self.stage_seconds.labels(name).observe(seconds)

    def job_time(self, seconds: float) -> None:
        self.job_seconds.observe(seconds)

    def inference(self, seconds: float, backend: str) -> None:
        self.inference_seconds.labels(backend).observe(seconds)

    def job_finished(self, state: str) -> None:
        self.jobs_finished.labels(state).inc()

    # outbox hooks (cadnode.jobs.outbox.DeliveryMetrics)
    def delivered(self, destination: str, kind: str) -> None:
        self.deliveries.labels(destination, kind).inc()

    def delivery_failed(self, destination: str, kind: str) -> None:
        self.delivery_failures.labels(destination, kind).inc()

    # listener callbacks, wrapped in cadnode serve
    def instance_received(self, size: int) -> None:
        self.received_instances.inc()
        self.received_bytes.inc(max(0, size))

    def refused(self, message: str) -> None:
        self.refusals.labels(*refusal_reason(message)).inc()


@dataclass(eq=False)
class DatabaseCollector(Collector):
    """Reads the job database at each scrape. A database that cannot be read gives
    ``cadnode_database_up 0`` and none of its families, never a failed scrape."""

    db: Database
    spool_dir: Path
    model: ModelInfo | None = None
    started_at: float = field(default_factory=time.time)

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("cadnode_database_up",
                               "1 when the job database answered this scrape")
        try:
            families = list(self._from_database())
        except Exception as exc:  # the database is down: say so, keep the rest of the scrape
            log.warning("metrics: the job database could not be read: %s", exc)
            families = []
        up.add_metric([], 1.0 if families else 0.0)
        yield up
        yield from families
        free = GaugeMetricFamily("cadnode_spool_free_bytes",
                                 "Free bytes on the file system of the spool")
        spool_free = free_bytes(self.spool_dir)
        if spool_free is not None:
            free.add_metric([], spool_free)
            yield free
        started = GaugeMetricFamily("cadnode_start_time_seconds",
                                    "When this node started (UNIX seconds)")
        started.add_metric([], self.started_at)
        yield started
        if self.model is not None:
            info = InfoMetricFamily("cadnode_model", "The model package and where it runs")
            info.add_metric([], {"name": self.model.name, "version": self.model.version,
                                 "backend": self.model.backend,
                                 "providers": ",".join(self.model.providers),
                                 "demo": str(self.model.demo).lower()})
            yield info

    def _from_database(self) -> Iterator[Metric]:
        queue = queue_state(self.db)
        with self.db.session() as s:
            by_state = dict(s.execute(select(Study.state, func.count())
                                      .group_by(Study.state)).all())
            deliveries = s.execute(select(Delivery.destination, Delivery.state, func.count())
                                   .group_by(Delivery.destination, Delivery.state)).all()
            instances, size = s.execute(select(func.count(),
                                               func.coalesce(func.sum(Instance.size), 0))).one()
            refused = s.scalars(select(Event.message).where(Event.kind == "refused")).all()
        studies = GaugeMetricFamily("cadnode_studies", "Studies in the job database by state",
                                    labels=["state"])
        for study_state in StudyState:
            studies.add_metric([study_state.value], float(by_state.pop(study_state.value, 0)))
        for other, n in sorted(by_state.items()):  # a state written by another version
            studies.add_metric([str(other)], float(n))
        yield studies
        depth = GaugeMetricFamily("cadnode_queue_depth", "Jobs waiting for a worker")
        depth.add_metric([], float(queue.depth))
        yield depth
        age = GaugeMetricFamily("cadnode_queue_oldest_age_seconds",
                                "Seconds the oldest queued job has waited (0 when none)")
        age.add_metric([], queue.oldest_age)
        yield age
        run = GaugeMetricFamily("cadnode_jobs_running", "Jobs a worker holds now")
        run.add_metric([], float(queue.running))
        yield run
        outbox = GaugeMetricFamily("cadnode_outbox_deliveries",
                                   "Deliveries in the outbox by destination and state",
                                   labels=["destination", "state"])
        seen = {d for d, _, _ in deliveries}
        counts = {(d, st): n for d, st, n in deliveries}
        for dest in sorted(seen):
            for d_state in DeliveryState:
                outbox.add_metric([dest, d_state.value],
                                  float(counts.get((dest, d_state.value), 0)))
        yield outbox
        held = GaugeMetricFamily("cadnode_stored_instances",
                                 "Instances in the job database (received and not purged)")
        held.add_metric([], float(instances))
        yield held
        held_bytes = GaugeMetricFamily("cadnode_stored_bytes",
                                       "Bytes of the instances in the job database")
        held_bytes.add_metric([], float(size or 0))
        yield held_bytes
        reasons: dict[tuple[str, str], int] = {}
        for message in refused:
            key = refusal_reason(message)
            reasons[key] = reasons.get(key, 0) + 1
        recorded = GaugeMetricFamily(
            "cadnode_refused_recorded", "Refusals recorded in the event log (not purged), by "
            "scope (store, association, connection) and reason", labels=["scope", "reason"])
        for (scope, reason), n in sorted(reasons.items()):
            recorded.add_metric([scope, reason], float(n))
        yield recorded
