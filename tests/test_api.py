"""The REST API over real HTTP (uvicorn on a loopback port) against a real PostgreSQL migrated with Alembic.

Rows are inserted with SQL; every expected number below is computed by hand from those rows.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import psycopg
import pytest
import uvicorn
from fastapi import FastAPI
from psycopg.types.json import Jsonb

from roma_otel.api import create_app
from roma_otel.cli import build_parser, main
from roma_otel.storage.migrate import upgrade
from roma_otel.storage.postgres import PostgresStorage
from tests.pgserver import other_sessions, own_migrated_server

ROOT = Path(__file__).resolve().parent.parent
T0 = datetime(2025, 3, 14, 9, 0, tzinfo=UTC)
TABLES = ("executions", "lm_traces", "toolkit_traces", "tool_invocation_traces")
TOKEN = "s3cret-Token_with.chars~42"

# --- data -------------------------------------------------------------------------------------------
# (execution_id, created_at, status, task, totals)
EXECUTIONS = [
    ("exec_a", T0, "completed", "Plan a Barcelona weekend"),
    ("exec_b", T0 + timedelta(hours=1), "running", "Compare museum passes"),
    ("exec_c", T0 - timedelta(hours=1), "failed", None),
]
# exec_a's lifecycle: (operation, toolkit_class, duration_ms, success, error)
LIFECYCLE_A = [
    ("create", "SerperToolkit", 12.5, True, None),
    ("cache_miss", "SerperToolkit", 0.5, True, None),
    ("cache_hit", "SerperToolkit", 0.25, True, None),
    ("cache_hit", "SerperToolkit", 0.25, True, None),
    ("cache_hit", "FileToolkit", 0.5, True, None),
    ("create", "FileToolkit", 8.0, True, None),
    ("create", "BrokenToolkit", 3.0, False, "ImportError: no module named broken"),
    ("cleanup", "SerperToolkit", 1.0, True, None),
]
LIFECYCLE_B = [("create", "SerperToolkit", 99.0, True, None), ("cache_miss", "SerperToolkit", 1.0, True, None)]
# exec_a's tool calls: (toolkit_class, tool_name, duration_ms, success, error)
CALLS_A = [
    ("SerperToolkit", "search_web", 100.0, True, None),
    ("FileToolkit", "read_file", 10.0, True, None),
    ("SerperToolkit", "search_web", 150.0, True, None),
    ("SerperToolkit", "scrape_url", 50.0, True, None),
    ("FileToolkit", "read_file", 20.0, False, "FileNotFoundError: notes.md"),
    ("SerperToolkit", "search_web", 200.0, True, None),
    ("SerperToolkit", "search_web", 250.0, False, "TimeoutError: search timed out"),
    ("FileToolkit", "read_file", 30.0, True, None),
]
CALLS_B = [("SerperToolkit", "search_web", 999.0, True, None)]
# exec_a's LM calls: (module, model, prompt, completion, total, cost_usd or None, latency_ms)
LM_A = [
    ("planner", "openai/gpt-4o-mini", 100, 50, 150, "0.001", 200.0),
    ("executor", "openai/gpt-4o-mini", 200, 100, 300, "0.002", 400.0),
    ("executor", "anthropic/claude-3-haiku", 300, 100, 400, None, 600.0),
]
LM_B = [("atomizer", "openai/gpt-4o", 10, 10, 20, "0.5", 5.0)]

INJECTIONS = [
    "' OR '1'='1",
    "' OR 1=1 --",
    "'; DROP TABLE tool_invocation_traces; --",
    "exec_a' --",
    "exec_a' UNION SELECT * FROM executions --",
    '" OR ""="',
    "%' OR execution_id LIKE '%",
    "SerperToolkit' OR toolkit_class IS NOT NULL --",
    "1; DELETE FROM executions",
    "\\'; TRUNCATE executions CASCADE; --",
    "search_web\x00' OR '1'='1",
    "%",
    "_",
    "*",
]


@dataclass
class Seeded:
    dsn: str
    toolkit_ids: dict[str, list[int]] = field(default_factory=dict)
    call_ids: dict[str, list[int]] = field(default_factory=dict)
    lm_ids: dict[str, list[int]] = field(default_factory=dict)


def _returning_ids(cur: psycopg.Cursor[Any], query: str, rows: list[tuple[Any, ...]]) -> list[int]:
    ids = []
    for row in rows:
        cur.execute(query, row)
        fetched = cur.fetchone()
        assert fetched is not None
        ids.append(fetched[0])
    return ids


def populate(dsn: str) -> Seeded:
    seeded = Seeded(dsn)
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        for execution_id, created, status, task in EXECUTIONS:
            cur.execute(
                "INSERT INTO executions (execution_id, created_at, updated_at, status, task, max_depth, solver_type,"
                " config, total_tasks, completed_tasks, failed_tasks, total_cost, total_tokens, execution_duration,"
                " max_depth_reached, metadata) VALUES (%s, %s, %s, %s, %s, 2, 'RecursiveSolver', %s, 5, 4, 1,"
                " 0.0123, 1500, 12.5, 2, %s)",
                [
                    execution_id,
                    created,
                    created + timedelta(seconds=30),
                    status,
                    task,
                    Jsonb({"profile": "high_quality"}),
                    Jsonb({"env": "test"}),
                ],
            )
        lifecycle_sql = (
            "INSERT INTO toolkit_traces (execution_id, timestamp, operation, toolkit_class, duration_ms, success,"
            " error, metadata) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING trace_id"
        )
        calls_sql = (
            "INSERT INTO tool_invocation_traces (execution_id, toolkit_class, tool_name, invoked_at, duration_ms,"
            " input_size_bytes, output_size_bytes, success, error, metadata)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING trace_id"
        )
        lm_sql = (
            "INSERT INTO lm_traces (execution_id, otel_trace_id, span_id, module_name, model, created_at,"
            " prompt_tokens, completion_tokens, total_tokens, cost_usd, latency_ms, metadata)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s::numeric, %s, %s) RETURNING trace_id"
        )
        for execution_id, lifecycle, calls, lm in (
            ("exec_a", LIFECYCLE_A, CALLS_A, LM_A),
            ("exec_b", LIFECYCLE_B, CALLS_B, LM_B),
        ):
            seeded.toolkit_ids[execution_id] = _returning_ids(
                cur,
                lifecycle_sql,
                [
                    (execution_id, T0 + timedelta(seconds=i), op, cls, ms, ok, err, Jsonb({"seq": i}))
                    for i, (op, cls, ms, ok, err) in enumerate(lifecycle)
                ],
            )
            seeded.call_ids[execution_id] = _returning_ids(
                cur,
                calls_sql,
                [
                    (
                        execution_id,
                        cls,
                        tool,
                        T0 + timedelta(seconds=i),
                        ms,
                        10 * (i + 1),
                        100 * (i + 1),
                        ok,
                        err,
                        Jsonb({"seq": i}),
                    )
                    for i, (cls, tool, ms, ok, err) in enumerate(calls)
                ],
            )
            seeded.lm_ids[execution_id] = _returning_ids(
                cur,
                lm_sql,
                [
                    (
                        execution_id,
                        execution_id.ljust(32, "0"),
                        f"{i + 1:016x}",
                        module,
                        model,
                        T0 + timedelta(seconds=i),
                        pt,
                        ct,
                        tt,
                        cost,
                        latency,
                        Jsonb({}),
                    )
                    for i, (module, model, pt, ct, tt, cost, latency) in enumerate(lm)
                ],
            )
    return seeded


def row_counts(dsn: str) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    with psycopg.connect(dsn) as conn:
        for table in TABLES:
            for execution_id, n in conn.execute(f"SELECT execution_id, count(*) FROM {table} GROUP BY 1"):
                counts[(table, execution_id)] = n
    return counts


# --- serving ----------------------------------------------------------------------------------------
@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Run ``app`` under uvicorn in a background thread on a free loopback port; yield its base URL.

    A port found free can be taken before uvicorn binds it; uvicorn then exits at startup and another is tried.
    """
    for _attempt in range(5):
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started and thread.is_alive():
            assert time.monotonic() < deadline, "uvicorn did not start within 30s"
            time.sleep(0.02)
        if server.started:
            break
        thread.join()
    else:
        pytest.fail("uvicorn could not bind a loopback port")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive(), "uvicorn did not stop"


