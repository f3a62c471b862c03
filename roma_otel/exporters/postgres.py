"""The Postgres writer: a span processor that turns finished spans into trace-table rows, off the hot path.

``on_end`` only classifies the span and appends it to a bounded queue. A daemon worker translates
batches (``storage.rows``) and writes each batch in one transaction: missing ``executions`` rows first,
then each table's rows by COPY, then the finished executions. A unique index on the span ids refuses a
row written before; such a batch (a retry, a spool replay) goes again as one JSON document per table
expanded by ``jsonb_to_recordset`` into ``INSERT ... ON CONFLICT DO NOTHING``: nothing is duplicated.
When Postgres is unreachable, batches are retried with backoff and spooled to local files, replayed in
order when it comes back; a clean
shutdown flushes within a bounded timeout and spools the rest. Anything dropped is counted and logged once.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor

from roma_otel import semconv as sc
from roma_otel.compat.otel import scope_getter, suppressed_context
from roma_otel.storage.rows import ROOT, Batch, classify, span_error, to_batch, tool_metadata
from roma_otel.telemetry import SCOPE

__all__ = ["PostgresSpanProcessor", "QueueingSpanProcessor", "default_spool_dir"]

logger = logging.getLogger("roma_otel")

_MAX_OPEN_EXECUTIONS = 10_000  # executions whose tree nodes wait for their root span
_SPOOL_RESCAN = 30.0  # seconds between looks at the spool directory when this writer spooled nothing


def _from_json(table: str, record: str, conflict: str) -> str:
    """One set-based statement per table and batch, from ``jsonb_to_recordset``'s record definition.

    Postgres parses the JSON rows (in C, in its own process), so the writer's Python work per row is
    building one small dict; ``*_ns`` fields (epoch nanoseconds) become the timestamp columns.
    """
    fields = [item.split(" ")[0] for item in record.split(", ")]
    names = ", ".join(f.removesuffix("_ns") for f in fields)
    # Whole microseconds by integer division, exactly as the COPY path truncates them (a float division
    # by 1e9 would round, and disagree in the last digit).
    select = ", ".join(
        f"timestamptz 'epoch' + (r.{f} / 1000) * interval '1 microsecond'" if f.endswith("_ns") else f"r.{f}"
        for f in fields
    )
    return (
        f"INSERT INTO {table} ({names}) SELECT {select} "
        f"FROM jsonb_to_recordset(%s::jsonb) AS r({record}) ON CONFLICT {conflict}"
    )


_LM_RECORD = (
    "execution_id text, otel_trace_id text, span_id text, parent_span_id text, task_id text, depth int, "
    "module_name text, model text, created_at_ns bigint, prompt_tokens int, completion_tokens int, total_tokens int, "
    "cost_usd numeric, cost_source text, latency_ms float8, cache_hit bool, error text, metadata jsonb"
)
_TOOL_RECORD = (
    "execution_id text, toolkit_class text, tool_name text, invoked_at_ns bigint, duration_ms float8, "
    "input_size_bytes int, output_size_bytes int, success bool, error text, metadata jsonb"
)
_TOOLKIT_RECORD = (
    "execution_id text, timestamp_ns bigint, operation text, toolkit_class text, duration_ms float8, success bool, "
    "error text, metadata jsonb"
)
_SPAN_CONFLICT = "((metadata->>'otel_trace_id'), (metadata->>'span_id')) DO NOTHING"
_STATEMENTS = (
    # (batch attribute, statement)
    ("lm", _from_json("lm_traces", _LM_RECORD, "(otel_trace_id, span_id) DO NOTHING")),
    ("tools", _from_json("tool_invocation_traces", _TOOL_RECORD, _SPAN_CONFLICT)),
    ("toolkit", _from_json("toolkit_traces", _TOOLKIT_RECORD, _SPAN_CONFLICT)),
)
_EXECUTIONS_FIRST_SEEN = _from_json(
    "executions", "execution_id text, created_at_ns bigint, otel_trace_id text", "(execution_id) DO NOTHING"
)
_FINAL_RECORD = (
    "execution_id text, created_at_ns bigint, status text, task text, max_depth int, solver_type text, "
    "config_version text, total_tasks int, completed_tasks int, failed_tasks int, total_cost float8, "
    "total_tokens bigint, execution_duration float8, max_depth_reached int, otel_trace_id text, metadata jsonb, "
    "dag_snapshot jsonb"
)


def _merged_tree(stored: str, incoming: str) -> str:
    """Two dag_snapshot arrays as one: nodes unioned by span id, ordered by start then span id (as
    ``rows.node_order`` orders them). Commutative and idempotent, so a tree whose spans arrive in several
    requests, out of order, twice, or at different receivers ends up the same as one written at once."""

    def array(value: str) -> str:
        return f"CASE jsonb_typeof({value}) WHEN 'array' THEN {value} ELSE '[]'::jsonb END"

    return (
        "(SELECT jsonb_agg(u.n ORDER BY u.n->>'start' COLLATE \"C\", u.n->>'span_id' COLLATE \"C\") "
        "FROM (SELECT DISTINCT ON (t.n->>'span_id') t.n "
        f"FROM jsonb_array_elements(({array(stored)}) || ({array(incoming)})) AS t(n) "
        "ORDER BY t.n->>'span_id') AS u)"
    )


# The root's end rewrites the row, but merges its tree with nodes already stored, and dates the
# execution from the root's start (earlier than any child's, whichever span arrived first).
_FINAL_UPDATES = ", ".join(
    f"{name} = EXCLUDED.{name}"
    for name in (c.split(" ")[0].removesuffix("_ns") for c in _FINAL_RECORD.split(", "))
    if name not in ("execution_id", "dag_snapshot")
)
_EXECUTIONS_FINAL = _from_json(
    "executions",
    _FINAL_RECORD,
    f"(execution_id) DO UPDATE SET {_FINAL_UPDATES}, "
    f"dag_snapshot = {_merged_tree('executions.dag_snapshot', 'EXCLUDED.dag_snapshot')}, updated_at = now()",
)
# Nodes of executions whose root is elsewhere (an earlier or later request, another receiver).
_EXECUTIONS_NODES = (
    f"UPDATE executions AS e SET dag_snapshot = {_merged_tree('e.dag_snapshot', 'x.nodes')}, updated_at = now() "
    "FROM jsonb_to_recordset(%s::jsonb) AS x(execution_id text, nodes jsonb) WHERE e.execution_id = x.execution_id"
)


def default_spool_dir() -> Path:
    return Path(os.environ.get("ROMA_OTEL_SPOOL_DIR") or Path.home() / ".roma-otel" / "spool")


# --- COPY text format: the fast path ------------------------------------------------------------------
# One hand-written line formatter per table (about 3 µs a row, a third of a generic per-value formatter);
# the column lists come from the same record definitions as the ON CONFLICT path, and the writer tests
# read back every column written each way.
def _esc(text: str) -> str:
    # Most values need no escaping; four substring scans in C are far cheaper than a per-character map.
    if "\\" in text or "\t" in text or "\n" in text or "\r" in text:
        return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return text


def _t(value: Any) -> str:
    return "\\N" if value is None else _esc(str(value))


def _n(value: Any) -> str:
    return "\\N" if value is None else repr(value) if isinstance(value, float) else str(value)


_last_second: tuple[int, str] = (-1, "")  # rows of a batch share seconds: format each second once


def _ts(ns: int) -> str:
    global _last_second
    second, rest = divmod(ns, 1_000_000_000)
    cached = _last_second  # one tuple read and one write: safe with several writers in the process
    if cached[0] != second:
        cached = _last_second = (second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%d %H:%M:%S"))
    return "%s.%06d+00" % (cached[1], rest // 1000)  # noqa: UP031 - a fifth cheaper than the f-string


def _j(value: Any) -> str:
    return _esc(_encode_json(value))


def _lm_line(r: dict[str, Any]) -> str:
    return (
        f"{_t(r['execution_id'])}\t{r['otel_trace_id']}\t{r['span_id']}\t{_t(r['parent_span_id'])}\t"
        f"{_t(r['task_id'])}\t{r['depth']}\t{_t(r['module_name'])}\t{_t(r['model'])}\t{_ts(r['created_at_ns'])}\t"
        f"{_n(r['prompt_tokens'])}\t{_n(r['completion_tokens'])}\t{_n(r['total_tokens'])}\t{_n(r['cost_usd'])}\t"
        f"{_t(r['cost_source'])}\t{r['latency_ms']!r}\t{'t' if r['cache_hit'] else 'f'}\t{_t(r['error'])}\t"
        f"{_j(r['metadata'])}"
    )


def _tool_line(r: dict[str, Any]) -> str:
    return (
        f"{_t(r['execution_id'])}\t{_t(r['toolkit_class'])}\t{_t(r['tool_name'])}\t{_ts(r['invoked_at_ns'])}\t"
        f"{r['duration_ms']!r}\t{r['input_size_bytes']}\t{r['output_size_bytes']}\t{'t' if r['success'] else 'f'}\t"
        f"{_t(r['error'])}\t{_j(r['metadata'])}"
    )


# Tool invocations are the table an agent writes most; their spans skip the row dict (see _tool_span_line).
# Caches for values a run repeats, bounded by clearing: (execution, toolkit, tool) -> the row's first three
# fields, and trace id -> its hex.
_tool_prefixes: dict[tuple[Any, Any, Any], str] = {}
_trace_hex: dict[int, str] = {}
_CACHE_LIMIT = 4096


def _tool_span_line(span: Any, attrs: dict[str, Any]) -> str:
    """``_tool_line(tool_invocation_row(span, attrs))`` without building the row: the same text, in about
    half the writer's time (a test holds the two equal on every kind of tool span)."""
    key = (attrs[sc.EXECUTION_ID], attrs.get(sc.TOOLKIT_CLASS, ""), attrs.get(sc.GEN_AI_TOOL_NAME, ""))
    prefix = _tool_prefixes.get(key)
    if prefix is None:
        prefix = f"{_esc(str(key[0]))}\t{_esc(str(key[1]))}\t{_esc(str(key[2]))}\t"
        # Cached for strings only (what roma-otel writes): 1, 1.0 and True are one key but three texts.
        if type(key[0]) is str and type(key[1]) is str and type(key[2]) is str:
            if len(_tool_prefixes) >= _CACHE_LIMIT:
                _tool_prefixes.clear()
            _tool_prefixes[key] = prefix
    context = span.context
    trace_id = context.trace_id
    trace_hex = _trace_hex.get(trace_id)
    if trace_hex is None:
        if len(_trace_hex) >= _CACHE_LIMIT:
            _trace_hex.clear()
        trace_hex = _trace_hex[trace_id] = f"{trace_id:032x}"
    metadata = _tool_metadata_text(attrs, trace_hex, f"{context.span_id:016x}")
    error = span_error(span, attrs)
    duration = attrs.get(sc.TOOL_DURATION_MS)
    start = span.start_time or 0
    duration_ms = float(duration) if duration is not None else ((span.end_time or 0) - start) / 1e6
    success = attrs.get(sc.TOOL_SUCCESS)
    ok = bool(success) if success is not None else error is None
    return (
        f"{prefix}{_ts(start)}\t{duration_ms!r}\t{int(attrs.get(sc.TOOL_INPUT_SIZE, 0))}\t"
        f"{int(attrs.get(sc.TOOL_OUTPUT_SIZE, 0))}\t{'t' if ok else 'f'}\t{_t(error)}\t{metadata}"
    )


