"""Async read access to roma-otel's PostgreSQL tables: executions, LM calls, toolkit lifecycle and tool calls.

Aggregates are computed by the server with GROUP BY over every row, and every filter is a bound parameter.
Callers see the driver's failures as StorageUnavailableError / SchemaMissingError, never psycopg's classes.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Self

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from roma_otel.config import PostgresConfig
from roma_otel.storage.records import ExecutionRecord, LMTrace, ToolInvocationTrace, ToolkitTrace

__all__ = ["MAX_LIMIT", "REQUIRED_TABLES", "PostgresStorage", "SchemaMissingError", "StorageUnavailableError"]

MAX_LIMIT = 10_000
# Seconds for the direct connection that tells a server gone away from a pool that is only busy.
PROBE_TIMEOUT = 2.0
REQUIRED_TABLES = ("executions", "lm_traces", "toolkit_traces", "tool_invocation_traces")

_Record = ExecutionRecord | LMTrace | ToolkitTrace | ToolInvocationTrace


class SchemaMissingError(RuntimeError):
    """The database is reachable but roma-otel's tables have not been created in it."""


class StorageUnavailableError(RuntimeError):
    """The database cannot answer right now: unreachable, refusing connections, or timed out."""


def _unavailable(exc: BaseException) -> StorageUnavailableError:
    if isinstance(exc, TimeoutError):
        return StorageUnavailableError("the database did not answer in time")
    return StorageUnavailableError(str(exc).strip() or type(exc).__name__)


# libpq gives no SQLSTATE for a refused connection, only the server's message, translated by its
# lc_messages: these are PostgreSQL's English texts for 53300 (too_many_connections). A server answering in
# another language is taken as gone, and its pool dropped: later queries then reconnect directly, and
# fail naming the cause, until slots free up.
_OUT_OF_SLOTS = ("too many connections", "too many clients", "remaining connection slots are reserved")


def _out_of_slots(exc: BaseException) -> bool:
    """The server refused a connection only for lack of connection slots: it is there, and busy."""
    text = str(exc)
    return any(phrase in text for phrase in _OUT_OF_SLOTS)


def _matchable(value: object, conn: psycopg.AsyncConnection[Any]) -> object:
    """``value``, or None for a text the database cannot hold (a NUL, or a character outside a LATIN1
    database's encoding): such a text equals no stored one, and ``column = NULL`` matches no row either,
    while aggregates still answer."""
    if isinstance(value, str):
        if "\x00" in value:
            return None
        try:
            value.encode(conn.info.encoding)
        except UnicodeEncodeError:
            return None
    return value


def _forget(tasks: set[asyncio.Future[None]]) -> Callable[[asyncio.Future[None]], None]:
    """A done-callback: drop the finished task from ``tasks`` and read its outcome (never reported)."""

    def done(task: asyncio.Future[None]) -> None:
        tasks.discard(task)
        if not task.cancelled():
            task.exception()

    return done


def _check_limit(limit: object) -> int:
    # bool is an int subclass; `limit=True` is a bug in the caller, not a request for one row.
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be an integer between 1 and {MAX_LIMIT}, got {limit!r}")
    return limit


def _check_id(execution_id: object) -> str:
    if not isinstance(execution_id, str):
        raise TypeError(f"execution_id must be a string, got {execution_id!r}")
    return execution_id


def _select(
    record: type[_Record], filters: dict[str, object | None], order_by: str
) -> tuple[sql.Composed, list[object]]:
    """SELECT every column of ``record``'s table, AND-ing ``column = %s`` for each filter that is not None.

    Table, column and ORDER BY text are constants of this module, never caller input; values are only bound.
    The query ends in ``LIMIT %s OFFSET %s``, so callers append those two parameters.
    """
    conditions: list[sql.Composable] = []
    params: list[object] = []
    for column, value in filters.items():
        if value is None:
            continue
        if not isinstance(value, str):
            raise TypeError(f"{column} filter must be a string, got {value!r}")
        conditions.append(sql.SQL("{} = %s").format(sql.Identifier(column)))
        params.append(value)
    query = sql.SQL("SELECT {columns} FROM {table} WHERE {where} ORDER BY {order} LIMIT %s OFFSET %s").format(
        columns=sql.SQL(", ").join(sql.Identifier(c) for c in record.columns()),
        table=sql.Identifier(record.TABLE),
        where=sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("true"),
        order=sql.SQL(order_by),
    )
    return query, params


