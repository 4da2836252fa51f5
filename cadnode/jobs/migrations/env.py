"""Alembic's environment: migrations run on the connection cadnode.jobs.schema hands over
(there is no alembic.ini; the URL never passes through a file)."""

from __future__ import annotations

from alembic import context

from cadnode.jobs.db import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
