"""Alembic migrations of the catalog (``alembic upgrade head`` or automatic on ``mars`` start)."""