_MISSING_TABLES = """
SELECT name FROM unnest(%s::text[]) WITH ORDINALITY AS t(name, position)
WHERE to_regclass(quote_ident(name)) IS NULL
ORDER BY position
"""

# GROUPING() is 3 for the execution-wide row, 1 for a per-module row and 2 for a per-model row.
# A row with total_tokens NULL but its parts known still spent tokens, so its parts are counted.
_COSTS = """
SELECT GROUPING(module_name, model) AS level, module_name, model,
       count(*) AS calls,
       count(*) FILTER (WHERE cost_usd IS NULL) AS unpriced_calls,
       coalesce(sum(cost_usd), 0)::float8 AS cost,
       coalesce(sum(coalesce(total_tokens, coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0))), 0)::bigint
           AS tokens,
       coalesce(sum(prompt_tokens), 0)::bigint AS prompt_tokens,
       coalesce(sum(completion_tokens), 0)::bigint AS completion_tokens,
       coalesce(avg(latency_ms), 0)::float8 AS avg_latency_ms
FROM lm_traces
WHERE execution_id = %s
GROUP BY GROUPING SETS ((), (module_name), (model))
ORDER BY level DESC, calls DESC, module_name, model
"""

_LIFECYCLE = """
SELECT count(*) FILTER (WHERE operation = 'create' AND success) AS total_created,
       count(*) FILTER (WHERE operation = 'cache_hit') AS cache_hits,
       count(*) FILTER (WHERE operation = 'cache_miss') AS cache_misses
FROM toolkit_traces
WHERE execution_id = %s
"""

# GROUPING() is 3 for the execution-wide row, 1 per toolkit class and 0 per (class, tool).
_INVOCATIONS = """
SELECT GROUPING(toolkit_class, tool_name) AS level, toolkit_class, tool_name,
       count(*) AS calls,
       count(*) FILTER (WHERE success) AS successful,
       coalesce(avg(duration_ms), 0)::float8 AS avg_duration_ms,
       coalesce(sum(duration_ms), 0)::float8 AS total_duration_ms
FROM tool_invocation_traces
WHERE execution_id = %s
GROUP BY GROUPING SETS ((), (toolkit_class), (toolkit_class, tool_name))
ORDER BY level DESC, calls DESC, toolkit_class, tool_name
"""


