"""The outbox: sends every pending result to its destination; a failure only delays it."""

from __future__ import annotations

import logging
import ssl
from collections import defaultdict
from pathlib import Path

from cadnode.config import parse_destinations
from cadnode.dicom.sender import DeliveryError, client_ssl_context, send_files
from cadnode.jobs.db import Database, Delivery
from cadnode.jobs.queue import DEFAULT_RETRY, RetryPolicy, due_deliveries, mark_delivery

log = logging.getLogger(__name__)


def deliver_due(
    db: Database, calling_ae: str, retry: RetryPolicy = DEFAULT_RETRY, timeout: float = 30.0,
    tls: ssl.SSLContext | None = None,
) -> int:
    """Try every due delivery once, one association per destination (over TLS with ``tls`` for
    a ``;tls`` destination); returns how many were sent."""
    by_dest: dict[str, list[Delivery]] = defaultdict(list)
    for d in due_deliveries(db):
        by_dest[d.destination].append(d)
    sent = 0
    for dest_text, items in by_dest.items():
        (dest,) = parse_destinations(dest_text)
        try:
            results = send_files(
                [Path(d.path) for d in items], dest.host, dest.port, dest.ae_title,
                calling_ae=calling_ae, timeout=timeout,
                tls=(tls or client_ssl_context()) if dest.tls else None,
            )
        except DeliveryError as exc:
            log.warning("delivery to %s failed: %s", dest_text, exc)
            for d in items:
                mark_delivery(db, d.id, str(exc), retry=retry)
            continue
        by_path = {str(r.path): r for r in results}
        delivered: list[str] = []
        for d in items:
            r = by_path.get(d.path)
            if r is not None and r.ok:
                mark_delivery(db, d.id, None, retry=retry)
                delivered.append(d.kind)
                sent += 1
            else:
                why = "not sent" if r is None else r.error or f"status 0x{r.status:04X}"
                mark_delivery(db, d.id, why, retry=retry)
        if delivered:
            log.info("delivered %s to %s", ", ".join(delivered), dest_text)
    return sent
