"""Baseline: the schema cadnode made with ``create_all`` up to schema version 3.

A database made before migrations existed is stamped at this revision by
``cadnode db upgrade`` (after the columns versions 1 and 2 lacked are added), never re-created.

Revision ID: 0003
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cadnode_meta",
        sa.Column("key", sa.String(32), primary_key=True),
        sa.Column("value", sa.Text(), nullable=False),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("level", sa.String(8), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("study_uid", sa.String(64), nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
    )
    op.create_index("ix_events_at", "events", ["at"])
    op.create_index("ix_events_study_uid", "events", ["study_uid"])
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("patient_id", sa.String(64), nullable=False),
        sa.Column("accession", sa.String(16), nullable=False),
        sa.Column("study_date", sa.String(8), nullable=False),
        sa.Column("calling_ae", sa.String(16), nullable=False),
        sa.Column("first_received", sa.Float(), nullable=False),
        sa.Column("last_received", sa.Float(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
    )
    op.create_index("ix_studies_last_received", "studies", ["last_received"])
    op.create_index("ix_studies_state", "studies", ["state"])
    op.create_table(
        "instances",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_id", sa.Integer(), sa.ForeignKey("studies.id"), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("series_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("transfer_syntax", sa.String(64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("laterality", sa.String(1), nullable=True),
        sa.Column("view", sa.String(16), nullable=True),
        sa.Column("for_presentation", sa.Boolean(), nullable=False),
        sa.Column("modifiers", sa.String(255), nullable=False),
        sa.Column("acquired", sa.String(26), nullable=False),
        sa.Column("received_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_instances_study_id", "instances", ["study_id"])
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_id", sa.Integer(), sa.ForeignKey("studies.id"), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        sa.Column("lease_until", sa.Float(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=True),
        sa.Column("finished_at", sa.Float(), nullable=True),
        sa.Column("scores_json", sa.Text(), nullable=True),
        sa.Column("views", sa.String(64), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
    )
    op.create_index("ix_jobs_state", "jobs", ["state"])
    op.create_index("ix_jobs_study_id", "jobs", ["study_id"])
    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("destination", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt", sa.Float(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("sent_at", sa.Float(), nullable=True),
    )
    op.create_index("ix_deliveries_job_id", "deliveries", ["job_id"])
    op.create_index("ix_deliveries_next_attempt", "deliveries", ["next_attempt"])
    op.create_index("ix_deliveries_state", "deliveries", ["state"])
    # what the releases before migrations read (and so refuse nothing they do not know)
    op.execute("INSERT INTO cadnode_meta (key, value) VALUES ('schema_version', '3')")


def downgrade() -> None:
    for table in ("deliveries", "jobs", "instances", "studies", "events", "cadnode_meta"):
        op.drop_table(table)