def _ratio(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


class PostgresStorage:
    """Reads executions and their traces. ``await initialize()`` (or ``async with``) before any query.

    ``config`` is a :class:`~roma_otel.config.PostgresConfig` (its ``connection_url`` and pool bounds are
    used; ``enabled`` gates the instrumentation's writer, not explicit reads) or a libpq DSN string.
    ``open_timeout``: seconds ``initialize()`` waits for the pool's first connections; ``wait_timeout``: seconds
    a query waits for a pooled connection before StorageUnavailableError; ``query_timeout``: seconds a whole
    query may take (None: no limit), so that a server that stops answering cannot hold a caller forever. A
    query cut short is cancelled in the server; psycopg gives that up to 10 s more before closing the
    connection.

    When a query cannot get a working connection, a direct connection tells a server gone away (refused, or
    no answer in PROBE_TIMEOUT) from a pool that is only busy. If the server is gone, the pool is dropped and
    each later query reconnects directly: it fails at once (StorageUnavailableError naming the cause) while
    the server is down, and succeeds as soon as it is back, instead of waiting on the pool's reconnection
    backoff. A busy pool, or a server refusing with an error of its own (too many connections), keeps it.
    Tables dropped under a running storage raise SchemaMissingError, a revoked privilege
    StorageUnavailableError (the API answers 503 to both).
    """

    def __init__(
        self,
        config: PostgresConfig | str,
        *,
        open_timeout: float = 30.0,
        wait_timeout: float = 30.0,
        query_timeout: float | None = None,
    ) -> None:
        if isinstance(config, str):
            config = PostgresConfig(connection_url=config)
        if not isinstance(config, PostgresConfig):
            raise TypeError(f"config must be a PostgresConfig or a DSN string, got {config!r}")
        if not config.connection_url:
            raise ValueError(
                "storage.postgres.connection_url is not set (set it in the config file or via DATABASE_URL)"
            )
        if config.pool_max_size < 1:
            raise ValueError(f"storage.postgres.pool_max_size must be >= 1, got {config.pool_max_size!r}")
        self._conninfo = config.connection_url
        self._min_size = config.pool_min_size
        self._max_size = config.pool_max_size
        self._open_timeout = open_timeout
        self._wait_timeout = wait_timeout
        self._query_timeout = query_timeout
        self._pool: AsyncConnectionPool | None = None
        # Initialized and not closed: a pool dropped after losing the server is reopened by the next query.
        self._open = False
        # Two tasks racing into initialize() must not open two pools and leak one.
        self._lock = asyncio.Lock()
        # One direct probe at a time: queries timing out together ask the same question (see _probe).
        self._probe_lock = asyncio.Lock()
        self._probes = 0
        self._last_answer: BaseException | None = None
        self._background: set[asyncio.Future[None]] = set()  # checks given up on, pool closes (see _keep)

    @property
    def conninfo(self) -> str:
        """The libpq connection string or URL this storage reads from."""
        return self._conninfo

    # --- lifecycle ----------------------------------------------------------------------------------
    async def initialize(self) -> None:
        """Check the schema exists, then open the connection pool. Idempotent.

        Raises SchemaMissingError when the tables are missing and StorageUnavailableError when the
        database cannot be reached.
        """
        try:
            await self._initialize(reopen=False)
        except (psycopg.OperationalError, TimeoutError) as exc:  # PoolTimeout is an OperationalError too
            raise _unavailable(exc) from exc

    async def ping(self, timeout: float = 10.0) -> None:
        """Succeed when the database answers a query within ``timeout`` seconds (initializing if needed)."""

        async def check() -> None:
            await self.initialize()
            await self._fetch("SELECT 1", [])

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        task = asyncio.ensure_future(check())
        try:
            # Time kept for a whole probe (and dropping the pool): the pool's own wait may be longer than
            # ``timeout``, and would end in one.
            done, _ = await asyncio.wait({task}, timeout=max(timeout - PROBE_TIMEOUT - 1.0, timeout / 3))
        finally:
            if not task.done():
                # Not waited for (and cancelled with ping, if ping is): on a server that stopped answering,
                # psycopg gives a cancelled statement up to 10 s before closing its connection.
                task.cancel()
                self._keep(task)
        if task in done:
            task.result()  # its error, if any
            return
        pool, cause = self._pool, None
        if pool is not None:
            with contextlib.suppress(TimeoutError):
                cause = await asyncio.wait_for(self._probe(pool), max(0.0, deadline - loop.time()))
        raise _unavailable(cause or TimeoutError())

    async def _initialize(self, *, reopen: bool) -> None:
        """Open the pool. ``reopen``: for a query after the pool was dropped, which must not reopen a
        storage closed meanwhile."""
        async with self._lock:
            if self._pool is not None:
                return
            if reopen and not self._open:
                raise StorageUnavailableError("the storage was closed")
            # One direct connection first: its error names the real cause (refused, bad password, unknown
            # database) at once, where a pool retries in the background and only reports a timeout.
            connect = psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
            timeout = self._wait_timeout if reopen else self._open_timeout
            async with await asyncio.wait_for(connect, timeout) as conn:
                cur = await conn.execute(_MISSING_TABLES, [list(REQUIRED_TABLES)])
                missing = [row[0] for row in await cur.fetchall()]
            if missing:
                raise SchemaMissingError(
                    f"roma-otel tables missing from the database: {', '.join(missing)}. "
                    "Create the schema with `roma-otel db upgrade` (or `alembic upgrade head`) first."
                )
            pool = AsyncConnectionPool(
                self._conninfo,
                min_size=self._min_size,
                max_size=self._max_size,
                open=False,
                # Reads need no transaction; the multi-statement summary opens its own explicitly.
                kwargs={"autocommit": True},
                # A connection dropped by a server restart would otherwise fail the next query.
                check=AsyncConnectionPool.check_connection,
                name="roma-otel-storage",
            )
            try:
                await pool.open(wait=True, timeout=self._open_timeout)
            except BaseException:
                await pool.close()
                raise
            self._pool = pool
            self._open = True

    async def close(self) -> None:
        """Close the pool. Idempotent; ``initialize()`` may be called again afterwards."""
        async with self._lock:
            pool, self._pool = self._pool, None
            self._open = False
            if pool is not None:
                await pool.close()

    async def _probe(self, pool: AsyncConnectionPool) -> BaseException | None:
        """Why ``pool`` cannot serve, asked of the server by a direct connection: its error, or None.

        Unless the server only lacks connection slots (a busy server: the pool's connections still work),
        a failed probe drops ``pool`` if it is still current: its connections still checked out are closed
        as they come back, queries waiting on it get PoolClosed, and later queries reconnect directly. A
        query that waited while another probed takes that answer (it describes the server) instead of
        probing again.
        """
        asked = self._probes
        async with self._probe_lock:
            if self._probes != asked:
                answer = self._last_answer
            else:
                try:
                    conn = await asyncio.wait_for(
                        psycopg.AsyncConnection.connect(self._conninfo, autocommit=True), PROBE_TIMEOUT
                    )
                except (psycopg.OperationalError, TimeoutError) as exc:
                    answer: BaseException | None = exc
                else:
                    await conn.close()
                    answer = None
                # Published only once complete: a probe cancelled half-way answers nobody.
                self._last_answer = answer
                self._probes += 1
            if answer is not None and not _out_of_slots(answer):
                async with self._lock:
                    if self._pool is pool:
                        self._pool = None
                # Shielded: a caller giving up (ping's budget) must not stop the close half-way, before
                # it fails the queries waiting on the pool.
                await asyncio.shield(self._keep(asyncio.ensure_future(pool.close(timeout=1.0))))
            return answer

    def _keep(self, task: asyncio.Future[None]) -> asyncio.Future[None]:
        """Hold ``task`` until it is done, then read and drop its outcome (never reported as unretrieved)."""
        self._background.add(task)
        task.add_done_callback(_forget(self._background))
        return task

    async def __aenter__(self) -> Self:
        await self.initialize()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        pool = self._pool
        if pool is None:
            if not self._open:
                raise RuntimeError("PostgresStorage is not initialized: call `await storage.initialize()` first")
            try:  # the pool was dropped when the server went away: reconnect, or fail now
                await asyncio.wait_for(self._initialize(reopen=True), self._wait_timeout)
            except (psycopg.OperationalError, TimeoutError) as exc:
                raise _unavailable(exc) from exc
            pool = self._pool
            if pool is None:  # closed, or dropped again, before this task ran on
                raise StorageUnavailableError(
                    "the database connection was lost" if self._open else "the storage was closed"
                )
        conn: psycopg.AsyncConnection[Any] | None = None
        try:
            # The deadline covers the wait, the pool's check of the connection and the caller's statements.
            async with asyncio.timeout(self._query_timeout), pool.connection(timeout=self._wait_timeout) as conn:
                yield conn
        except TimeoutError as exc:  # query_timeout: a server that stopped answering, or a slow query
            cause = await self._probe(pool)
            raise _unavailable(cause or exc) from exc
        except psycopg.OperationalError as exc:  # the server went away, or the pool timed out
            # A pool that lost the server retries in the background with a growing backoff, and every
            # query would wait wait_timeout on it: if the server is gone, _probe drops it.
            if isinstance(exc, PoolTimeout) or (conn is not None and conn.broken):
                cause = await self._probe(pool)
                if cause is not None:
                    raise _unavailable(cause) from exc
            raise _unavailable(exc) from exc
        except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn) as exc:
            # The schema was dropped or downgraded under a running storage (initialize() checked it).
            raise SchemaMissingError(
                f"roma-otel's schema is missing or out of date: {str(exc).strip()}. "
                "Create it with `roma-otel db upgrade` (or `alembic upgrade head`)."
            ) from exc
        except psycopg.Error as exc:  # a privilege revoked, a column's type changed under us, ...
            raise StorageUnavailableError(str(exc).strip() or type(exc).__name__) from exc

    async def _fetch(self, query: sql.Composable | str, params: list[object]) -> list[dict[str, Any]]:
        async with self._connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(query, [_matchable(p, conn) for p in params])
            return await cur.fetchall()

    # --- executions ---------------------------------------------------------------------------------
    async def get_execution(self, execution_id: str) -> ExecutionRecord | None:
        query, params = _select(ExecutionRecord, {"execution_id": _check_id(execution_id)}, "execution_id")
        rows = await self._fetch(query, [*params, 1, 0])
        return ExecutionRecord.from_row(rows[0]) if rows else None

    async def list_executions(
        self, limit: int = 50, offset: int = 0, status: str | None = None
    ) -> list[ExecutionRecord]:
        """Executions newest first, optionally only those with ``status``."""
        _check_limit(limit)
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be a non-negative integer, got {offset!r}")
        query, params = _select(ExecutionRecord, {"status": status}, "created_at DESC, execution_id")
        rows = await self._fetch(query, [*params, limit, offset])
        return [ExecutionRecord.from_row(r) for r in rows]

    async def delete_executions_older_than(self, days: float) -> int:
        """Delete executions created more than ``days`` ago (their traces go too, by cascade); return the count."""
        if isinstance(days, bool) or not isinstance(days, int | float) or not math.isfinite(days) or days < 0:
            raise ValueError(f"days must be a finite, non-negative number, got {days!r}")
        async with self._connection() as conn:
            cur = await conn.execute(
                "DELETE FROM executions WHERE created_at < now() - make_interval(secs => %s)",
                [float(days) * 86400.0],
            )
            return cur.rowcount

    # --- LM calls -----------------------------------------------------------------------------------
    async def get_lm_traces(self, execution_id: str, module: str | None = None, limit: int = 1000) -> list[LMTrace]:
        """LM calls of one execution in call order, optionally of one module (``module_name``)."""
        _check_limit(limit)
        query, params = _select(
            LMTrace, {"execution_id": _check_id(execution_id), "module_name": module}, "created_at, trace_id"
        )
        return [LMTrace.from_row(r) for r in await self._fetch(query, [*params, limit, 0])]

    async def get_execution_costs(self, execution_id: str) -> dict[str, Any]:
        """Cost, tokens and latency of one execution, in total and per module and per model.

        Calls with no known price (``cost_usd`` NULL) add nothing to the cost sums and are counted in
        ``unpriced_calls``, so a reader can tell "free" from "unknown".
        """
        rows = await self._fetch(_COSTS, [_check_id(execution_id)])
        result: dict[str, Any] = {"execution_id": execution_id}
        by_module: dict[str, dict[str, Any]] = {}
        by_model: dict[str, dict[str, Any]] = {}
        for row in rows:
            group = {
                "calls": row["calls"],
                "tokens": row["tokens"],
                "cost": row["cost"],
                "avg_latency_ms": row["avg_latency_ms"],
            }
            if row["level"] == 3:
                result.update(
                    total_cost=row["cost"],
                    total_tokens=row["tokens"],
                    prompt_tokens=row["prompt_tokens"],
                    completion_tokens=row["completion_tokens"],
                    calls=row["calls"],
                    unpriced_calls=row["unpriced_calls"],
                )
            elif row["level"] == 1:
                by_module[row["module_name"]] = group
            else:
                by_model[row["model"]] = group
        result["by_module"] = by_module
        result["by_model"] = by_model
        return result

    # --- toolkits -----------------------------------------------------------------------------------
    async def get_toolkit_traces(
        self,
        execution_id: str,
        operation: str | None = None,
        toolkit_class: str | None = None,
        limit: int = 1000,
    ) -> list[ToolkitTrace]:
        """Toolkit lifecycle events of one execution in time order, optionally filtered."""
        _check_limit(limit)
        query, params = _select(
            ToolkitTrace,
            {"execution_id": _check_id(execution_id), "operation": operation, "toolkit_class": toolkit_class},
            '"timestamp", trace_id',
        )
        return [ToolkitTrace.from_row(r) for r in await self._fetch(query, [*params, limit, 0])]

    async def get_tool_invocation_traces(
        self,
        execution_id: str,
        toolkit_class: str | None = None,
        tool_name: str | None = None,
        limit: int = 1000,
    ) -> list[ToolInvocationTrace]:
        """Tool calls of one execution in the order they started, optionally filtered."""
        _check_limit(limit)
        query, params = _select(
            ToolInvocationTrace,
            {"execution_id": _check_id(execution_id), "toolkit_class": toolkit_class, "tool_name": tool_name},
            "invoked_at, trace_id",
        )
        return [ToolInvocationTrace.from_row(r) for r in await self._fetch(query, [*params, limit, 0])]

    async def get_toolkit_metrics_summary(self, execution_id: str) -> dict[str, Any]:
        """Toolkit lifecycle and tool-call aggregates of one execution, in the shape of ROMA's REST response."""
        _check_id(execution_id)
        # Both queries read one snapshot, so calls and lifecycle agree while a run is still writing.
        async with self._connection() as conn, conn.cursor(row_factory=dict_row) as cur, conn.transaction():
            await cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            key = _matchable(execution_id, conn)
            await cur.execute(_LIFECYCLE, [key])
            lifecycle = await cur.fetchone()
            await cur.execute(_INVOCATIONS, [key])
            groups = await cur.fetchall()
        assert lifecycle is not None  # an aggregate without GROUP BY always returns one row
        hits, misses = lifecycle["cache_hits"], lifecycle["cache_misses"]
        summary: dict[str, Any] = {
            "execution_id": execution_id,
            "toolkit_lifecycle": {
                "total_created": lifecycle["total_created"],
                "cache_hit_rate": _ratio(hits, hits + misses),
            },
        }
        by_toolkit: dict[str, dict[str, Any]] = {}
        by_tool: dict[str, dict[str, Any]] = {}
        for g in groups:
            calls, ok = g["calls"], g["successful"]
            if g["level"] == 3:
                summary["tool_invocations"] = {
                    "total_calls": calls,
                    "successful_calls": ok,
                    "failed_calls": calls - ok,
                    "success_rate": _ratio(ok, calls),
                    "avg_duration_ms": g["avg_duration_ms"],
                    "total_duration_ms": g["total_duration_ms"],
                }
            elif g["level"] == 1:
                by_toolkit[g["toolkit_class"]] = {
                    "calls": calls,
                    "successful": ok,
                    "failed": calls - ok,
                    "avg_duration_ms": g["avg_duration_ms"],
                }
            else:
                by_tool[f"{g['toolkit_class']}.{g['tool_name']}"] = {
                    "calls": calls,
                    "successful": ok,
                    "avg_duration_ms": g["avg_duration_ms"],
                }
        summary["by_toolkit"] = by_toolkit
        summary["by_tool"] = by_tool
        return summary
