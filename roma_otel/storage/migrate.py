"""Apply roma-otel's packaged Alembic migrations to PostgreSQL, with no alembic.ini needed.

``upgrade``/``downgrade``/``current`` back ``roma-otel db ...``; ``resolve_database_url`` and ``sqlalchemy_url``
are the one place a database URL is looked up and converted, shared with the migrations' env.py.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from roma_otel.config import ConfigError

if TYPE_CHECKING:
    from alembic.config import Config
    from sqlalchemy.engine import URL, Engine

__all__ = [
    "DATABASE_URL_ENV",
    "MIGRATIONS_DIR",
    "URL_ATTRIBUTE",
    "alembic_config",
    "current",
    "downgrade",
    "engine",
    "head",
    "resolve_database_url",
    "sqlalchemy_url",
    "upgrade",
]

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# roma-otel's own variable wins over the generic DATABASE_URL (which roma_otel.config also reads).
DATABASE_URL_ENV = "ROMA_OTEL_DATABASE_URL"

# Key in alembic's Config.attributes under which an explicitly given URL reaches env.py.
URL_ATTRIBUTE = "roma_otel_database_url"

_DRIVER = "postgresql+psycopg"

NO_URL_MESSAGE = (
    "no PostgreSQL database URL: pass one (--url URL to roma-otel db, report or serve; alembic -x url=URL), "
    f"or set {DATABASE_URL_ENV} or DATABASE_URL, "
    "or set storage.postgres.connection_url in the roma-otel config file named by ROMA_OTEL_CONFIG"
)


def resolve_database_url(url: str | None = None, *, env: Mapping[str, str] | None = None) -> str:
    """The database URL to migrate, as given (``postgresql://...`` or a libpq ``key=value`` DSN).

    Looked up in order: ``url``; ``$ROMA_OTEL_DATABASE_URL``; ``$DATABASE_URL``;
    ``load_config().storage.postgres.connection_url``. Raises ConfigError naming all of them if none is set.
    """
    environ: Mapping[str, str] = os.environ if env is None else env
    for candidate in (url, environ.get(DATABASE_URL_ENV), environ.get("DATABASE_URL")):
        if candidate and candidate.strip():
            return candidate.strip()
    from roma_otel.config import load_config

    configured = load_config(env=environ).storage.postgres.connection_url
    if configured and configured.strip():
        return configured.strip()
    raise ConfigError(NO_URL_MESSAGE)


def sqlalchemy_url(url: str) -> URL:
    """``url`` as a SQLAlchemy URL on the psycopg 3 driver (``postgresql+psycopg://``).

    Accepts ``postgresql://``/``postgres://`` URLs (an explicit ``+driver`` is kept) and libpq ``key=value``
    connection strings such as ``host=127.0.0.1 port=5432 dbname=roma user=roma``.
    """
    from sqlalchemy.engine import URL, make_url
    from sqlalchemy.exc import ArgumentError

    text = url.strip()
    if "://" in text:
        try:
            parsed = make_url(text)
        except ArgumentError as exc:
            raise ConfigError(f"database URL: cannot parse {_redact(text)!r}: {exc}") from None
        if parsed.drivername in ("postgresql", "postgres"):
            parsed = parsed.set(drivername=_DRIVER)
        if parsed.get_backend_name() != "postgresql":
            raise ConfigError(f"database URL: must be a PostgreSQL URL (postgresql://...), got {_redact(text)!r}")
        return parsed
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = {k: str(v) for k, v in conninfo_to_dict(text).items()}
    except ProgrammingError as exc:
        raise ConfigError(f"database URL: not a postgresql:// URL or a valid libpq connection string: {exc}") from None
    host = params.pop("host", None)
    port = params.pop("port", None)
    query: dict[str, str] = {}
    if host and ("/" in host or "," in host):  # a socket directory or several hosts: psycopg reads them as-is
        query["host"] = host
        host = None
        if port:
            query["port"] = port
            port = None
    if port and not port.isdigit():
        query["port"] = port
        port = None
    query.update(params)
    return URL.create(
        _DRIVER,
        username=query.pop("user", None),
        password=query.pop("password", None),
        host=host,
        port=int(port) if port else None,
        database=query.pop("dbname", None),
        query=query,
    )


def engine(url: str | None = None) -> Engine:
    """A connection-pool-free SQLAlchemy engine for the resolved database URL."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    return create_engine(sqlalchemy_url(resolve_database_url(url)), poolclass=NullPool)


def alembic_config(url: str | None = None) -> Config:
    """An alembic Config for the packaged migrations; an explicit ``url`` is handed to env.py as-is."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("path_separator", "os")
    if url:
        cfg.attributes[URL_ATTRIBUTE] = url
    return cfg


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Migrate the database up to ``revision`` (default: the latest, ``head``)."""
    from alembic import command

    command.upgrade(alembic_config(resolve_database_url(url)), revision)


def downgrade(url: str | None, revision: str) -> None:
    """Migrate the database down to ``revision`` (``base`` removes every roma-otel table)."""
    from alembic import command

    command.downgrade(alembic_config(resolve_database_url(url)), revision)


def current(url: str | None = None) -> str | None:
    """The database's current revision id, or None when no roma-otel migration has been applied."""
    from alembic.runtime.migration import MigrationContext

    eng = engine(url)
    try:
        with eng.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        eng.dispose()


def head() -> str | None:
    """The newest revision id shipped with this package."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def _redact(url: str) -> str:
    """``url`` with any password replaced, for error messages."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable URL>"
