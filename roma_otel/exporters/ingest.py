"""The receiver's writer: spans from an OTLP request into the trace tables, acknowledged after commit.

``roma-otel serve`` answers ``POST /v1/traces`` only once the request's rows are committed, so the
sender (the SDK's exporter or the Collector, with its retries and queue) holds every span until then:
nothing sits in this process that a crash could lose, and there is no spool or replay here. The rows
are the in-process writer's (``storage.rows.standalone_batch``: the same translation), written by the
same engine (``PostgresSpanProcessor.write``: COPY, the unique span indexes, the ON CONFLICT retry
path), on a few threads with a connection each.

What a request can be told:
- ``Unavailable(retry_after)``: Postgres is away, its schema is missing, or it just failed and the
  writer waits before trying again. Answered 503 with ``Retry-After``; the sender retries.
- ``Full(retry_after)``: more spans in flight than the bound. Also 503: every sender retries it.
- an ``Ingested`` result, whose ``rejected`` spans (ones no row can be made of, or that Postgres
  refuses as data) are reported as partial success and never retried.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from roma_otel.exporters.postgres import PostgresSpanProcessor, copy_payload
from roma_otel.storage.rows import Batch, standalone_batch
from roma_otel.storage.spanview import SpanRecord

__all__ = ["Full", "IngestWriter", "Ingested", "Unavailable"]

logger = logging.getLogger("roma_otel")

_BACKOFF_START = 0.5
_BACKOFF_MAX = 5.0  # a receiver notices a database that came back within this many seconds
_MAX_MESSAGES = 3  # distinct rejection messages kept for a response


class Unavailable(Exception):
    """The database cannot take rows now; retry after ``retry_after`` seconds."""

    def __init__(self, reason: str, retry_after: float) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = max(1, math.ceil(retry_after))


class Full(Unavailable):
    """More spans in flight than the writer's bound."""


@dataclass
class Ingested:
    """A request's outcome: rows committed for every span but ``rejected``."""

    spans: int
    rejected: int = 0
    messages: list[str] = field(default_factory=list)

    def reject(self, n: int, message: str) -> None:
        self.rejected += n
        if message not in self.messages and len(self.messages) < _MAX_MESSAGES:
            self.messages.append(message)


