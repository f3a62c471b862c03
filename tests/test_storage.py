"""PostgresStorage against a real PostgreSQL: exact aggregates, filters, limits, injection and the seed's examples.

Each test gets a fresh database (``pg_dsn`` in tests/conftest.py); ``create_schema`` lays down the tables.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import sys
import types
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import psycopg
import pytest
from psycopg.types.json import Jsonb

from roma_otel.config import PostgresConfig, RomaOtelConfig
from roma_otel.storage.migrate import upgrade
from roma_otel.storage.postgres import PostgresStorage, SchemaMissingError, StorageUnavailableError
from roma_otel.storage.records import ExecutionRecord, LMTrace, ToolInvocationTrace, ToolkitTrace
from tests.pgserver import PostgresServer, other_sessions, own_migrated_server

T = TypeVar("T")

# --- schema -----------------------------------------------------------------------------------------
TABLES = ("executions", "lm_traces", "toolkit_traces", "tool_invocation_traces")


def create_schema(dsn: str) -> None:
    """Create roma-otel's tables in the database at ``dsn`` with the packaged Alembic migrations."""
    upgrade(dsn)


# --- data -------------------------------------------------------------------------------------------
# "exec_123" is the execution the seed's examples query, so they run with their own id unchanged.
T0 = datetime(2025, 3, 14, 9, 0, tzinfo=UTC)
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"

# (execution_id, created_at offset from now(), status, extra columns)
EXECUTIONS: list[tuple[str, str, str, dict[str, Any]]] = [
    (
        "exec_123",
        "1 minute",
        "completed",
        {
            "task": "规划巴塞罗那周末游",
            "max_depth": 3,
            "solver_type": "RecursiveSolver",
            "config_version": "1",
            "config": Jsonb({"profile": "high_quality"}),
            "total_tasks": 7,
            "completed_tasks": 6,
            "failed_tasks": 1,
            "total_cost": 0.004505,
            "total_tokens": 2070,
            "execution_duration": 42.5,
            "max_depth_reached": 2,
            "otel_trace_id": TRACE_ID,
            "metadata": Jsonb({"user": "alice"}),
            "dag_snapshot": Jsonb({"nodes": ["root", "plan"], "edges": [["root", "plan"]]}),
        },
    ),
    ("exec_other", "1 hour", "completed", {}),
    ("exec_failed", "2 days", "failed", {}),
    ("exec_old", "40 days", "completed", {}),
]

# exec_123's tool calls, one second apart: (toolkit_class, tool_name, duration_ms, success, metadata)
EXEC_123_CALLS: list[tuple[str, str, float, bool, dict[str, Any]]] = [
    ("SerperToolkit", "search_web", 100.0, True, {}),
    ("SerperToolkit", "search_web", 150.0, True, {}),
    ("SerperToolkit", "search_news", 250.0, False, {"error_type": "TimeoutError"}),
    ("FileToolkit", "read_file", 10.0, True, {}),
    ("FileToolkit", "read_file", 30.0, False, {"error_type": "FileNotFoundError"}),
    ("SerperToolkit", "search_web", 200.0, True, {}),
    ("FileToolkit", "read_file", 20.0, True, {}),
    ("SerperToolkit", "search_news", 50.0, True, {}),
    ("FileToolkit", "write_file", 40.0, False, {}),  # no error_type: the seed counts it as "Unknown"
    ("CalculatorToolkit", "add", 5.0, False, {"error_type": "TimeoutError"}),
    ("FileToolkit", "read_file", 25.0, True, {}),
]
# exec_other's calls are far slower, so any leak into exec_123's results shows at the top of the slow list.
OTHER_CALLS = [
    ("SerperToolkit", "search_web", 9000.0, True, {}),
    ("SerperToolkit", "search_web", 9500.0, False, {"error_type": "RateLimitError"}),
]

# (operation, toolkit_class, duration_ms, success, error)
EXEC_123_LIFECYCLE: list[tuple[str, str, float, bool, str | None]] = [
    ("cache_miss", "SerperToolkit", 0.4, True, None),
    ("create", "SerperToolkit", 12.5, True, None),
    ("cache_hit", "SerperToolkit", 0.1, True, None),
    ("cache_hit", "SerperToolkit", 0.1, True, None),
    ("create", "CalculatorToolkit", 1.5, False, "ValueError: bad config"),  # failed: not counted as created
    ("create", "FileToolkit", 3.0, True, None),
    ("cache_hit", "FileToolkit", 0.2, True, None),
    ("cleanup", "SerperToolkit", 0.3, True, None),
    ("cleanup", "FileToolkit", 0.2, True, None),
]
OTHER_LIFECYCLE = [
    ("create", "SerperToolkit", 11.0, True, None),
    ("cache_hit", "SerperToolkit", 0.1, True, None),
    ("cache_hit", "SerperToolkit", 0.1, True, None),
]

# (module_name, model, prompt_tokens, completion_tokens, total_tokens, cost_usd, latency_ms)
EXEC_123_LM: list[tuple[str, str, int, int, int | None, str | None, float]] = [
    ("atomizer", "openai/gpt-4o-mini", 100, 20, 120, "0.00003", 200.0),
    ("planner", "openai/gpt-4o", 500, 300, 800, "0.00425", 1500.0),
    ("executor", "openai/gpt-4o-mini", 300, 100, 400, "0.000105", 700.0),
    ("executor", "local/llama-3-8b", 200, 50, 250, None, 1000.0),  # no price known
    ("aggregator", "openai/gpt-4o-mini", 400, 100, None, "0.00012", 600.0),  # total missing: 400 + 100 counted
]
OTHER_LM = [("planner", "openai/gpt-4o", 600, 400, 1000, "1.25", 2000.0)]


def _insert_calls(cur: psycopg.Cursor[Any], execution_id: str, calls: list[Any], start: datetime) -> None:
    cur.executemany(
        "INSERT INTO tool_invocation_traces (execution_id, toolkit_class, tool_name, invoked_at, duration_ms,"
        " input_size_bytes, output_size_bytes, success, error, metadata)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        [
            (
                execution_id,
                cls,
                tool,
                start + timedelta(seconds=i),
                ms,
                64 + i,
                512 * (i + 1),
                ok,
                None if ok else f"{meta.get('error_type', 'Error')}: tool failed",
                Jsonb(meta),
            )
            for i, (cls, tool, ms, ok, meta) in enumerate(calls)
        ],
    )