# (module, depth) -> a tool row's metadata text (JSON, COPY-escaped) before, between and after its two ids.
_metadata_parts: dict[tuple[str | None, int], tuple[str, str, str]] = {}
_TRACE_MARK, _SPAN_MARK = "@@roma-otel-trace@@", "@@roma-otel-span@@"  # text that neither JSON nor COPY escapes


def _tool_metadata_text(attrs: dict[str, Any], trace_hex: str, span_hex: str) -> str:
    """``_j(tool_metadata(attrs, trace_hex, span_hex))``. For the usual row the encoder's own text around
    the two ids comes from a cache and is joined with them: the ids are hex digits, which neither JSON
    nor COPY escapes."""
    parts = _cached_metadata_parts(attrs)
    if parts is None:
        return _j(tool_metadata(attrs, trace_hex, span_hex))
    return f"{parts[0]}{trace_hex}{parts[1]}{span_hex}{parts[2]}"


def _cached_metadata_parts(attrs: dict[str, Any]) -> tuple[str, str, str] | None:
    """The metadata text before, between and after the ids, per (module, depth); None for a row that is
    not cached (a task id, an error, a non-str module, a non-int depth, a module named like a mark)."""
    if sc.TASK_ID in attrs or sc.ERROR_TYPE in attrs:
        return None
    module = attrs.get(sc.MODULE)
    depth = attrs.get(sc.TASK_DEPTH, 0)
    if not (module is None or type(module) is str) or type(depth) is not int:
        return None
    parts = _metadata_parts.get((module, depth))
    if parts is None:
        sample = _j(tool_metadata(attrs, _TRACE_MARK, _SPAN_MARK))
        if sample.count(_TRACE_MARK) != 1 or sample.count(_SPAN_MARK) != 1:
            return None
        head, rest = sample.split(_TRACE_MARK)
        mid, tail = rest.split(_SPAN_MARK)
        if len(_metadata_parts) >= _CACHE_LIMIT:
            _metadata_parts.clear()
        parts = _metadata_parts[(module, depth)] = (head, mid, tail)
    return parts