class IngestWriter:
    """Writes decoded spans on ``connections`` threads, each with its own engine and connection.

    Several connections are safe: every request is a transaction of its own, acknowledged alone, and
    rows that two writers both insert are refused by the unique indexes (the second writes the batch
    again through ON CONFLICT). Tree nodes are merged in the database (``exporters.postgres``).
    """

    def __init__(
        self,
        dsn: str,
        *,
        connections: int = 2,
        max_queued_spans: int = 20_000,
        persist_toolkit: bool = True,
    ) -> None:
        if connections < 1:
            raise ValueError(f"connections must be at least 1, got {connections}")
        if max_queued_spans < 1:
            raise ValueError(f"max_queued_spans must be at least 1, got {max_queued_spans}")
        self.dsn = dsn
        self.connections = connections
        self.max_queued_spans = max_queued_spans
        self.persist_toolkit = persist_toolkit
        self.written_spans = 0
        self.rejected_spans = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._local = threading.local()
        self._engines: list[PostgresSpanProcessor] = []
        self._backoff = 0.0
        self._retry_at = 0.0
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    # --- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.connections, thread_name_prefix="roma-otel-ingest")

    def close(self) -> None:
        """Wait for writes in progress, then close every connection."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        with self._lock:
            engines, self._engines = self._engines, []
        for engine in engines:
            engine.flush_timeout = 0.0  # nothing is queued in it: it is used through write() only
            engine.shutdown()

    @property
    def in_flight(self) -> int:
        """Spans accepted and not yet answered."""
        return self._in_flight

    def count_rejected(self, n: int) -> None:
        """Counts ``n`` spans the receiver rejected before they reached the writer (they did not decode)."""
        with self._lock:
            self.rejected_spans += n

    def stats(self) -> dict[str, int]:
        """What ``/health`` shows: spans committed (or skipped as outside any execution), spans rejected
        (answered as partial success: invalid, or refused by Postgres), and spans being written."""
        with self._lock:
            return {
                "accepted_spans": self.written_spans,
                "rejected_spans": self.rejected_spans,
                "in_flight_spans": self._in_flight,
            }

    # --- the request path -----------------------------------------------------------------------------
    async def submit(self, records: Sequence[SpanRecord]) -> Ingested:
        """Write ``records``; returns once they are committed (or rejected). Raises ``Unavailable``."""
        n = len(records)
        if not n:
            return Ingested(0)
        pool = self._pool
        if pool is None:
            raise Unavailable("the writer is not running", 1.0)
        self._admit(n)
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, self._ingest, records)
        finally:
            with self._lock:
                self._in_flight -= n

    def _admit(self, n: int) -> None:
        wait = self._retry_at - time.monotonic()
        if wait > 0:
            raise Unavailable("the database is unavailable", wait)
        with self._lock:
            # One request alone over the bound is still taken (it would never fit otherwise).
            if self._in_flight and self._in_flight + n > self.max_queued_spans:
                raise Full(f"{self._in_flight} spans are being written (bound {self.max_queued_spans})", 1.0)
            self._in_flight += n

    # --- the writer threads ---------------------------------------------------------------------------
    def _engine(self) -> PostgresSpanProcessor:
        engine = getattr(self._local, "engine", None)
        if engine is None:
            # No worker thread, no queue: used only through write(), so its spool is never touched.
            engine = PostgresSpanProcessor(self.dsn, threaded=False, connect_early=False)
            self._local.engine = engine
            with self._lock:
                self._engines.append(engine)
        return engine

    def _ingest(self, records: Sequence[SpanRecord]) -> Ingested:
        result = Ingested(len(records))
        prepared = self._prepare(records, result)
        if prepared is not None:
            self._write(prepared, result)
        with self._lock:
            self.written_spans += result.spans - result.rejected
            self.rejected_spans += result.rejected
        return result

    def _prepare(self, records: Sequence[SpanRecord], result: Ingested) -> tuple[Batch, Any, list[SpanRecord]] | None:
        """The request's batch and COPY text; spans that cannot be translated are found one by one and rejected."""
        try:
            return (*self._rebuilt(records), list(records))
        except Exception:
            pass
        good = []
        for record in records:
            try:
                self._rebuilt([record])
                good.append(record)
            except Exception as exc:
                result.reject(1, f"span {record.span_id:016x}: no row can be made of it ({_describe(exc)})")
        return (*self._rebuilt(good), good) if good else None

    def _write(self, prepared: tuple[Batch, Any, list[SpanRecord]], result: Ingested) -> None:
        from psycopg import errors

        batch, payload, records = prepared
        engine = self._engine()
        for attempt in (1, 2):
            try:
                engine.write(batch, payload)
                self._backoff = 0.0
                return
            except (errors.DeadlockDetected, errors.SerializationFailure) as exc:
                # Two receivers locking the same executions in one transaction each: one of them is
                # chosen to fail, and goes again.
                if attempt == 2:
                    raise Unavailable(f"write conflict ({_describe(exc)})", 1.0) from exc
                batch, payload = self._rebuilt(records)
            except (errors.DataError, errors.IntegrityError, errors.ProgrammingError) as exc:
                if isinstance(exc, errors.UndefinedTable):  # the schema is missing: not the data's fault
                    self._unavailable(exc)
                # Postgres refuses some value of the batch: write span by span, reject the refused.
                logger.warning("roma-otel ingest: batch refused (%s); writing its spans one by one", _describe(exc))
                self._write_one_by_one(engine, records, result)
                return
            except Exception as exc:
                self._unavailable(exc)

    def _rebuilt(self, records: Sequence[SpanRecord]) -> tuple[Batch, Any]:
        """The batch of ``records`` and its COPY text."""
        batch = standalone_batch(records, persist_toolkit=self.persist_toolkit)
        return batch, copy_payload(batch)

    def _write_one_by_one(self, engine: PostgresSpanProcessor, records: list[SpanRecord], result: Ingested) -> None:
        from psycopg import errors

        for record in records:
            try:
                engine.write(*self._rebuilt([record]))
            except (errors.DataError, errors.IntegrityError) as exc:
                result.reject(1, f"span {record.span_id:016x} refused by the database ({_describe(exc)})")
            except Exception as exc:
                self._unavailable(exc)

    def _unavailable(self, exc: Exception) -> None:
        """Raise Unavailable and hold new requests off for a growing while (the sender retries)."""
        self._backoff = min(_BACKOFF_MAX, self._backoff * 2 or _BACKOFF_START)
        self._retry_at = time.monotonic() + self._backoff
        engine = getattr(self._local, "engine", None)
        if engine is not None:
            engine.disconnect()  # a broken connection is not reused
        why = _describe(exc)
        logger.warning("roma-otel ingest: postgres write failed (%s); answering 503 for %.1fs", why, self._backoff)
        raise Unavailable(f"the database is unavailable ({why})", self._backoff) from exc


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
