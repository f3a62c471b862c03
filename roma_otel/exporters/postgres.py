"""The Postgres writer: a span processor that turns finished spans into trace-table rows, off the hot path.

``on_end`` only classifies the span and appends it to a bounded queue. A daemon worker translates
batches (``storage.rows``) and writes each batch in one transaction: missing ``executions`` rows first,
then the child rows through COPY into a staging table and ``INSERT ... ON CONFLICT DO NOTHING`` (a
retried batch never duplicates), then the finished executions. When Postgres is unreachable, batches
are retried with backoff and spooled to local files, replayed in order when it comes back; a clean
shutdown flushes within a bounded timeout and spools the rest. Anything dropped is counted and logged once.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.instrumentation.utils import _SUPPRESS_INSTRUMENTATION_KEY
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor

from roma_otel.storage.rows import LM_COLUMNS, ROOT, TOOL_COLUMNS, TOOLKIT_COLUMNS, Batch, classify, to_batch

__all__ = ["PostgresSpanProcessor", "default_spool_dir"]

logger = logging.getLogger("roma_otel")

_JSON_COLUMNS = {"metadata", "dag_snapshot"}
_MAX_OPEN_EXECUTIONS = 10_000  # executions whose tree nodes wait for their root span
_FINAL_COLUMNS = (
    "execution_id", "created_at", "status", "task", "max_depth", "solver_type", "config_version", "total_tasks",
    "completed_tasks", "failed_tasks", "total_cost", "total_tokens", "execution_duration", "max_depth_reached",
    "otel_trace_id", "metadata", "dag_snapshot",
)  # fmt: skip
_TABLES = (
    # (batch attribute, table, columns, conflict target)
    ("lm", "lm_traces", LM_COLUMNS, "(otel_trace_id, span_id)"),
    ("tools", "tool_invocation_traces", TOOL_COLUMNS, "((metadata->>'otel_trace_id'), (metadata->>'span_id'))"),
    ("toolkit", "toolkit_traces", TOOLKIT_COLUMNS, "((metadata->>'otel_trace_id'), (metadata->>'span_id'))"),
)


def default_spool_dir() -> Path:
    return Path(os.environ.get("ROMA_OTEL_SPOOL_DIR") or Path.home() / ".roma-otel" / "spool")


def _json_default(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


class PostgresSpanProcessor(SpanProcessor):
    """Persists roma-otel spans into the trace tables. Thread-safe; the application never waits on it.

    ``async_persist=False`` makes the end of each execution flush synchronously (bounded by
    ``flush_timeout``), as the seed's ``async_persist: false`` asks.
    """

    def __init__(
        self,
        dsn: str,
        *,
        batch_size: int = 100,
        flush_interval: float = 1.0,
        max_queue_size: int = 100_000,
        spool_dir: str | os.PathLike[str] | None = None,
        max_spool_bytes: int = 256 * 1024 * 1024,
        persist_toolkit: bool = True,
        async_persist: bool = True,
        flush_timeout: float = 10.0,
        on_drop: Any = None,
    ) -> None:
        self.dsn = dsn
        self.batch_size = max(1, batch_size)
        self.flush_interval = flush_interval
        self.max_queue_size = max_queue_size
        self.spool_dir = Path(spool_dir) if spool_dir is not None else default_spool_dir()
        self.max_spool_bytes = max_spool_bytes
        self.persist_toolkit = persist_toolkit
        self.async_persist = async_persist
        self.flush_timeout = flush_timeout
        self._on_drop = on_drop  # callable(count, reason) -> None, e.g. a metric
        self.dropped = 0
        self.written_rows = 0
        self._drop_logged = False
        self._queue: collections.deque[tuple[str, ReadableSpan]] = collections.deque()
        self._nodes: dict[str, list[dict[str, Any]]] = {}
        self._conn: Any = None
        self._backoff = 0.0
        self._retry_at = 0.0
        self._spool_seq = 0
        self._init_threading()
        os.register_at_fork(after_in_child=self._init_threading)

    def _init_threading(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = threading.Condition(threading.Lock())
        self._pending = 0  # spans taken off the queue but not yet written or spooled
        self._shutdown = False
        self._conn = None
        self._worker = threading.Thread(target=self._run, name="roma-otel-postgres", daemon=True)
        self._worker.start()

    # --- SpanProcessor ------------------------------------------------------------------------------
    def on_start(self, span: Any, parent_context: Any = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        if self._shutdown:
            return
        kind = classify(span)
        if kind is None:
            return
        with self._lock:
            if len(self._queue) >= self.max_queue_size:
                self._queue.popleft()
                self._count_drop(1, "queue full")
            self._queue.append((kind, span))
            full = len(self._queue) >= self.batch_size
        if full:
            self._wake.set()
        if kind == ROOT and not self.async_persist:
            self.force_flush(int(self.flush_timeout * 1000))

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Wait until everything queued so far is written (or spooled); True when done in time."""
        deadline = time.monotonic() + timeout_millis / 1000.0
        self._retry_at = 0.0  # a flush is a good moment to try the database again
        self._wake.set()
        with self._idle:
            while self._queue or self._pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(min(remaining, 0.05))
                self._wake.set()
        return True

    def shutdown(self) -> None:
        if self._shutdown:
            return
        self.force_flush(int(self.flush_timeout * 1000))
        self._shutdown = True
        self._wake.set()
        self._worker.join(self.flush_timeout)
        # Whatever could not be written in time goes to the spool: a clean shutdown loses nothing.
        leftover = self._take(len(self._queue))
        if leftover or self._nodes:
            self._spool(self._translate(leftover))
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass

    # --- worker ---------------------------------------------------------------------------------------
    def _take(self, n: int) -> list[tuple[str, ReadableSpan]]:
        with self._lock:
            items = [self._queue.popleft() for _ in range(min(n, len(self._queue)))]
            self._pending += len(items)
        return items

    def _done(self, n: int) -> None:
        with self._idle:
            self._pending -= n
            self._idle.notify_all()

    def _run(self) -> None:
        # The worker's own queries must never be traced (a traced database driver would loop back here).
        otel_context.attach(otel_context.set_value(_SUPPRESS_INSTRUMENTATION_KEY, True))
        while not self._shutdown:
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            try:
                self._drain()
            except Exception as exc:  # never let the worker die
                logger.warning("roma-otel: postgres writer error: %r", exc, exc_info=exc)
            with self._idle:
                self._idle.notify_all()

    def _drain(self) -> None:
        if time.monotonic() < self._retry_at:
            self._spool_queue()  # database still cooling off: keep memory bounded by moving rows to disk
            return
        if not self._replay_spool():
            self._spool_queue()
            return
        while self._queue and not self._shutdown:
            items = self._take(self.batch_size)
            try:
                batch = self._translate(items)
                if (batch.executions or len(batch)) and not self._write_or_spool(batch):
                    self._spool_queue()
                    return
            finally:
                self._done(len(items))

    def _translate(self, items: list[tuple[str, ReadableSpan]]) -> Batch:
        batch = to_batch(items, self._nodes, persist_toolkit=self.persist_toolkit)
        while len(self._nodes) > _MAX_OPEN_EXECUTIONS:  # trees whose root never came (e.g. sampled out)
            self._nodes.pop(next(iter(self._nodes)))
        return batch

    def _spool_queue(self) -> None:
        while self._queue:
            items = self._take(self.batch_size)
            try:
                self._spool(self._translate(items))
            finally:
                self._done(len(items))

    def _write_or_spool(self, batch: Batch) -> bool:
        try:
            self._write(batch)
        except Exception as exc:
            self._failed(exc)
            self._spool(batch)
            return False
        self._backoff = 0.0
        return True

    def _failed(self, exc: Exception) -> None:
        self._backoff = min(30.0, self._backoff * 2 or 0.5)
        self._retry_at = time.monotonic() + self._backoff
        logger.warning(
            "roma-otel: postgres write failed (%s); retrying in %.1fs, spooling meanwhile", exc, self._backoff
        )
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
            self._conn = None

    # --- database -------------------------------------------------------------------------------------
    def _connection(self) -> Any:
        if self._conn is None or self._conn.closed:
            import psycopg

            self._conn = psycopg.connect(self.dsn, connect_timeout=5, autocommit=False)
            with self._conn.cursor() as cur:
                for attr, table, columns, _ in _TABLES:
                    cur.execute(
                        f"CREATE TEMP TABLE IF NOT EXISTS stage_{attr} ON COMMIT DELETE ROWS AS "
                        f"SELECT {', '.join(columns)} FROM {table} WITH NO DATA"
                    )
            self._conn.commit()
        return self._conn

    def _write(self, batch: Batch) -> None:
        from psycopg.types.json import Jsonb

        def value(column: str, v: Any) -> Any:
            return Jsonb(v) if column in _JSON_COLUMNS and v is not None else v

        conn = self._connection()
        with conn.transaction(), conn.cursor() as cur:
            if batch.executions:
                cur.executemany(
                    "INSERT INTO executions (execution_id, created_at, otel_trace_id) VALUES (%s, %s, %s) "
                    "ON CONFLICT (execution_id) DO NOTHING",
                    [(r["execution_id"], r["created_at"], r["otel_trace_id"]) for r in batch.executions.values()],
                )
            for attr, table, columns, conflict in _TABLES:
                rows = getattr(batch, attr)
                if not rows:
                    continue
                names = ", ".join(columns)
                with cur.copy(f"COPY stage_{attr} ({names}) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(
                            [
                                json.dumps(row[c], default=_json_default) if c in _JSON_COLUMNS else row[c]
                                for c in columns
                            ]
                        )
                cur.execute(
                    f"INSERT INTO {table} ({names}) SELECT {names} FROM stage_{attr} ON CONFLICT {conflict} DO NOTHING"
                )
            if batch.finals:
                names = ", ".join(_FINAL_COLUMNS)
                updates = ", ".join(
                    f"{c} = EXCLUDED.{c}" for c in _FINAL_COLUMNS if c not in ("execution_id", "created_at")
                )
                cur.executemany(
                    f"INSERT INTO executions ({names}, updated_at) VALUES ({', '.join(['%s'] * len(_FINAL_COLUMNS))}, "
                    f"now()) ON CONFLICT (execution_id) DO UPDATE SET {updates}, updated_at = now()",
                    [[value(c, row.get(c)) for c in _FINAL_COLUMNS] for row in batch.finals],
                )
        self.written_rows += len(batch)

    # --- spool ----------------------------------------------------------------------------------------
    def _spool_files(self) -> list[Path]:
        if not self.spool_dir.is_dir():
            return []
        return sorted(self.spool_dir.glob("batch-*.json"))

    def _spool(self, batch: Batch) -> None:
        if not batch.executions and not len(batch):
            return
        try:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
            used = sum(p.stat().st_size for p in self._spool_files())
            data = json.dumps(batch.to_json(), default=_json_default).encode()
            if used + len(data) > self.max_spool_bytes:
                self._count_drop(max(1, len(batch)), "spool full")
                return
            self._spool_seq += 1
            name = f"batch-{time.time_ns():020d}-{os.getpid()}-{self._spool_seq:06d}.json"
            tmp = self.spool_dir / (name + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(self.spool_dir / name)  # atomic: a crash never leaves half a batch to replay
        except OSError as exc:
            logger.warning("roma-otel: cannot write the spool in %s: %r", self.spool_dir, exc)
            self._count_drop(max(1, len(batch)), "spool unwritable")

    def _replay_spool(self) -> bool:
        """Write spooled batches oldest first; False (and stop) at the first failure."""
        for path in self._spool_files():
            try:
                batch = Batch.from_json(json.loads(path.read_bytes()))
            except (OSError, ValueError) as exc:
                logger.warning("roma-otel: unreadable spool file %s skipped: %r", path, exc)
                path.rename(path.with_suffix(".bad"))
                continue
            try:
                self._write(batch)
            except Exception as exc:
                self._failed(exc)
                return False
            path.unlink(missing_ok=True)
            self._backoff = 0.0
        return True

    def _count_drop(self, n: int, reason: str) -> None:
        self.dropped += n
        if self._on_drop is not None:
            try:
                self._on_drop(n, reason)
            except Exception:
                pass
        if not self._drop_logged:
            self._drop_logged = True
            logger.error("roma-otel: dropped %d trace rows (%s); counting further drops silently", n, reason)
