"""The test suite's PostgreSQL server helpers (they live in the package, where the demo uses them too)."""

import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from roma_otel.storage.localpg import DSN_ENV, PostgresServer, find_bindir, wait_ready
from roma_otel.storage.migrate import upgrade

__all__ = ["DSN_ENV", "PostgresServer", "find_bindir", "other_sessions", "own_migrated_server", "wait_ready"]


@contextmanager
def own_migrated_server() -> Iterator[PostgresServer]:
    """A cluster of the test's own, with roma-otel's schema, that the test may ``halt()`` and ``resume()``
    (the suite's shared server must stay up); removed afterwards."""
    bindir = find_bindir()
    assert bindir is not None, "PostgreSQL server binaries are needed (scripts/setup.sh installs them)"
    server = PostgresServer(bindir).start()
    try:
        wait_ready(server.dsn)
        upgrade(server.dsn)
        yield server
    finally:
        server.stop()


def other_sessions(dsn: str, settle: float = 10.0) -> int:
    """Other sessions on ``dsn``'s database, once any closing ones have gone (a closed connection's server
    process can linger in pg_stat_activity for a moment)."""
    deadline = time.monotonic() + settle
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchone()
            assert row is not None
            if row[0] == 0 or time.monotonic() > deadline:
                return row[0]
            time.sleep(0.05)