@contextmanager
def client_for(app: FastAPI, **kwargs: Any) -> Iterator[httpx.Client]:
    with serve(app) as base, httpx.Client(base_url=base, timeout=30, **kwargs) as client:
        yield client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def seeded(pg_dsn: str) -> Seeded:
    upgrade(pg_dsn)
    return populate(pg_dsn)


@pytest.fixture
def api(seeded: Seeded) -> Iterator[httpx.Client]:
    with client_for(create_app(seeded.dsn)) as client:
        yield client


def get_json(client: httpx.Client, path: str, params: dict[str, Any] | None = None, status: int = 200) -> Any:
    response = client.get(path, params=params)
    assert response.status_code == status, (path, params, response.status_code, response.text)
    return response.json()


def ts(value: str) -> datetime:
    return datetime.fromisoformat(value)


# --- health -----------------------------------------------------------------------------------------
def healthy(body: dict[str, Any]) -> bool:
    """A /health answer's database part says ok (the OTLP receiver's counts beside it vary)."""
    return {k: v for k, v in body.items() if k != "otlp"} == {"status": "ok", "database": "ok"}


def test_health_ok(api: httpx.Client) -> None:
    response = api.get("/health")
    assert response.status_code == 200
    idle = {"accepted_spans": 0, "rejected_spans": 0, "in_flight_spans": 0}
    assert response.json() == {"status": "ok", "database": "ok", "otlp": idle}


