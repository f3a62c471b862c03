"""The test suite's PostgreSQL server helpers (they live in the package, where the demo uses them too)."""

from collections.abc import Iterator
from contextlib import contextmanager

from roma_otel.storage.localpg import DSN_ENV, PostgresServer, find_bindir, wait_ready
from roma_otel.storage.migrate import upgrade

__all__ = ["DSN_ENV", "PostgresServer", "find_bindir", "own_migrated_server", "wait_ready"]


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
