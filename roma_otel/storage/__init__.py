"""PostgreSQL storage for roma-otel: the schema's Alembic migrations and the helpers that apply them.

Nothing here imports psycopg or SQLAlchemy at import time; install ``roma-otel[postgres]`` to use it.
"""
