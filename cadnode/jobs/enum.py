"""States of studies, jobs and deliveries: the strings the job database stores.

One enum per concept; ``StrEnum`` members compare equal to the stored strings, so rows written by
earlier versions read the same.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    """queued -> running -> done | done-partial | failed (running -> queued when a lease ends)."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    #: results were produced, but a standard view was missing or could not be read
    DONE_PARTIAL = "done-partial"
    FAILED = "failed"


class StudyState(StrEnum):
    """receiving -> queued -> running -> done | done-partial | failed; a new image reopens it."""

    RECEIVING = "receiving"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    DONE_PARTIAL = "done-partial"
    FAILED = "failed"


#: Study states after which a newly received image reopens the study.
FINISHED_STUDY_STATES = frozenset({StudyState.DONE, StudyState.DONE_PARTIAL, StudyState.FAILED})


class DeliveryState(StrEnum):
    """pending -> sent | dead (a failed try stays pending with a later next attempt)."""

    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"


class JobReason(StrEnum):
    """Why a study was queued."""

    COMPLETE = "complete"  # the four standard views are in and complete_seconds have passed
    STABLE = "stable"  # stable_seconds of quiet, whatever arrived
    REQUESTED = "requested"  # an admin asked for it (``cadnode reprocess``)