def test_health_503_when_database_unreachable() -> None:
    dsn = f"postgresql://roma@127.0.0.1:{free_port()}/nowhere?connect_timeout=5"
    with client_for(create_app(dsn)) as client:
        response = client.get("/health")
        assert response.status_code == 503
        body = response.json()
        assert body["status"] == "error"
        assert "127.0.0.1" in body["database"] or "refused" in body["database"].lower(), body
        response = client.get("/executions")
        assert response.status_code == 503
        assert response.json()["detail"].startswith("database unavailable: ")


def test_health_503_when_schema_missing_then_recovers(pg_dsn: str) -> None:
    with client_for(create_app(pg_dsn)) as client:
        response = client.get("/health")
        assert response.status_code == 503
        assert "roma-otel db upgrade" in response.json()["database"]
        assert client.get("/executions/exec_a").status_code == 503
        # Once the schema exists the same running app connects on the next request.
        upgrade(pg_dsn)
        populate(pg_dsn)
        assert healthy(client.get("/health").json())
        assert get_json(client, "/executions/exec_a")["execution_id"] == "exec_a"


def test_database_outage_answers_503_with_the_cause_then_recovers() -> None:
    with own_migrated_server() as server:
        populate(server.dsn)
        with client_for(create_app(server.dsn)) as client:
            assert get_json(client, "/executions")["count"] == 3
            server.halt()
            assert client.get("/executions").status_code == 503  # the pool finds its connection gone
            # Later requests connect directly, and say why, instead of waiting on the pool's backoff.
            for path in ("/executions/exec_a", "/executions/exec_a/tool-invocations"):
                response = client.get(path)
                assert response.status_code == 503
                assert "refused" in response.json()["detail"].lower(), response.text
            health = client.get("/health")
            assert health.status_code == 503 and "refused" in health.json()["database"].lower(), health.text
            server.resume()
            # The first request after the server is back already succeeds.
            assert healthy(get_json(client, "/health"))
            assert get_json(client, "/executions/exec_a/tool-invocations")["count"] == len(CALLS_A)


def test_lifespan_closes_given_storage(seeded: Seeded) -> None:
    storage = PostgresStorage(seeded.dsn)
    with client_for(create_app(storage)) as client:
        assert get_json(client, "/executions")["count"] == 3
    assert other_sessions(seeded.dsn) == 0, "the pool's connections outlived the app"


# --- executions -------------------------------------------------------------------------------------
def test_list_executions_newest_first_with_paging_and_status(api: httpx.Client) -> None:
    body = get_json(api, "/executions")
    assert body["count"] == 3
    assert [e["execution_id"] for e in body["executions"]] == ["exec_b", "exec_a", "exec_c"]
    assert [e["execution_id"] for e in get_json(api, "/executions", {"limit": 1})["executions"]] == ["exec_b"]
    page = get_json(api, "/executions", {"limit": 2, "offset": 1})
    assert page["count"] == 2
    assert [e["execution_id"] for e in page["executions"]] == ["exec_a", "exec_c"]
    assert get_json(api, "/executions", {"offset": 3}) == {"count": 0, "executions": []}
    completed = get_json(api, "/executions", {"status": "completed"})
    assert [e["execution_id"] for e in completed["executions"]] == ["exec_a"]
    assert get_json(api, "/executions", {"status": "unknown"}) == {"count": 0, "executions": []}
    assert get_json(api, "/executions", {"limit": 1000})["count"] == 3