def _insert_lifecycle(cur: psycopg.Cursor[Any], execution_id: str, events: list[Any], start: datetime) -> None:
    cur.executemany(
        "INSERT INTO toolkit_traces (execution_id, timestamp, operation, toolkit_class, duration_ms, success, error,"
        " metadata) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
        [
            (execution_id, start + timedelta(seconds=i), op, cls, ms, ok, err, Jsonb({"cache_key": f"{cls}:{i}"}))
            for i, (op, cls, ms, ok, err) in enumerate(events)
        ],
    )


def _insert_lm(cur: psycopg.Cursor[Any], execution_id: str, calls: list[Any], start: datetime, trace: str) -> None:
    cur.executemany(
        "INSERT INTO lm_traces (execution_id, otel_trace_id, span_id, parent_span_id, task_id, depth, module_name,"
        " model, created_at, prompt_tokens, completion_tokens, total_tokens, cost_usd, cost_source, latency_ms,"
        " metadata) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::numeric, %s, %s, %s)",
        [
            (
                execution_id,
                trace,
                f"{i + 1:016x}",
                "00000000000000aa",
                f"task-{i}",
                i % 3,
                module,
                model,
                start + timedelta(seconds=i),
                pt,
                ct,
                tt,
                cost,
                None if cost is None else "litellm",
                latency,
                Jsonb({"temperature": 0.0}),
            )
            for i, (module, model, pt, ct, tt, cost, latency) in enumerate(calls)
        ],
    )


def populate(dsn: str) -> None:
    """Create the schema and the four executions with their traces."""
    create_schema(dsn)
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        for execution_id, age, status, extra in EXECUTIONS:
            columns = ["execution_id", "status", *extra]
            cur.execute(
                f"INSERT INTO executions ({', '.join(columns)}, created_at, updated_at)"
                f" VALUES ({', '.join(['%s'] * len(columns))}, now() - %s::interval, now() - %s::interval)",
                [execution_id, status, *extra.values(), age, age],
            )
        _insert_calls(cur, "exec_123", EXEC_123_CALLS, T0)
        _insert_calls(cur, "exec_other", OTHER_CALLS, T0)
        _insert_calls(cur, "exec_old", OTHER_CALLS[:1], T0 - timedelta(days=40))
        _insert_lifecycle(cur, "exec_123", EXEC_123_LIFECYCLE, T0)
        _insert_lifecycle(cur, "exec_other", OTHER_LIFECYCLE, T0)
        _insert_lifecycle(cur, "exec_old", OTHER_LIFECYCLE[:1], T0 - timedelta(days=40))
        _insert_lm(cur, "exec_123", EXEC_123_LM, T0, TRACE_ID)
        _insert_lm(cur, "exec_other", OTHER_LM, T0, "b" * 32)
        _insert_lm(cur, "exec_old", OTHER_LM, T0 - timedelta(days=40), "c" * 32)


def row_counts(dsn: str) -> dict[tuple[str, str], int]:
    """(table, execution_id) -> rows, for checking that nothing changed."""
    counts: dict[tuple[str, str], int] = {}
    with psycopg.connect(dsn) as conn:
        for table in TABLES:
            for execution_id, n in conn.execute(f"SELECT execution_id, count(*) FROM {table} GROUP BY 1"):
                counts[(table, execution_id)] = n
    return counts


