"""roma-otel's Alembic migration environment (env.py) and revisions (versions/), shipped inside the package.

Alembic loads these files by path; ``roma_otel.storage.migrate`` and the repository's alembic.ini point at them.
"""