def test_get_execution(api: httpx.Client) -> None:
    body = get_json(api, "/executions/exec_a")
    assert ts(body.pop("created_at")) == T0
    assert ts(body.pop("updated_at")) == T0 + timedelta(seconds=30)
    assert body == {
        "execution_id": "exec_a",
        "status": "completed",
        "task": "Plan a Barcelona weekend",
        "max_depth": 2,
        "solver_type": "RecursiveSolver",
        "config_version": None,
        "config": {"profile": "high_quality"},
        "total_tasks": 5,
        "completed_tasks": 4,
        "failed_tasks": 1,
        "total_cost": 0.0123,
        "total_tokens": 1500,
        "execution_duration": 12.5,
        "max_depth_reached": 2,
        "otel_trace_id": None,
        "metadata": {"env": "test"},
        "dag_snapshot": None,
    }


# --- toolkit metrics --------------------------------------------------------------------------------
SEED_KEYS = {
    "": {"execution_id", "toolkit_lifecycle", "tool_invocations", "by_toolkit", "by_tool"},
    "toolkit_lifecycle": {"total_created", "cache_hit_rate"},
    "tool_invocations": {
        "total_calls",
        "successful_calls",
        "failed_calls",
        "success_rate",
        "avg_duration_ms",
        "total_duration_ms",
    },
    "by_toolkit": {"calls", "successful", "failed", "avg_duration_ms"},
    "by_tool": {"calls", "successful", "avg_duration_ms"},
}


def assert_seed_shape(body: dict[str, Any]) -> None:
    assert set(body) == SEED_KEYS[""]
    assert set(body["toolkit_lifecycle"]) == SEED_KEYS["toolkit_lifecycle"]
    assert set(body["tool_invocations"]) == SEED_KEYS["tool_invocations"]
    for group in body["by_toolkit"].values():
        assert set(group) == SEED_KEYS["by_toolkit"]
    for group in body["by_tool"].values():
        assert set(group) == SEED_KEYS["by_tool"]


def test_toolkit_metrics_seed_shape_and_values(api: httpx.Client) -> None:
    body = get_json(api, "/executions/exec_a/toolkit-metrics")
    assert_seed_shape(body)
    # 2 successful creates (BrokenToolkit's failed); 3 hits / (3 hits + 1 miss).
    # Calls: search_web 100,150,200,250(failed); scrape_url 50; read_file 10,20(failed),30 -> 810 ms over 8.
    assert body == {
        "execution_id": "exec_a",
        "toolkit_lifecycle": {"total_created": 2, "cache_hit_rate": 0.75},
        "tool_invocations": {
            "total_calls": 8,
            "successful_calls": 6,
            "failed_calls": 2,
            "success_rate": 0.75,
            "avg_duration_ms": 101.25,
            "total_duration_ms": 810.0,
        },
        "by_toolkit": {
            "SerperToolkit": {"calls": 5, "successful": 4, "failed": 1, "avg_duration_ms": 150.0},
            "FileToolkit": {"calls": 3, "successful": 2, "failed": 1, "avg_duration_ms": 20.0},
        },
        "by_tool": {
            "SerperToolkit.search_web": {"calls": 4, "successful": 3, "avg_duration_ms": 175.0},
            "SerperToolkit.scrape_url": {"calls": 1, "successful": 1, "avg_duration_ms": 50.0},
            "FileToolkit.read_file": {"calls": 3, "successful": 2, "avg_duration_ms": 20.0},
        },
    }


