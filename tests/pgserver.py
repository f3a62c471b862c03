"""The test suite's PostgreSQL server helpers (they live in the package, where the demo uses them too)."""

from roma_otel.storage.localpg import DSN_ENV, PostgresServer, find_bindir, wait_ready

__all__ = ["DSN_ENV", "PostgresServer", "find_bindir", "wait_ready"]
