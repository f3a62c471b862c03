"""Alembic environment for roma-otel's PostgreSQL schema; run by ``alembic ...`` and ``roma-otel db ...``.

The database URL comes from roma_otel.storage.migrate: an explicit URL (``--url`` or ``alembic -x url=...``),
else $ROMA_OTEL_DATABASE_URL, else $DATABASE_URL, else storage.postgres.connection_url in the roma-otel config.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from alembic.util import CommandError

from roma_otel.config import ConfigError
from roma_otel.storage.migrate import URL_ATTRIBUTE, engine, resolve_database_url, sqlalchemy_url

config = context.config

# Only the repository's alembic.ini configures logging; the packaged API leaves the host's logging alone.
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _explicit_url() -> str | None:
    return config.attributes.get(URL_ATTRIBUTE) or context.get_x_argument(as_dictionary=True).get("url")


def run_migrations_offline() -> None:
    """``alembic ... --sql``: emit the SQL; without any URL, render it for PostgreSQL anyway."""
    try:
        url = sqlalchemy_url(resolve_database_url(_explicit_url()))
        context.configure(url=url, literal_binds=True, dialect_opts={"paramstyle": "named"})
    except ConfigError:
        context.configure(dialect_name="postgresql", literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Connect and migrate, all revisions of one run in one transaction (PostgreSQL DDL is transactional)."""
    explicit = _explicit_url()
    try:
        connectable = engine(explicit)
    except ConfigError as exc:
        if config.attributes.get(URL_ATTRIBUTE):
            raise  # called through roma_otel.storage.migrate: let the caller report it
        raise CommandError(str(exc)) from None  # the alembic command line prints "FAILED: <message>"
    try:
        with connectable.connect() as connection:
            context.configure(connection=connection, target_metadata=None)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        connectable.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