def _toolkit_line(r: dict[str, Any]) -> str:
    return (
        f"{_t(r['execution_id'])}\t{_ts(r['timestamp_ns'])}\t{_t(r['operation'])}\t{_t(r['toolkit_class'])}\t"
        f"{r['duration_ms']!r}\t{'t' if r['success'] else 'f'}\t{_t(r['error'])}\t{_j(r['metadata'])}"
    )


def _columns(record: str) -> str:
    return ", ".join(item.split(" ")[0].removesuffix("_ns") for item in record.split(", "))


_COPIES = (
    # (batch attribute, table, columns, row -> line, span -> line or None)
    ("lm", "lm_traces", _columns(_LM_RECORD), _lm_line, None),
    ("tools", "tool_invocation_traces", _columns(_TOOL_RECORD), _tool_line, _tool_span_line),
    ("toolkit", "toolkit_traces", _columns(_TOOLKIT_RECORD), _toolkit_line, None),
)


# One transaction's COPY data: (table, column list, the rows as COPY text), for each table it has rows for.
CopyPayload = list[tuple[str, str, bytes]]


def copy_payload(batch: Batch) -> CopyPayload:
    """Format a batch's child rows as COPY text, table by table (executions rows go by statement)."""
    payload = []
    for attr, table, columns, line, span_line in _COPIES:
        if batch.has_rows(attr):
            text = "\n".join(batch.format_rows(attr, line, span_line)) + "\n"
            payload.append((table, columns, text.encode()))
    return payload