def existing_tables(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        return [t for t in TABLES if conn.execute("SELECT to_regclass(%s)", [t]).fetchone()[0] is not None]


def with_storage(dsn: str | PostgresConfig, body: Callable[[PostgresStorage], Awaitable[T]]) -> T:
    """Run ``body(storage)`` on an initialized storage in a fresh event loop, closing it afterwards."""

    async def main() -> T:
        async with PostgresStorage(dsn) as storage:
            return await body(storage)

    return asyncio.run(main())


@pytest.fixture
def dsn(pg_dsn: str) -> Iterator[str]:
    """A database holding the schema and the test executions."""
    populate(pg_dsn)
    yield pg_dsn


# --- the seed's examples ----------------------------------------------------------------------------
# Verbatim from the seed document, except the import path. They run as top-level-await code, as written.
SEED_TOOLKIT_PERFORMANCE = """\
from roma_otel.storage.postgres import PostgresStorage

# 获取工具箱指标摘要
summary = await storage.get_toolkit_metrics_summary("exec_123")

print(f"总工具调用数: {summary['tool_invocations']['total_calls']}")
print(f"成功率: {summary['tool_invocations']['success_rate']:.2%}")
print(f"平均持续时间: {summary['tool_invocations']['avg_duration_ms']:.2f}ms")

# 按工具箱分析
for toolkit, metrics in summary['by_toolkit'].items():
    print(f"\\n{toolkit}:")
    print(f"  调用数: {metrics['calls']}")
    print(f"  成功率: {metrics['successful'] / metrics['calls']:.2%}")
    print(f"  平均持续时间: {metrics['avg_duration_ms']:.2f}ms")
"""

SEED_SLOW_TOOLS = """\
# 获取所有工具调用
invocations = await storage.get_tool_invocation_traces("exec_123")

# 按持续时间排序
slow_tools = sorted(invocations, key=lambda x: x.duration_ms, reverse=True)[:10]

print("最慢的 10 个工具调用:")
for inv in slow_tools:
    print(f"{inv.toolkit_class}.{inv.tool_name}: {inv.duration_ms:.2f}ms")
"""

SEED_FAILURES = """\
# 获取失败的工具调用
failed = await storage.get_tool_invocation_traces(
    execution_id="exec_123",
    limit=1000
)
failed = [inv for inv in failed if not inv.success]

# 按错误类型分组
from collections import Counter
error_types = Counter(inv.metadata.get('error_type', 'Unknown') for inv in failed)

print("失败分类:")
for error_type, count in error_types.most_common():
    print(f"  {error_type}: {count}")
"""

SEED_CACHE = """\
# 获取生命周期追踪
traces = await storage.get_toolkit_traces("exec_123")

# 计算缓存指标
cache_hits = sum(1 for t in traces if t.operation == "cache_hit")
cache_misses = sum(1 for t in traces if t.operation == "cache_miss")
total = cache_hits + cache_misses

if total > 0:
    hit_rate = cache_hits / total
    print(f"缓存命中率: {hit_rate:.2%}")
    print(f"缓存命中: {cache_hits}")
    print(f"缓存未命中: {cache_misses}")
"""

SEED_WITH_MLFLOW = """\
# 查询两个源
import mlflow
from roma_otel.storage.postgres import PostgresStorage

# MLflow - 高级指标
runs = mlflow.search_runs(experiment_names=["ROMA-DSPy"])

# Postgres - 详细追踪
storage = PostgresStorage(config.storage.postgres)
await storage.initialize()

for _, run in runs.iterrows():
    execution_id = run["tags.execution_id"]
    costs = await storage.get_execution_costs(execution_id)
    print(f"Run {execution_id}: ${costs['total_cost']:.4f}")
"""


async def run_snippet(code: str, namespace: dict[str, Any]) -> None:
    """Execute documentation code that uses top-level ``await``, as a notebook or ``python -m asyncio`` would."""
    compiled = compile(code, "<seed>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    result = eval(compiled, namespace)
    if result is not None:
        await result


def run_seed(dsn: str, code: str) -> None:
    with_storage(dsn, lambda storage: run_snippet(code, {"storage": storage}))


def test_seed_toolkit_performance(dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    run_seed(dsn, SEED_TOOLKIT_PERFORMANCE)
    assert capsys.readouterr().out == (
        "总工具调用数: 11\n"
        "成功率: 63.64%\n"  # 7 of 11
        "平均持续时间: 80.00ms\n"  # 880 / 11
        "\nFileToolkit:\n  调用数: 5\n  成功率: 60.00%\n  平均持续时间: 25.00ms\n"
        "\nSerperToolkit:\n  调用数: 5\n  成功率: 80.00%\n  平均持续时间: 150.00ms\n"
        "\nCalculatorToolkit:\n  调用数: 1\n  成功率: 0.00%\n  平均持续时间: 5.00ms\n"
    )


def test_seed_slow_tools(dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    run_seed(dsn, SEED_SLOW_TOOLS)
    # Eleven calls, the ten slowest shown (CalculatorToolkit.add at 5 ms drops off); exec_other's 9 s calls absent.
    assert capsys.readouterr().out == (
        "最慢的 10 个工具调用:\n"
        "SerperToolkit.search_news: 250.00ms\n"
        "SerperToolkit.search_web: 200.00ms\n"
        "SerperToolkit.search_web: 150.00ms\n"
        "SerperToolkit.search_web: 100.00ms\n"
        "SerperToolkit.search_news: 50.00ms\n"
        "FileToolkit.write_file: 40.00ms\n"
        "FileToolkit.read_file: 30.00ms\n"
        "FileToolkit.read_file: 25.00ms\n"
        "FileToolkit.read_file: 20.00ms\n"
        "FileToolkit.read_file: 10.00ms\n"
    )


def test_seed_failures(dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    run_seed(dsn, SEED_FAILURES)
    assert capsys.readouterr().out == "失败分类:\n  TimeoutError: 2\n  FileNotFoundError: 1\n  Unknown: 1\n"


def test_seed_cache_performance(dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    run_seed(dsn, SEED_CACHE)
    assert capsys.readouterr().out == "缓存命中率: 75.00%\n缓存命中: 3\n缓存未命中: 1\n"


class _Runs:
    """The one DataFrame method the seed's loop uses, over rows of MLflow run columns."""

    def __init__(self, rows: list[dict[str, str]]) -> None:
        self._rows = rows

    def iterrows(self) -> Iterator[tuple[int, dict[str, str]]]:
        return iter(enumerate(self._rows))


def test_seed_postgres_with_mlflow(
    dsn: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # mlflow is not under test here (and not installed): a module standing in for it supplies the runs whose
    # execution_id tags the Postgres half of the example looks up.
    asked: list[Any] = []

    def search_runs(experiment_names: list[str]) -> _Runs:
        asked.append(experiment_names)
        return _Runs([{"tags.execution_id": "exec_123"}, {"tags.execution_id": "exec_other"}])

    mlflow = types.ModuleType("mlflow")
    mlflow.search_runs = search_runs  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)

    config = RomaOtelConfig()
    config.storage.postgres.enabled = True
    config.storage.postgres.connection_url = dsn

    async def main() -> None:
        namespace: dict[str, Any] = {"config": config}
        try:
            await run_snippet(SEED_WITH_MLFLOW, namespace)
        finally:
            await namespace["storage"].close()

    asyncio.run(main())
    assert asked == [["ROMA-DSPy"]]
    assert capsys.readouterr().out == "Run exec_123: $0.0045\nRun exec_other: $1.2500\n"


# --- aggregates ---------------------------------------------------------------------------------------
def test_toolkit_metrics_summary_exact(dsn: str) -> None:
    summary = with_storage(dsn, lambda s: s.get_toolkit_metrics_summary("exec_123"))
    assert summary == {
        "execution_id": "exec_123",
        "toolkit_lifecycle": {"total_created": 2, "cache_hit_rate": 0.75},
        "tool_invocations": {
            "total_calls": 11,
            "successful_calls": 7,
            "failed_calls": 4,
            "success_rate": 7 / 11,
            "avg_duration_ms": 80.0,
            "total_duration_ms": 880.0,
        },
        "by_toolkit": {
            "FileToolkit": {"calls": 5, "successful": 3, "failed": 2, "avg_duration_ms": 25.0},
            "SerperToolkit": {"calls": 5, "successful": 4, "failed": 1, "avg_duration_ms": 150.0},
            "CalculatorToolkit": {"calls": 1, "successful": 0, "failed": 1, "avg_duration_ms": 5.0},
        },
        "by_tool": {
            "FileToolkit.read_file": {"calls": 4, "successful": 3, "avg_duration_ms": 21.25},
            "SerperToolkit.search_web": {"calls": 3, "successful": 3, "avg_duration_ms": 150.0},
            "SerperToolkit.search_news": {"calls": 2, "successful": 1, "avg_duration_ms": 150.0},
            "CalculatorToolkit.add": {"calls": 1, "successful": 0, "avg_duration_ms": 5.0},
            "FileToolkit.write_file": {"calls": 1, "successful": 0, "avg_duration_ms": 40.0},
        },
    }
    # The seed's key order, and busiest first within each breakdown (ties by name).
    assert list(summary) == ["execution_id", "toolkit_lifecycle", "tool_invocations", "by_toolkit", "by_tool"]
    assert list(summary["by_toolkit"]) == ["FileToolkit", "SerperToolkit", "CalculatorToolkit"]
    assert list(summary["by_tool"])[:3] == [
        "FileToolkit.read_file",
        "SerperToolkit.search_web",
        "SerperToolkit.search_news",
    ]
    json.dumps(summary)


def test_toolkit_metrics_summary_other_execution_is_separate(dsn: str) -> None:
    summary = with_storage(dsn, lambda s: s.get_toolkit_metrics_summary("exec_other"))
    assert summary["toolkit_lifecycle"] == {"total_created": 1, "cache_hit_rate": 1.0}
    assert summary["tool_invocations"] == {
        "total_calls": 2,
        "successful_calls": 1,
        "failed_calls": 1,
        "success_rate": 0.5,
        "avg_duration_ms": 9250.0,
        "total_duration_ms": 18500.0,
    }
    assert summary["by_tool"] == {"SerperToolkit.search_web": {"calls": 2, "successful": 1, "avg_duration_ms": 9250.0}}


def test_summary_aggregates_every_row_not_a_capped_read(pg_dsn: str) -> None:
    # 12,000 calls: more than any read limit, so only server-side aggregation gets these numbers right.
    create_schema(pg_dsn)
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("INSERT INTO executions (execution_id) VALUES ('big')")
        conn.execute(
            "INSERT INTO tool_invocation_traces (execution_id, toolkit_class, tool_name, invoked_at, duration_ms,"
            " input_size_bytes, output_size_bytes, success)"
            " SELECT 'big', 'T', 'tool_' || (i %% 3), %s::timestamptz + i * interval '1 ms', i %% 10, 1, 1, i %% 4 <> 0"
            " FROM generate_series(1, 12000) AS i",
            [T0],
        )
    summary = with_storage(pg_dsn, lambda s: s.get_toolkit_metrics_summary("big"))
    calls = summary["tool_invocations"]
    assert calls["total_calls"] == 12000
    assert calls["successful_calls"] == 9000  # every fourth call failed
    assert calls["total_duration_ms"] == 1200 * 45.0  # each block of ten sums 0..9
    assert calls["avg_duration_ms"] == 4.5
    assert summary["by_toolkit"]["T"]["calls"] == 12000
    assert {k: v["calls"] for k, v in summary["by_tool"].items()} == {
        "T.tool_0": 4000,
        "T.tool_1": 4000,
        "T.tool_2": 4000,
    }


def test_execution_costs_exact(dsn: str) -> None:
    costs = with_storage(dsn, lambda s: s.get_execution_costs("exec_123"))
    assert costs == {
        "execution_id": "exec_123",
        "total_cost": 0.004505,  # the unpriced llama call adds nothing
        "total_tokens": 2070,  # the aggregator row's missing total counts as 400 + 100
        "prompt_tokens": 1500,
        "completion_tokens": 570,
        "calls": 5,
        "unpriced_calls": 1,
        "by_module": {
            "executor": {"calls": 2, "tokens": 650, "cost": 0.000105, "avg_latency_ms": 850.0},
            "aggregator": {"calls": 1, "tokens": 500, "cost": 0.00012, "avg_latency_ms": 600.0},
            "atomizer": {"calls": 1, "tokens": 120, "cost": 0.00003, "avg_latency_ms": 200.0},
            "planner": {"calls": 1, "tokens": 800, "cost": 0.00425, "avg_latency_ms": 1500.0},
        },
        "by_model": {
            "openai/gpt-4o-mini": {"calls": 3, "tokens": 1020, "cost": 0.000255, "avg_latency_ms": 500.0},
            "local/llama-3-8b": {"calls": 1, "tokens": 250, "cost": 0.0, "avg_latency_ms": 1000.0},
            "openai/gpt-4o": {"calls": 1, "tokens": 800, "cost": 0.00425, "avg_latency_ms": 1500.0},
        },
    }
    assert next(iter(costs["by_model"])) == "openai/gpt-4o-mini"  # busiest first
    json.dumps(costs)


def test_unknown_execution_gives_none_and_zero_summaries(dsn: str) -> None:
    async def body(s: PostgresStorage) -> tuple[Any, ...]:
        return (
            await s.get_execution("exec_nope"),
            await s.get_toolkit_metrics_summary("exec_nope"),
            await s.get_execution_costs("exec_nope"),
            await s.get_toolkit_traces("exec_nope"),
            await s.get_tool_invocation_traces("exec_nope"),
            await s.get_lm_traces("exec_nope"),
        )

    execution, summary, costs, toolkit, calls, lm = with_storage(dsn, body)
    assert execution is None
    assert summary == {
        "execution_id": "exec_nope",
        "toolkit_lifecycle": {"total_created": 0, "cache_hit_rate": 0.0},
        "tool_invocations": {
            "total_calls": 0,
            "successful_calls": 0,
            "failed_calls": 0,
            "success_rate": 0.0,
            "avg_duration_ms": 0.0,
            "total_duration_ms": 0.0,
        },
        "by_toolkit": {},
        "by_tool": {},
    }
    assert costs == {
        "execution_id": "exec_nope",
        "total_cost": 0.0,
        "total_tokens": 0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "calls": 0,
        "unpriced_calls": 0,
        "by_module": {},
        "by_model": {},
    }
    assert toolkit == calls == lm == []


def test_cache_hit_rate_is_zero_without_lookups(dsn: str) -> None:
    # exec_old has a create but no cache_hit/cache_miss rows.
    summary = with_storage(dsn, lambda s: s.get_toolkit_metrics_summary("exec_old"))
    assert summary["toolkit_lifecycle"] == {"total_created": 1, "cache_hit_rate": 0.0}


# --- records and filters ------------------------------------------------------------------------------
def test_get_execution_record(dsn: str) -> None:
    record = with_storage(dsn, lambda s: s.get_execution("exec_123"))
    assert isinstance(record, ExecutionRecord)
    assert [f.name for f in dataclasses.fields(ExecutionRecord)] == [
        "execution_id",
        "created_at",
        "updated_at",
        "status",
        "task",
        "max_depth",
        "solver_type",
        "config_version",
        "config",
        "total_tasks",
        "completed_tasks",
        "failed_tasks",
        "total_cost",
        "total_tokens",
        "execution_duration",
        "max_depth_reached",
        "otel_trace_id",
        "metadata",
        "dag_snapshot",
    ]
    assert record.status == "completed"
    assert record.task == "规划巴塞罗那周末游"
    assert (record.max_depth, record.max_depth_reached, record.total_tasks, record.failed_tasks) == (3, 2, 7, 1)
    assert record.config == {"profile": "high_quality"}
    assert record.metadata == {"user": "alice"}
    assert record.dag_snapshot == {"nodes": ["root", "plan"], "edges": [["root", "plan"]]}
    assert record.total_cost == 0.004505 and isinstance(record.total_cost, float)
    assert record.total_tokens == 2070
    assert record.otel_trace_id == TRACE_ID
    assert abs(datetime.now(UTC) - record.created_at - timedelta(minutes=1)) < timedelta(minutes=1)

    as_dict = json.loads(json.dumps(record.to_dict()))
    assert as_dict["created_at"] == record.created_at.isoformat()
    assert datetime.fromisoformat(as_dict["created_at"]) == record.created_at
    assert as_dict["config"] == {"profile": "high_quality"}
    assert set(as_dict) == {f.name for f in dataclasses.fields(ExecutionRecord)}

    with pytest.raises(dataclasses.FrozenInstanceError):
        record.status = "failed"  # type: ignore[misc]
    assert not hasattr(record, "__dict__")  # slots


def test_defaults_of_a_bare_execution(dsn: str) -> None:
    record = with_storage(dsn, lambda s: s.get_execution("exec_other"))
    assert record is not None
    assert (record.task, record.dag_snapshot, record.execution_duration) == (None, None, None)
    assert (record.config, record.metadata, record.total_cost, record.total_tokens) == ({}, {}, 0.0, 0)


def test_list_executions_newest_first_with_status_and_paging(dsn: str) -> None:
    async def body(s: PostgresStorage) -> list[list[str]]:
        return [
            [e.execution_id for e in await s.list_executions()],
            [e.execution_id for e in await s.list_executions(status="failed")],
            [e.execution_id for e in await s.list_executions(limit=2, offset=1)],
            [e.execution_id for e in await s.list_executions(offset=10)],
            [e.execution_id for e in await s.list_executions(status="running")],
        ]

    assert with_storage(dsn, body) == [
        ["exec_123", "exec_other", "exec_failed", "exec_old"],
        ["exec_failed"],
        ["exec_other", "exec_failed"],
        [],
        [],
    ]


def test_toolkit_trace_filters(dsn: str) -> None:
    async def body(s: PostgresStorage) -> list[list[ToolkitTrace]]:
        return [
            await s.get_toolkit_traces("exec_123"),
            await s.get_toolkit_traces("exec_123", operation="create"),
            await s.get_toolkit_traces("exec_123", toolkit_class="SerperToolkit"),
            await s.get_toolkit_traces("exec_123", operation="create", toolkit_class="SerperToolkit"),
            await s.get_toolkit_traces("exec_123", limit=2),
        ]

    every, creates, serper, serper_create, first_two = with_storage(dsn, body)
    assert [(t.operation, t.toolkit_class) for t in every] == [(op, cls) for op, cls, *_ in EXEC_123_LIFECYCLE]
    assert [t.timestamp for t in every] == sorted(t.timestamp for t in every)
    assert [(t.toolkit_class, t.success) for t in creates] == [
        ("SerperToolkit", True),
        ("CalculatorToolkit", False),
        ("FileToolkit", True),
    ]
    assert creates[1].error == "ValueError: bad config"
    assert [t.operation for t in serper] == ["cache_miss", "create", "cache_hit", "cache_hit", "cleanup"]
    assert [t.duration_ms for t in serper_create] == [12.5]
    assert [t.operation for t in first_two] == ["cache_miss", "create"]

    trace = every[0]
    assert [f.name for f in dataclasses.fields(ToolkitTrace)] == [
        "trace_id",
        "execution_id",
        "timestamp",
        "operation",
        "toolkit_class",
        "duration_ms",
        "success",
        "error",
        "metadata",
    ]
    assert (trace.execution_id, trace.timestamp, trace.metadata) == ("exec_123", T0, {"cache_key": "SerperToolkit:0"})
    assert json.loads(json.dumps(trace.to_dict()))["timestamp"] == T0.isoformat()


def test_tool_invocation_filters(dsn: str) -> None:
    async def body(s: PostgresStorage) -> list[list[ToolInvocationTrace]]:
        return [
            await s.get_tool_invocation_traces("exec_123"),
            await s.get_tool_invocation_traces("exec_123", toolkit_class="SerperToolkit"),
            await s.get_tool_invocation_traces("exec_123", tool_name="read_file"),
            await s.get_tool_invocation_traces("exec_123", toolkit_class="SerperToolkit", tool_name="search_web"),
            await s.get_tool_invocation_traces("exec_123", toolkit_class="FileToolkit", tool_name="search_web"),
            await s.get_tool_invocation_traces("exec_123", limit=3),
        ]

    every, serper, read_file, search_web, mismatch, first_three = with_storage(dsn, body)
    assert [(c.toolkit_class, c.tool_name, c.duration_ms) for c in every] == [c[:3] for c in EXEC_123_CALLS]
    assert len(serper) == 5 and {c.toolkit_class for c in serper} == {"SerperToolkit"}
    assert [c.duration_ms for c in read_file] == [10.0, 30.0, 20.0, 25.0]
    assert [c.duration_ms for c in search_web] == [100.0, 150.0, 200.0]
    assert mismatch == []
    assert [c.duration_ms for c in first_three] == [100.0, 150.0, 250.0]

    failed = every[2]
    assert [f.name for f in dataclasses.fields(ToolInvocationTrace)] == [
        "trace_id",
        "execution_id",
        "toolkit_class",
        "tool_name",
        "invoked_at",
        "duration_ms",
        "input_size_bytes",
        "output_size_bytes",
        "success",
        "error",
        "metadata",
    ]
    assert (failed.success, failed.error, failed.metadata) == (
        False,
        "TimeoutError: tool failed",
        {"error_type": "TimeoutError"},
    )
    assert (failed.invoked_at, failed.input_size_bytes, failed.output_size_bytes) == (
        T0 + timedelta(seconds=2),
        66,
        1536,
    )
    assert isinstance(failed.duration_ms, float)
    assert json.loads(json.dumps(failed.to_dict()))["invoked_at"] == (T0 + timedelta(seconds=2)).isoformat()


def test_lm_traces_and_module_filter(dsn: str) -> None:
    async def body(s: PostgresStorage) -> list[list[LMTrace]]:
        return [await s.get_lm_traces("exec_123"), await s.get_lm_traces("exec_123", module="executor")]

    every, executor = with_storage(dsn, body)
    assert [(t.module_name, t.model) for t in every] == [row[:2] for row in EXEC_123_LM]
    assert [t.model for t in executor] == ["openai/gpt-4o-mini", "local/llama-3-8b"]
    priced, unpriced = executor
    assert priced.cost_usd == 0.000105 and isinstance(priced.cost_usd, float)
    assert (unpriced.cost_usd, unpriced.cost_source) == (None, None)
    assert (priced.otel_trace_id, priced.span_id, priced.parent_span_id) == (
        TRACE_ID,
        "0000000000000003",
        "00000000000000aa",
    )
    assert (priced.task_id, priced.depth, priced.cache_hit, priced.error) == ("task-2", 2, False, None)
    assert (priced.prompt_tokens, priced.completion_tokens, priced.total_tokens, priced.latency_ms) == (
        300,
        100,
        400,
        700.0,
    )
    assert every[-1].total_tokens is None
    assert [f.name for f in dataclasses.fields(LMTrace)] == [
        "trace_id",
        "execution_id",
        "otel_trace_id",
        "span_id",
        "parent_span_id",
        "task_id",
        "depth",
        "module_name",
        "model",
        "created_at",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "cost_usd",
        "cost_source",
        "latency_ms",
        "cache_hit",
        "error",
        "metadata",
    ]
    as_dict = json.loads(json.dumps(priced.to_dict()))
    assert as_dict["cost_usd"] == 0.000105
    assert as_dict["created_at"] == (T0 + timedelta(seconds=2)).isoformat()
    assert as_dict["metadata"] == {"temperature": 0.0}


@pytest.mark.parametrize("limit", [0, 10001, -1, True, 1.5, "10", None])
def test_limit_bounds(dsn: str, limit: Any) -> None:
    async def body(s: PostgresStorage) -> None:
        for call in (
            lambda: s.get_toolkit_traces("exec_123", limit=limit),
            lambda: s.get_tool_invocation_traces("exec_123", limit=limit),
            lambda: s.get_lm_traces("exec_123", limit=limit),
            lambda: s.list_executions(limit=limit),
        ):
            with pytest.raises(ValueError, match="limit"):
                await call()

    with_storage(dsn, body)


def test_limit_edges_are_accepted(dsn: str) -> None:
    async def body(s: PostgresStorage) -> list[int]:
        return [
            len(await s.get_tool_invocation_traces("exec_123", limit=1)),
            len(await s.get_tool_invocation_traces("exec_123", limit=10000)),
            len(await s.get_toolkit_traces("exec_123", limit=10000)),
            len(await s.get_lm_traces("exec_123", limit=1)),
        ]

    assert with_storage(dsn, body) == [1, 11, 9, 1]


def test_bad_arguments(dsn: str) -> None:
    async def body(s: PostgresStorage) -> None:
        with pytest.raises(ValueError, match="offset"):
            await s.list_executions(offset=-1)
        with pytest.raises(ValueError, match="days"):
            await s.delete_executions_older_than(-1)
        with pytest.raises(ValueError, match="days"):
            await s.delete_executions_older_than(float("nan"))
        with pytest.raises(TypeError, match="execution_id"):
            await s.get_execution(123)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="tool_name"):
            await s.get_tool_invocation_traces("exec_123", tool_name=1)  # type: ignore[arg-type]

    with_storage(dsn, body)


INJECTIONS = [
    "x' OR '1'='1",
    "'; DROP TABLE tool_invocation_traces; --",
    "exec_123' --",
    "exec_123'; DELETE FROM executions; --",
    "%s",
    "exec_%",
    "\\",
]


@pytest.mark.parametrize("evil", INJECTIONS)
def test_sql_injection_in_every_filter(dsn: str, evil: str) -> None:
    before = row_counts(dsn)

    async def body(s: PostgresStorage) -> None:
        assert await s.get_execution(evil) is None
        assert await s.list_executions(status=evil) == []
        assert await s.get_toolkit_traces(evil) == []
        assert await s.get_toolkit_traces("exec_123", operation=evil) == []
        assert await s.get_toolkit_traces("exec_123", toolkit_class=evil) == []
        assert await s.get_tool_invocation_traces(evil) == []
        assert await s.get_tool_invocation_traces("exec_123", toolkit_class=evil) == []
        assert await s.get_tool_invocation_traces("exec_123", tool_name=evil) == []
        assert await s.get_tool_invocation_traces(evil, toolkit_class=evil, tool_name=evil) == []
        assert await s.get_lm_traces(evil) == []
        assert await s.get_lm_traces("exec_123", module=evil) == []
        summary = await s.get_toolkit_metrics_summary(evil)
        assert summary["execution_id"] == evil
        assert summary["tool_invocations"]["total_calls"] == 0 and summary["by_tool"] == {}
        costs = await s.get_execution_costs(evil)
        assert (costs["calls"], costs["total_cost"], costs["by_module"]) == (0, 0.0, {})

    with_storage(dsn, body)
    assert existing_tables(dsn) == list(TABLES)
    assert row_counts(dsn) == before
    # And the real rows still read back whole.
    assert len(with_storage(dsn, lambda s: s.get_tool_invocation_traces("exec_other"))) == 2


# --- retention ----------------------------------------------------------------------------------------
def test_delete_executions_older_than_cascades(dsn: str) -> None:
    before = row_counts(dsn)
    assert {table for table, execution_id in before if execution_id == "exec_old"} == set(TABLES)

    async def body(s: PostgresStorage) -> tuple[int, int, Any, list[str]]:
        deleted = await s.delete_executions_older_than(30)
        again = await s.delete_executions_older_than(30)
        return deleted, again, await s.get_execution("exec_old"), [e.execution_id for e in await s.list_executions()]

    deleted, again, old, remaining = with_storage(dsn, body)
    assert (deleted, again, old) == (1, 0, None)
    assert remaining == ["exec_123", "exec_other", "exec_failed"]
    after = row_counts(dsn)
    assert {key: n for key, n in before.items() if key[1] != "exec_old"} == after

    # Fractional days: 1.5 days reaches exec_failed (2 days old) and nothing newer.
    assert with_storage(dsn, lambda s: s.delete_executions_older_than(1.5)) == 1
    assert with_storage(dsn, lambda s: s.delete_executions_older_than(0.5 / 24)) == 1  # exec_other, 1 hour old
    assert [e.execution_id for e in with_storage(dsn, lambda s: s.list_executions())] == ["exec_123"]


# --- lifecycle and configuration ----------------------------------------------------------------------
def test_missing_schema_is_a_clear_error(pg_dsn: str) -> None:
    storage = PostgresStorage(pg_dsn)
    with pytest.raises(SchemaMissingError) as info:
        asyncio.run(storage.initialize())
    message = str(info.value)
    assert "executions, lm_traces, toolkit_traces, tool_invocation_traces" in message
    assert "roma-otel db upgrade" in message and "alembic upgrade head" in message


def test_partial_schema_names_the_missing_tables(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE executions (execution_id VARCHAR(64) PRIMARY KEY)")
    with pytest.raises(SchemaMissingError, match=r"database: lm_traces, toolkit_traces, tool_invocation_traces\."):
        with_storage(pg_dsn, lambda s: s.get_execution("exec_123"))
    # Once the schema is complete the same storage configuration works.
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE executions")
    create_schema(pg_dsn)
    assert with_storage(pg_dsn, lambda s: s.list_executions()) == []


def test_unreachable_server_fails_fast_with_the_cause() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port now, so the connection is refused, and the error says so.
    with pytest.raises(StorageUnavailableError, match=r"(?i)refused"):
        with_storage(f"postgresql://roma@127.0.0.1:{port}/postgres?connect_timeout=5", lambda s: s.list_executions())


def test_queries_need_initialize(dsn: str) -> None:
    storage = PostgresStorage(dsn)
    with pytest.raises(RuntimeError, match="initialize"):
        asyncio.run(storage.get_execution("exec_123"))


def test_config_object_and_reuse_after_close(dsn: str) -> None:
    config = PostgresConfig(enabled=True, connection_url=dsn, pool_min_size=0, pool_max_size=2)

    async def main() -> list[Any]:
        storage = PostgresStorage(config)
        await storage.initialize()
        await storage.initialize()  # idempotent
        # More concurrent queries than connections: the pool queues them.
        first = await asyncio.gather(*(storage.get_toolkit_metrics_summary("exec_123") for _ in range(12)))
        await storage.close()
        await storage.close()  # idempotent
        await storage.initialize()
        again = await storage.get_execution("exec_123")
        await storage.close()
        return [first, again]

    summaries, record = asyncio.run(main())
    assert all(s == summaries[0] for s in summaries) and summaries[0]["tool_invocations"]["total_calls"] == 11
    assert record is not None and record.execution_id == "exec_123"


async def drop_the_pool_by_an_outage(storage: PostgresStorage, server: PostgresServer) -> None:
    """Stop the server until a query has found it gone (dropping the pool), then start it again."""
    server.halt()
    with pytest.raises(StorageUnavailableError):
        await storage.list_executions()
    assert storage._pool is None
    server.resume()


def test_server_outage_fails_with_the_cause_then_recovers_without_initialize() -> None:
    with own_migrated_server() as server:

        async def main() -> None:
            storage = PostgresStorage(server.dsn, wait_timeout=2)
            await storage.initialize()
            assert await storage.list_executions() == []
            server.halt()
            # The pool's connection is gone; a direct connection finds the server gone too, and says why.
            with pytest.raises(StorageUnavailableError, match=r"(?i)refused"):
                await storage.list_executions()
            # The pool was dropped: the next query connects directly, fails at once, and names the cause.
            with pytest.raises(StorageUnavailableError, match=r"(?i)refused"):
                await storage.get_execution("exec_1")
            server.resume()
            # Back: the very next query works, with no initialize() from the caller.
            assert await storage.list_executions() == []
            await storage.close()
            with pytest.raises(RuntimeError, match="initialize"):
                await storage.list_executions()  # closed on purpose: not silently reopened

        asyncio.run(main())


def test_close_during_a_reconnect_leaves_nothing_open() -> None:
    with own_migrated_server() as server:

        async def main() -> list[Any]:
            storage = PostgresStorage(server.dsn, wait_timeout=2)
            await storage.initialize()
            await drop_the_pool_by_an_outage(storage, server)
            # A query reconnecting, close() called meanwhile, and a query queued behind close().
            first = asyncio.create_task(storage.list_executions())
            while not storage._lock.locked():
                await asyncio.sleep(0)
            closing = asyncio.create_task(storage.close())
            await asyncio.sleep(0)
            last = asyncio.create_task(storage.list_executions())
            results = await asyncio.gather(first, closing, last, return_exceptions=True)
            assert storage._pool is None
            return results

        first, _, last = asyncio.run(main())
        assert first == [] or isinstance(first, StorageUnavailableError), first
        assert isinstance(last, StorageUnavailableError) and "closed" in str(last), last
        assert other_sessions(server.dsn) == 0


async def busy_storage(dsn: str) -> tuple[PostgresStorage, asyncio.Task[Any]]:
    """A storage with one pooled connection, held by a 1.5 s query (the task), and a 0.3 s wait for it."""
    storage = PostgresStorage(
        PostgresConfig(connection_url=dsn, pool_min_size=1, pool_max_size=1), wait_timeout=0.3
    )
    await storage.initialize()
    slow = asyncio.create_task(storage._fetch("SELECT pg_sleep(1.5)", []))
    await asyncio.sleep(0.2)  # the query has the connection
    return storage, slow


def test_a_busy_pool_is_kept() -> None:
    with own_migrated_server() as server:

        async def main() -> None:
            storage, slow = await busy_storage(server.dsn)
            pool = storage._pool
            with pytest.raises(StorageUnavailableError, match="couldn't get a connection"):
                await storage.list_executions()
            assert await slow == [{"pg_sleep": ""}]
            # The server was there all along: the pool is the same, and serves the next query.
            assert storage._pool is pool
            assert await storage.list_executions() == []
            await storage.close()

        asyncio.run(main())


def test_a_server_refusing_more_connections_keeps_the_pool() -> None:
    with own_migrated_server() as server:
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            conn.execute("CREATE ROLE reader LOGIN CONNECTION LIMIT 1")
            conn.execute("GRANT SELECT ON ALL TABLES IN SCHEMA public TO reader")
        reader = server.dsn.replace("postgresql://roma@", "postgresql://reader@")

        async def main() -> None:
            storage, slow = await busy_storage(reader)
            pool = storage._pool
            # The probe is refused by the server itself (the role's limit): the server is there.
            with pytest.raises(StorageUnavailableError, match="too many connections"):
                await storage.list_executions()
            assert storage._pool is pool
            assert await slow == [{"pg_sleep": ""}]
            assert await storage.list_executions() == []
            await storage.close()

        asyncio.run(main())


def test_queries_timing_out_together_share_one_probe() -> None:
    with own_migrated_server() as server:

        async def main() -> int:
            storage, slow = await busy_storage(server.dsn)
            waiting = await asyncio.gather(*(storage.list_executions() for _ in range(6)), return_exceptions=True)
            assert all(isinstance(w, StorageUnavailableError) for w in waiting), waiting
            await slow
            await storage.close()
            return storage._probes

        # They time out together; the first probes, the others take its answer (at most a straggler
        # arriving after it finished probes again).
        assert asyncio.run(main()) <= 2


def test_tables_dropped_under_a_running_storage_say_so() -> None:
    with own_migrated_server() as server:

        async def main() -> None:
            storage = PostgresStorage(server.dsn)
            await storage.initialize()
            with psycopg.connect(server.dsn, autocommit=True) as conn:
                conn.execute("ALTER TABLE tool_invocation_traces RENAME TO moved_away")
            with pytest.raises(SchemaMissingError, match="roma-otel db upgrade"):
                await storage.get_tool_invocation_traces("exec_1")
            with psycopg.connect(server.dsn, autocommit=True) as conn:
                conn.execute("ALTER TABLE moved_away RENAME TO tool_invocation_traces")
            assert await storage.get_tool_invocation_traces("exec_1") == []
            await storage.close()

        asyncio.run(main())


def test_a_reconnect_is_bounded_when_the_server_hangs() -> None:
    with own_migrated_server() as server:

        async def main() -> None:
            storage = PostgresStorage(server.dsn, wait_timeout=1)
            await storage.initialize()
            await drop_the_pool_by_an_outage(storage, server)
            hung = int((server.data / "postmaster.pid").read_text().split()[0])
            os.kill(hung, signal.SIGSTOP)  # accepts connections (the kernel does) and never answers
            try:
                # The outer wait_for only keeps a regression from hanging the suite.
                with pytest.raises(StorageUnavailableError, match="did not answer in time"):
                    await asyncio.wait_for(storage.list_executions(), 60)
            finally:
                os.kill(hung, signal.SIGCONT)
            assert await storage.list_executions() == []
            await storage.close()

        asyncio.run(main())


@contextmanager
def frozen(server: PostgresServer) -> Iterator[None]:
    """Every server process stopped (connections stay open; nothing answers) until the block ends."""
    pids = server.processes()

    def signal_all(sig: signal.Signals) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # a backend that has just exited
                os.kill(pid, sig)

    signal_all(signal.SIGSTOP)
    try:
        yield
    finally:
        signal_all(signal.SIGCONT)


def test_query_timeout_bounds_a_query_on_a_frozen_server() -> None:
    with own_migrated_server() as server:

        async def main() -> None:
            storage = PostgresStorage(server.dsn, wait_timeout=1, query_timeout=1)
            await storage.initialize()
            assert await storage.list_executions() == []
            # The outer wait_for only keeps a regression from hanging the suite.
            with frozen(server), pytest.raises(StorageUnavailableError, match="did not answer in time"):
                await asyncio.wait_for(storage.list_executions(), 120)
            assert await storage.list_executions() == []
            await storage.close()

        asyncio.run(main())


def test_ping_on_a_frozen_server_probes_within_its_budget_and_drops_the_pool() -> None:
    with own_migrated_server() as server:

        async def main() -> None:
            storage = PostgresStorage(server.dsn)
            await storage.ping(5)
            with frozen(server):
                with pytest.raises(StorageUnavailableError, match="did not answer in time"):
                    await asyncio.wait_for(storage.ping(5), 60)  # the outer bound only guards the suite
                # The probe ran to its end within ping's budget: nothing answered, so the pool is gone.
                assert storage._pool is None
            await storage.ping(5)
            await storage.close()

        asyncio.run(main())


def test_a_ping_given_up_by_its_caller_stops_its_check() -> None:
    with own_migrated_server() as server:

        async def main() -> None:
            storage = PostgresStorage(server.dsn, wait_timeout=3, query_timeout=2)
            await storage.ping(5)
            with frozen(server):
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(storage.ping(10), 0.5)
                # The check ping started is being cancelled with it, not left to probe on its own later.
                checks = [t for t in asyncio.all_tasks() if "ping.<locals>.check" in repr(t.get_coro())]
                assert checks and all(t.done() or t.cancelling() for t in checks), checks
            await storage.ping(5)
            await storage.close()

        asyncio.run(main())


def test_only_a_lack_of_connection_slots_keeps_the_pool() -> None:
    from roma_otel.storage.postgres import _out_of_slots

    def refused(text: str) -> psycopg.OperationalError:
        return psycopg.OperationalError(f'connection failed: connection to server at "127.0.0.1" failed: {text}')

    assert _out_of_slots(refused('FATAL:  too many connections for role "reader"'))
    assert _out_of_slots(refused("FATAL:  sorry, too many clients already"))
    assert _out_of_slots(refused("FATAL:  remaining connection slots are reserved for roles with SUPERUSER"))
    for gone in (
        "FATAL:  the database system is starting up",
        "FATAL:  the database system is shutting down",
        "FATAL:  the database system is in recovery mode",
        "Connection refused",
        "fe_sendauth: no password supplied",
    ):
        assert not _out_of_slots(refused(gone)), gone
    assert not _out_of_slots(TimeoutError())


def test_text_a_latin1_database_cannot_hold_matches_nothing() -> None:
    with own_migrated_server() as server:
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            conn.execute("CREATE DATABASE latin ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
        latin = server.dsn.rsplit("/", 1)[0] + "/latin"
        upgrade(latin)

        async def main() -> None:
            async with PostgresStorage(latin) as storage:
                assert await storage.get_execution("日本") is None
                assert await storage.list_executions(status="€") == []
                assert await storage.get_tool_invocation_traces("exec_1", toolkit_class="€") == []
                assert await storage.get_lm_traces("日本") == []
                costs = await storage.get_execution_costs("日本")
                assert costs["execution_id"] == "日本" and costs["total_cost"] == 0
                summary = await storage.get_toolkit_metrics_summary("日本")
                assert summary["tool_invocations"]["total_calls"] == 0 and summary["by_tool"] == {}
                assert await storage.list_executions(status="café") == []  # LATIN1 holds é: a real query
                assert await storage.get_execution("exec\x00_1") is None  # no text holds a NUL

        asyncio.run(main())


def test_ping_finds_a_lost_server_and_names_the_cause() -> None:
    with own_migrated_server() as server:

        async def main() -> None:
            storage = PostgresStorage(server.dsn)  # the pool would wait 30 s; ping gives up after 2
            await storage.ping(2)
            server.halt()
            with pytest.raises(StorageUnavailableError, match=r"(?i)refused"):
                await storage.ping(2)
            assert storage._pool is None  # dropped: later pings and queries fail at once
            server.resume()
            await storage.ping(2)
            await storage.close()

        asyncio.run(main())


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="connection_url"):
        PostgresStorage(PostgresConfig())
    with pytest.raises(ValueError, match="pool_max_size"):
        PostgresStorage(PostgresConfig(connection_url="postgresql://x@127.0.0.1/db", pool_min_size=0, pool_max_size=0))
    with pytest.raises(TypeError, match="PostgresConfig"):
        PostgresStorage(42)  # type: ignore[arg-type]


def test_ping_answers_or_says_why(dsn: str) -> None:
    asyncio.run(PostgresStorage(dsn).ping(5))  # schema present, server up: no exception
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(StorageUnavailableError):
        asyncio.run(PostgresStorage(f"postgresql://roma@127.0.0.1:{port}/postgres?connect_timeout=2").ping(5))