def test_toolkit_metrics_of_other_and_empty_execution(api: httpx.Client) -> None:
    body = get_json(api, "/executions/exec_b/toolkit-metrics")
    assert_seed_shape(body)
    assert body["toolkit_lifecycle"] == {"total_created": 1, "cache_hit_rate": 0.0}
    assert body["tool_invocations"]["total_calls"] == 1
    assert body["tool_invocations"]["total_duration_ms"] == 999.0
    assert list(body["by_tool"]) == ["SerperToolkit.search_web"]
    empty = get_json(api, "/executions/exec_c/toolkit-metrics")
    assert_seed_shape(empty)
    assert empty == {
        "execution_id": "exec_c",
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


# --- toolkit traces ---------------------------------------------------------------------------------
def test_toolkit_traces_shape_and_order(api: httpx.Client, seeded: Seeded) -> None:
    body = get_json(api, "/executions/exec_a/toolkit-traces")
    assert set(body) == {"execution_id", "count", "traces"}
    assert body["execution_id"] == "exec_a"
    assert body["count"] == len(LIFECYCLE_A) == len(body["traces"])
    ids = seeded.toolkit_ids["exec_a"]
    assert [t["trace_id"] for t in body["traces"]] == ids
    broken = dict(body["traces"][6])
    assert ts(broken.pop("timestamp")) == T0 + timedelta(seconds=6)
    assert broken == {
        "trace_id": ids[6],
        "operation": "create",
        "toolkit_class": "BrokenToolkit",
        "duration_ms": 3.0,
        "success": False,
        "error": "ImportError: no module named broken",
        "metadata": {"seq": 6},
    }
    for trace in body["traces"]:
        assert set(trace) == {
            "trace_id",
            "timestamp",
            "operation",
            "toolkit_class",
            "duration_ms",
            "success",
            "error",
            "metadata",
        }


def test_toolkit_traces_filters_and_limit(api: httpx.Client, seeded: Seeded) -> None:
    ids = seeded.toolkit_ids["exec_a"]
    path = "/executions/exec_a/toolkit-traces"
    creates = get_json(api, path, {"operation": "create"})
    assert creates["count"] == 3
    assert [t["toolkit_class"] for t in creates["traces"]] == ["SerperToolkit", "FileToolkit", "BrokenToolkit"]
    serper = get_json(api, path, {"toolkit_class": "SerperToolkit"})
    assert [t["trace_id"] for t in serper["traces"]] == [ids[0], ids[1], ids[2], ids[3], ids[7]]
    hits = get_json(api, path, {"operation": "cache_hit", "toolkit_class": "SerperToolkit"})
    assert [t["trace_id"] for t in hits["traces"]] == [ids[2], ids[3]]
    assert [t["operation"] for t in get_json(api, path, {"operation": "cleanup"})["traces"]] == ["cleanup"]
    assert get_json(api, path, {"operation": "cache_miss"})["count"] == 1
    limited = get_json(api, path, {"limit": 2})
    assert [t["trace_id"] for t in limited["traces"]] == ids[:2]
    assert get_json(api, path, {"limit": 10000})["count"] == 8
    assert get_json(api, path, {"toolkit_class": "NoSuchToolkit"}) == {
        "execution_id": "exec_a",
        "count": 0,
        "traces": [],
    }
    other = get_json(api, "/executions/exec_b/toolkit-traces")
    assert [t["trace_id"] for t in other["traces"]] == seeded.toolkit_ids["exec_b"]


# --- tool invocations -------------------------------------------------------------------------------
def test_tool_invocations_shape_and_values(api: httpx.Client, seeded: Seeded) -> None:
    body = get_json(api, "/executions/exec_a/tool-invocations")
    assert set(body) == {"execution_id", "count", "traces"}
    ids = seeded.call_ids["exec_a"]
    assert body["execution_id"] == "exec_a"
    assert body["count"] == 8
    assert [t["trace_id"] for t in body["traces"]] == ids
    failed = dict(body["traces"][6])
    assert ts(failed.pop("invoked_at")) == T0 + timedelta(seconds=6)
    assert failed == {
        "trace_id": ids[6],
        "toolkit_class": "SerperToolkit",
        "tool_name": "search_web",
        "duration_ms": 250.0,
        "input_size_bytes": 70,
        "output_size_bytes": 700,
        "success": False,
        "error": "TimeoutError: search timed out",
        "metadata": {"seq": 6},
    }
    for trace in body["traces"]:
        assert set(trace) == {
            "trace_id",
            "invoked_at",
            "toolkit_class",
            "tool_name",
            "duration_ms",
            "input_size_bytes",
            "output_size_bytes",
            "success",
            "error",
            "metadata",
        }
    assert [t["success"] for t in body["traces"]] == [c[3] for c in CALLS_A]


def test_tool_invocations_filters_and_limit(api: httpx.Client, seeded: Seeded) -> None:
    ids = seeded.call_ids["exec_a"]
    path = "/executions/exec_a/tool-invocations"
    serper = get_json(api, path, {"toolkit_class": "SerperToolkit"})
    assert [t["trace_id"] for t in serper["traces"]] == [ids[0], ids[2], ids[3], ids[5], ids[6]]
    search = get_json(api, path, {"tool_name": "search_web"})
    assert [t["duration_ms"] for t in search["traces"]] == [100.0, 150.0, 200.0, 250.0]
    both = get_json(api, path, {"toolkit_class": "SerperToolkit", "tool_name": "search_web"})
    assert both["count"] == 4
    assert get_json(api, path, {"toolkit_class": "FileToolkit", "tool_name": "search_web"})["count"] == 0
    files = get_json(api, path, {"toolkit_class": "FileToolkit"})
    assert [(t["tool_name"], t["success"]) for t in files["traces"]] == [
        ("read_file", True),
        ("read_file", False),
        ("read_file", True),
    ]
    assert [t["trace_id"] for t in get_json(api, path, {"limit": 3})["traces"]] == ids[:3]
    other = get_json(api, "/executions/exec_b/tool-invocations")
    assert [t["duration_ms"] for t in other["traces"]] == [999.0]


def test_empty_query_values_mean_not_given(api: httpx.Client, seeded: Seeded) -> None:
    # The endpoint templates as written (and forms with empty fields): no filter, the default limit.
    body = get_json(api, "/executions/exec_a/toolkit-traces?operation=&toolkit_class=&limit=")
    assert [t["trace_id"] for t in body["traces"]] == seeded.toolkit_ids["exec_a"]
    body = get_json(api, "/executions/exec_a/tool-invocations?toolkit_class=&tool_name=&limit=")
    assert [t["trace_id"] for t in body["traces"]] == seeded.call_ids["exec_a"]
    body = get_json(api, "/executions/exec_a/tool-invocations?toolkit_class=SerperToolkit&tool_name=")
    assert body["count"] == sum(1 for c in CALLS_A if c[0] == "SerperToolkit")
    assert get_json(api, "/executions?limit=&offset=&status=")["count"] == 3
    assert get_json(api, "/executions/exec_a/lm-traces?module=&limit=2")["count"] == 2
    # The values that are kept reach the filters byte for byte (UTF-8 percent escapes included).
    with psycopg.connect(seeded.dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO executions (execution_id, status) VALUES ('exec_é', 'terminé')")
    body = get_json(api, "/executions?status=termin%C3%A9&limit=")
    assert [e["execution_id"] for e in body["executions"]] == ["exec_é"]
    # A value that is present but wrong is still refused.
    assert api.get("/executions/exec_a/toolkit-traces?operation=delete&limit=").status_code == 422


# --- costs and LM traces ----------------------------------------------------------------------------
def test_costs(api: httpx.Client) -> None:
    body = get_json(api, "/executions/exec_a/costs")
    assert body == {
        "execution_id": "exec_a",
        "total_cost": 0.003,
        "total_tokens": 850,
        "prompt_tokens": 600,
        "completion_tokens": 250,
        "calls": 3,
        "unpriced_calls": 1,
        "by_module": {
            "executor": {"calls": 2, "tokens": 700, "cost": 0.002, "avg_latency_ms": 500.0},
            "planner": {"calls": 1, "tokens": 150, "cost": 0.001, "avg_latency_ms": 200.0},
        },
        "by_model": {
            "openai/gpt-4o-mini": {"calls": 2, "tokens": 450, "cost": 0.003, "avg_latency_ms": 300.0},
            "anthropic/claude-3-haiku": {"calls": 1, "tokens": 400, "cost": 0.0, "avg_latency_ms": 600.0},
        },
    }
    other = get_json(api, "/executions/exec_b/costs")
    assert (other["total_cost"], other["calls"], list(other["by_module"])) == (0.5, 1, ["atomizer"])
    empty = get_json(api, "/executions/exec_c/costs")
    assert (empty["execution_id"], empty["by_module"], empty["by_model"]) == ("exec_c", {}, {})


def test_lm_traces(api: httpx.Client, seeded: Seeded) -> None:
    ids = seeded.lm_ids["exec_a"]
    body = get_json(api, "/executions/exec_a/lm-traces")
    assert (body["execution_id"], body["count"]) == ("exec_a", 3)
    assert [t["trace_id"] for t in body["traces"]] == ids
    first = body["traces"][0]
    assert ts(first["created_at"]) == T0
    assert "execution_id" not in first
    assert (first["module_name"], first["model"], first["total_tokens"], first["cost_usd"], first["latency_ms"]) == (
        "planner",
        "openai/gpt-4o-mini",
        150,
        0.001,
        200.0,
    )
    assert body["traces"][2]["cost_usd"] is None
    executor = get_json(api, "/executions/exec_a/lm-traces", {"module": "executor"})
    assert [t["trace_id"] for t in executor["traces"]] == ids[1:]
    assert [t["trace_id"] for t in get_json(api, "/executions/exec_a/lm-traces", {"limit": 1})["traces"]] == ids[:1]
    assert get_json(api, "/executions/exec_a/lm-traces", {"module": "atomizer"})["count"] == 0


# --- errors -----------------------------------------------------------------------------------------
EXECUTION_PATHS = ["", "/toolkit-metrics", "/toolkit-traces", "/tool-invocations", "/costs", "/lm-traces"]


@pytest.mark.parametrize("suffix", EXECUTION_PATHS)
def test_unknown_execution_is_404(api: httpx.Client, suffix: str) -> None:
    response = api.get(f"/executions/nope{suffix}")
    assert response.status_code == 404
    assert response.json() == {"detail": "execution nope not found"}


BAD_PARAMETERS = [
    ("/executions", {"limit": 0}, "limit"),
    ("/executions", {"limit": 1001}, "limit"),
    ("/executions", {"limit": 100000}, "limit"),
    ("/executions", {"limit": "abc"}, "limit"),
    ("/executions", {"offset": -1}, "offset"),
    ("/executions", {"offset": "x"}, "offset"),
    ("/executions/exec_a/toolkit-traces", {"limit": 0}, "limit"),
    ("/executions/exec_a/toolkit-traces", {"limit": 100000}, "limit"),
    ("/executions/exec_a/toolkit-traces", {"limit": "abc"}, "limit"),
    ("/executions/exec_a/toolkit-traces", {"operation": "delete"}, "operation"),
    ("/executions/exec_a/toolkit-traces", {"operation": "CREATE"}, "operation"),
    ("/executions/exec_a/toolkit-traces", {"operation": "create' OR '1'='1"}, "operation"),
    ("/executions/exec_a/tool-invocations", {"limit": 10001}, "limit"),
    ("/executions/exec_a/tool-invocations", {"limit": "-5"}, "limit"),
    ("/executions/exec_a/lm-traces", {"limit": 0}, "limit"),
    ("/executions/exec_a/lm-traces", {"limit": "1.5"}, "limit"),
]


@pytest.mark.parametrize(("path", "params", "name"), BAD_PARAMETERS)
def test_bad_parameters_are_422_naming_the_parameter(
    api: httpx.Client, path: str, params: dict[str, Any], name: str
) -> None:
    response = api.get(path, params=params)
    assert response.status_code == 422, response.text
    body = response.json()
    assert f"'{name}'" in body["detail"], body
    assert [e["parameter"] for e in body["errors"]] == [name]


# --- authentication ---------------------------------------------------------------------------------
def test_bearer_token(seeded: Seeded) -> None:
    with client_for(create_app(seeded.dsn, token=TOKEN)) as client:
        assert healthy(client.get("/health").json())
        protected = [f"/executions/exec_a{s}" for s in EXECUTION_PATHS] + ["/executions", "/openapi.json", "/nope"]
        for path in protected:
            for headers in (
                {},
                {"Authorization": "Bearer wrong"},
                {"Authorization": f"Basic {TOKEN}"},
                {"Authorization": f"Bearer {TOKEN}x"},
                {"Authorization": "Bearer"},
                {"Authorization": f"Bearer {TOKEN[:-1]}"},
            ):
                response = client.get(path, headers=headers)
                assert response.status_code == 401, (path, headers)
                assert response.headers["WWW-Authenticate"].startswith("Bearer"), path
                assert "exec_a" not in response.text
        good = {"Authorization": f"Bearer {TOKEN}"}
        for path in [f"/executions/exec_a{s}" for s in EXECUTION_PATHS] + ["/executions"]:
            assert client.get(path, headers=good).status_code == 200, path
        assert client.get("/executions", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200
        # Authentication comes before validation: no parameter details leak without the token.
        assert client.get("/executions", params={"limit": 0}).status_code == 401
        assert client.get("/executions", params={"limit": 0}, headers=good).status_code == 422
        assert client.get("/executions/nope", headers=good).status_code == 404


def test_empty_token_is_refused(seeded: Seeded) -> None:
    with pytest.raises(ValueError, match="token"):
        create_app(seeded.dsn, token=" ")


# --- injection --------------------------------------------------------------------------------------
def test_sql_injection_strings_match_nothing(api: httpx.Client, seeded: Seeded) -> None:
    before = row_counts(seeded.dsn)
    filters = {
        "/executions": ["status"],
        "/executions/exec_a/toolkit-traces": ["toolkit_class"],
        "/executions/exec_a/tool-invocations": ["toolkit_class", "tool_name"],
        "/executions/exec_a/lm-traces": ["module"],
    }
    for text in INJECTIONS:
        for path, names in filters.items():
            for name in names:
                body = get_json(api, path, {name: text})
                assert body["count"] == 0, (path, name, text, body)
                assert body.get("traces", body.get("executions")) == []
        combined = get_json(
            api, "/executions/exec_a/tool-invocations", {"toolkit_class": "SerperToolkit", "tool_name": text}
        )
        assert combined["count"] == 0
        with_op = get_json(api, "/executions/exec_a/toolkit-traces", {"operation": "create", "toolkit_class": text})
        assert with_op["count"] == 0
        # In the path: never another execution's rows, never a server error.
        for suffix in EXECUTION_PATHS:
            response = api.get(f"/executions/{quote(text, safe='')}{suffix}")
            assert response.status_code == 404, (text, suffix, response.text)
            assert "exec_" not in response.text.replace(text, "")
    assert row_counts(seeded.dsn) == before
    assert healthy(get_json(api, "/health"))
    assert get_json(api, "/executions")["count"] == 3


# --- the CLI ----------------------------------------------------------------------------------------
def test_serve_defaults_to_loopback() -> None:
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.url, args.token) == ("127.0.0.1", 8000, None, None)


def test_serve_without_database_url_fails_cleanly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("ROMA_OTEL_DATABASE_URL", "DATABASE_URL", "ROMA_OTEL_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    assert main(["serve"]) == 2
    assert "no PostgreSQL database URL" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (["--workers", "0"], {}, "--workers must be at least 1, got 0"),
        ([], {"ROMA_OTEL_SERVE_WORKERS": "two"}, "ROMA_OTEL_SERVE_WORKERS must be an integer, got 'two'"),
        ([], {"ROMA_OTEL_SERVE_WORKERS": "-1"}, "--workers must be at least 1, got -1"),
    ],
)
def test_serve_refuses_a_bad_worker_count_naming_it(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    env: dict[str, str],
    named: str,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["serve", "--url", "postgresql://127.0.0.1:1/none", *argv]) == 2
    assert named in capsys.readouterr().err


@pytest.mark.parametrize("token", [None, TOKEN])
def test_serve_subprocess(seeded: Seeded, token: str | None) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("ROMA_OTEL_API_TOKEN", "ROMA_OTEL_DATABASE_URL")}
    if token is not None:
        env["ROMA_OTEL_API_TOKEN"] = token
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "roma_otel.cli",
            "serve",
            "--port",
            str(port),
            "--url",
            seeded.dsn,
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        with httpx.Client(base_url=base, timeout=10) as client:
            while True:
                assert proc.poll() is None, proc.communicate()
                try:
                    response = client.get("/health")
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "roma-otel serve did not answer within 60s"
                    time.sleep(0.1)
            assert response.status_code == 200
            assert healthy(response.json())
            listing = client.get("/executions")
            if token is None:
                assert listing.status_code == 200
                assert listing.json()["count"] == 3
            else:
                assert listing.status_code == 401
                authed = client.get("/executions", headers={"Authorization": f"Bearer {token}"})
                assert authed.json()["count"] == 3
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()