def _json_default(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


# One encoder, built once: json.dumps(..., default=...) builds a new one per call (~3 µs per row here).
# Compact and unescaped like orjson, so a row's text is the same with or without orjson installed.
_ENCODER = json.JSONEncoder(default=_json_default, separators=(",", ":"), ensure_ascii=False)

try:  # orjson (DSPy depends on it) encodes a row's metadata in 0.14 µs instead of 1.4 µs
    import orjson

    def _encode_json(value: Any) -> str:
        return orjson.dumps(value, default=_json_default).decode()

except ImportError:  # pragma: no cover - without DSPy's dependencies
    _encode_json = _ENCODER.encode


class QueueingSpanProcessor(SpanProcessor):
    """What every Postgres writer shares: its settings, the bounded queue ``on_end`` feeds (roma-otel's
    spans only), the synchronous flush at an execution's end, and drop counting. Subclasses decide what
    happens to the queue; spans leave it only under ``_lock``."""

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
        self._wake_at = self.batch_size  # queued spans that wake the worker before flush_interval is up
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
        self.disposed = 0  # spans written, spooled, skipped or dropped: nothing more will happen to them
        self._drop_logged = False
        self._shutdown = False
        self._queue: collections.deque[Any] = collections.deque()
        self._scope_of = scope_getter()
        self._new_locks()

    def _new_locks(self) -> None:
        """The locks and the wake-up event, new (also in a forked child: one held at the fork stays held)."""
        self._lock = threading.Lock()  # spans leave the queue only under it
        self._counts = threading.Lock()  # dropped and disposed: changed from several threads
        self._wake = threading.Event()

    def settings(self) -> dict[str, Any]:
        """The constructor's keyword arguments, as given (for a writer doing the same job elsewhere)."""
        return {
            "batch_size": self.batch_size,
            "flush_interval": self.flush_interval,
            "max_queue_size": self.max_queue_size,
            "spool_dir": str(self.spool_dir),
            "max_spool_bytes": self.max_spool_bytes,
            "persist_toolkit": self.persist_toolkit,
            "async_persist": self.async_persist,
            "flush_timeout": self.flush_timeout,
        }

    @property
    def queued(self) -> int:
        """Spans waiting in this process's queue (a backlog that grows means the writer falls behind)."""
        return len(self._queue)

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        # The application thread only queues roma-otel's spans; everything else is the writer's job. It
        # takes no lock: deque.append is atomic, and spans leave the queue only under _lock, so a length
        # read there never shrinks. 0.11 µs a span, against 0.30 with the lock and the property.
        try:
            scope = self._scope_of(span)  # the SDK's field behind the property, where verified
        except AttributeError:
            scope = span.instrumentation_scope
        if scope is None or scope.name != SCOPE or self._shutdown:
            return
        queue = self._queue
        if len(queue) >= self.max_queue_size:
            self._drop_oldest()
        queue.append(span)
        if len(queue) >= self._wake_at and not self._wake.is_set():  # set once until the worker clears it
            self._wake.set()
        if not self.async_persist and classify(span) == ROOT:
            self.force_flush(int(self.flush_timeout * 1000))

    def _drop_oldest(self) -> None:
        """Make room for one more span in a full queue."""
        with self._lock:
            self._trim(self.max_queue_size - 1)

    def _trim(self, keep: int) -> None:
        """Drop the oldest spans beyond ``keep``, counted (call with ``_lock`` held)."""
        over = len(self._queue) - max(0, keep)
        if over > 0:
            for _ in range(over):
                self._queue.popleft()
            self._count_drop(over, "queue full")
            self._add_disposed(over)

    def _wait_until_idle(self, condition: threading.Condition, busy: Callable[[], bool], deadline: float) -> bool:
        """Wake the worker and wait until the queue is empty and ``busy()`` is false; False at ``deadline``."""
        self._wake.set()
        with condition:
            while self._queue or busy():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                condition.wait(min(remaining, 0.05))
                self._wake.set()
        return True

    def _add_disposed(self, n: int) -> None:
        with self._counts:
            self.disposed += n

    def _count_drop(self, n: int, reason: str) -> None:
        with self._counts:
            self.dropped += n
        if self._on_drop is not None:
            try:
                self._on_drop(n, reason)
            except Exception:
                pass
        if not self._drop_logged:
            self._drop_logged = True
            logger.error("roma-otel: dropped %d trace rows (%s); counting further drops silently", n, reason)


class PostgresSpanProcessor(QueueingSpanProcessor):
    """The writer engine: persists roma-otel spans into the trace tables from a worker thread.
    Thread-safe; the application never waits on it.

    ``async_persist=False`` makes the end of each execution flush synchronously (bounded by
    ``flush_timeout``), as the seed's ``async_persist: false`` asks.
    """

    def __init__(self, dsn: str, *, threaded: bool = True, connect_early: bool = True, **settings: Any) -> None:
        """``threaded=False``: no worker thread; the owner calls ``drain()`` (the writer process does).
        ``connect_early``: the worker connects as it starts, not at its first batch."""
        super().__init__(dsn, **settings)
        self._nodes: dict[str, list[dict[str, Any]]] = {}
        self._conn: Any = None
        self._backoff = 0.0
        self._retry_at = 0.0
        self._spool_seq = 0
        # When to look at the spool directory again: at once (files from an earlier run), after this
        # writer spools, and every _SPOOL_RESCAN seconds (another process's files); not on every batch.
        self._spool_check_at = 0.0
        # Executions whose row this writer has committed: later batches of theirs need no first-seen insert.
        self._known_executions: dict[str, None] = {}
        self._threaded = threaded
        self._worker: threading.Thread | None = None
        self.before_prefetch: Callable[[], None] | None = None  # runs while Postgres finishes a COPY
        self.after_transaction: Callable[[], None] | None = None
        self._connect_early = connect_early
        self._init_threading()
        if threaded:
            os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        # A forked child gets a worker of its own, unless this writer was shut down; it connects at its
        # first batch only: a child may never write, and must not hold a connection just for existing.
        if self._shutdown:
            return
        self._connect_early = False
        self._init_threading()

    def _init_threading(self) -> None:
        self._new_locks()
        self._idle = threading.Condition(threading.Lock())
        self._pending = 0  # spans taken off the queue but not yet written or spooled
        self._shutdown = False
        self._conn = None
        if self._threaded:
            self._worker = threading.Thread(target=self._run, name="roma-otel-postgres", daemon=True)
            self._worker.start()

    def drain(self) -> None:
        """Write (or spool) everything queued, in this thread: the loop of a writer without a thread."""
        self._drain()

    def connect(self) -> bool:
        """Import the driver and connect now, so that the first batch does not wait for either (the
        import alone takes ~0.1 s in a fresh process); True when connected. A failure is left to the
        first write, which retries with backoff and spools meanwhile."""
        try:
            self._connection()
            return True
        except Exception as exc:
            self._failed(exc)  # the first write waits for the backoff instead of another connect timeout
            return False

    # --- SpanProcessor ------------------------------------------------------------------------------
    def enqueue(self, spans: list[Any]) -> None:
        """Queue already-selected roma-otel spans (or ``SpanRecord`` copies of them) in one go."""
        if self._shutdown:
            return
        with self._lock:
            self._queue.extend(spans)
            self._trim(self.max_queue_size)
        self._wake.set()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Wait until everything queued so far is written (or spooled); True when done in time."""
        deadline = time.monotonic() + timeout_millis / 1000.0
        self._retry_at = 0.0  # a flush is a good moment to try the database again
        if not self._threaded:
            while self._queue and time.monotonic() < deadline:
                self._drain()
            return not self._queue
        return self._wait_until_idle(self._idle, lambda: self._pending > 0, deadline)

    def shutdown(self) -> None:
        if self._shutdown:
            return
        self.force_flush(int(self.flush_timeout * 1000))
        self._shutdown = True
        self._wake.set()
        if self._worker is not None:
            self._worker.join(self.flush_timeout)
        # Whatever could not be written in time goes to the spool: a clean shutdown loses nothing.
        leftover = self._take(len(self._queue))
        if leftover or self._nodes:
            batch = self._translate(leftover)
            # Trees still waiting for their root go too: a later writer merges them into the row.
            batch.nodes, self._nodes = self._nodes, {}
            self._spool(batch)
        self._add_disposed(len(leftover))
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass

    # --- worker ---------------------------------------------------------------------------------------
    def _take(self, n: int) -> list[ReadableSpan]:
        with self._lock:
            n = min(n, len(self._queue))
            # Counted as pending before they leave the queue: a flush checking the queue and then the
            # pending count (without this lock) never sees them in neither.
            self._pending += n
            return [self._queue.popleft() for _ in range(n)]

    def _done(self, n: int) -> None:
        with self._idle:
            self._pending -= n
            self._add_disposed(n)
            self._idle.notify_all()

    def _run(self) -> None:
        # The worker's own queries must never be traced (a traced database driver would loop back here).
        otel_context.attach(suppressed_context())
        if self._connect_early:
            self.connect()
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
        current = self._take_translated()
        while current is not None:
            items, batch, payload = current
            # Translate the next transaction while Postgres still indexes this one's rows (called after
            # the last COPY write, before the wait for the end of COPY and the commit), so Postgres is
            # never left waiting for Python between transactions.
            upcoming: list[tuple[list[ReadableSpan], Batch, CopyPayload] | None] = []
            prefetch = functools.partial(self._prefetch, upcoming)
            try:
                ok = not (batch.executions or len(batch)) or self._write_or_spool(batch, prefetch, payload)
                prefetch()
            finally:
                self._done(len(items))
                if self.after_transaction is not None:
                    self.after_transaction()
            current = upcoming[0]
            if not ok:
                if current is not None:  # already taken off the queue: spool it with the rest
                    try:
                        self._spool(current[1])
                    finally:
                        self._done(len(current[0]))
                self._spool_queue()
                return

    def _prefetch(self, into: list[tuple[list[ReadableSpan], Batch, CopyPayload] | None]) -> None:
        if not into:  # once per transaction, also when a duplicate makes the batch go again
            if self.before_prefetch is not None:
                self.before_prefetch()
            into.append(self._take_translated())

    def _take_translated(self) -> tuple[list[ReadableSpan], Batch, CopyPayload] | None:
        """The next batch, translated and formatted for COPY: done while Postgres still works on the
        previous one, so each transaction sends all its rows at once and Postgres never waits for Python."""
        if not self._queue or self._shutdown:
            return None
        items = self._take(self.batch_size)  # one transaction per batch of batch_size
        try:
            batch = self._translate(items)
            return items, batch, copy_payload(batch)
        except Exception as exc:  # a bug in translation: count the spans, never break the write in progress
            logger.warning("roma-otel: cannot translate %d spans into rows: %r", len(items), exc, exc_info=exc)
            self._count_drop(len(items), "translation error")
            self._done(len(items))
            return None

    def _translate(self, spans: list[ReadableSpan]) -> Batch:
        classified = [(kind, span) for span in spans if (kind := classify(span)) is not None]
        batch = to_batch(classified, self._nodes, persist_toolkit=self.persist_toolkit)
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

    def _write_or_spool(
        self, batch: Batch, before_end: Callable[[], None] | None = None, payload: CopyPayload | None = None
    ) -> bool:
        try:
            self._write(batch, before_end, payload)
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
        self.disconnect()

    def disconnect(self) -> None:
        """Close the connection (after a failure); the next write connects again."""
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

            self._conn = psycopg.connect(self.dsn, connect_timeout=5, autocommit=True)  # see _write_once
        return self._conn

    def write(self, batch: Batch, payload: CopyPayload | None = None) -> None:
        """Write one batch now, in this thread, in one transaction; raises if it cannot (no spool, no
        retry): for an owner that acknowledges each batch itself (``exporters.ingest``). ``payload``:
        the batch's ``copy_payload``, when formatted ahead."""
        self._write(batch, None, payload)

    def _write(
        self, batch: Batch, before_end: Callable[[], None] | None = None, payload: CopyPayload | None = None
    ) -> None:
        """Write one batch in one transaction: COPY straight into the tables when none of its rows is
        there yet (the normal case), else, after the unique index refuses a duplicate (a retried or
        replayed batch), the same rows through INSERT ... ON CONFLICT DO NOTHING."""
        from psycopg import errors

        try:
            self._write_once(batch, fast=True, before_end=before_end, payload=payload)
        except (errors.UniqueViolation, errors.ForeignKeyViolation):
            # A duplicate, or (rarely) an execution row gone since this writer committed it: forget
            # what this writer believes exists and write the batch the safe way.
            self._known_executions.clear()
            self._write_once(batch, fast=False)
        self.written_rows += len(batch)

    def _write_once(
        self,
        batch: Batch,
        *,
        fast: bool,
        before_end: Callable[[], None] | None = None,
        payload: CopyPayload | None = None,
    ) -> None:
        """``before_end`` runs once the last COPY data is sent, while Postgres is still working on it.
        ``payload``: the batch's ``copy_payload``, when it was formatted ahead."""
        conn = self._connection()
        known = self._known_executions
        # Parents first: every row's execution exists before its children arrive (they end first).
        # The COPY path skips executions this writer already committed (a run writes many batches).
        first_seen = [row for eid, row in sorted(batch.executions.items()) if not fast or eid not in known]
        copies = (payload if payload is not None else copy_payload(batch)) if fast else []
        # One COPY and nothing else (the usual batch: one table's rows, executions already written) is a
        # transaction by itself in autocommit mode: no BEGIN and COMMIT round trips. Each round trip
        # costs the writer Python work and, on a thread, a hand-over of the application's GIL.
        single = fast and len(copies) == 1 and not first_seen and not batch.finals and not batch.nodes
        with contextlib.nullcontext() if single else conn.transaction(), conn.cursor() as cur:
            if first_seen:
                cur.execute(_EXECUTIONS_FIRST_SEEN, (json.dumps(first_seen),))
            if fast:
                for i, (table, columns, data) in enumerate(copies):
                    with cur.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                        copy.write(data)
                        if before_end is not None and i == len(copies) - 1:
                            before_end()
            else:
                for attr, statement in _STATEMENTS:
                    rows = batch.rows(attr)
                    if rows:
                        cur.execute(statement, (_ENCODER.encode(rows),))
            if batch.nodes:
                # Sorted by execution: concurrent writers lock the rows in one order (no deadlock).
                merges = [{"execution_id": k, "nodes": batch.nodes[k]} for k in sorted(batch.nodes)]
                cur.execute(_EXECUTIONS_NODES, (_ENCODER.encode(merges),))
            if batch.finals:
                finals = sorted(batch.finals, key=lambda row: row["execution_id"])
                cur.execute(_EXECUTIONS_FINAL, (_ENCODER.encode(finals),))
        for execution_id in batch.executions:  # committed
            known[execution_id] = None
        while len(known) > _MAX_OPEN_EXECUTIONS:
            del known[next(iter(known))]

    # --- spool ----------------------------------------------------------------------------------------
    def _spool_files(self) -> list[Path]:
        if not self.spool_dir.is_dir():
            return []
        return sorted(self.spool_dir.glob("batch-*.json"))

    def _spool(self, batch: Batch) -> None:
        if not batch.executions and not len(batch) and not batch.nodes:
            return
        self._spool_check_at = 0.0
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
        now = time.monotonic()
        if now < self._spool_check_at:
            return True
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
        self._spool_check_at = now + _SPOOL_RESCAN
        return True
