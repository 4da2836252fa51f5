"""Alembic migrations of the job database (``cadnode db upgrade``; cadnode.jobs.schema)."""
